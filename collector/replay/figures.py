"""A replay's figures, both modes': what a run counts, and the result's
figures. No Ray here: `collector.replay.decisions` and `.simulate` count,
this module sums up.

- decisions: per deployment, the replayed router beside the recorded one
  (`report`), each figure over runs as a mean with a 95% interval;
- simulate: per replica and per deployment, requests and their share,
  imbalance, rejections, hand-offs, queue wait and latency percentiles
  (`replica_figures`, `deployment_figures`), from a `ServedTally` per
  replica and run, the recorded one included.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..ingest.rollups import MAX_REASONS_PER_DEPLOYMENT
from ..query.figures import imbalance, reason_name
from ..store.bins import Bins
from ..store.models import OTHER_REASONS

# Where the replica that really got a request sits in a ranking: its rank (among the non-empty ones), or absent.
RANK_BINS = ("0", "1", "2", "3", "4", "5+", "absent")

# Student's t, 0.975 quantile, by degrees of freedom: the half-width of a 95% interval over runs is t * sd / sqrt(n).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


_IMBALANCE_BOUNDS = {"max_over_mean": (1.0, math.inf), "cv": (0.0, math.inf), "jain": (0.0, 1.0)}


def rank_bin(rank: Optional[int]) -> str:
    if rank is None:
        return "absent"
    return str(rank) if rank < 5 else "5+"


@dataclass
class DeploymentTally:
    """One run's counts for one deployment. Decisions with an outcome are
    those a `routed` event names: the replica that really got the request
    is known, and every figure but `decisions` counts those only."""

    app: str
    deployment: str
    router_classes: set = field(default_factory=set)  # the recording routers'
    sources: set = field(default_factory=set)
    decisions: int = 0
    membership_inferred: int = 0
    with_outcome: int = 0
    router_errors: int = 0
    first_error: Optional[str] = None
    first_tier_hits: int = 0  # the replayed first tier holds the real replica
    agreements: int = 0  # the replayed router's pick is the real replica
    no_pick: int = 0  # nothing below capacity in any rank (Ray would back off and ask again)
    replay_ranks: Counter = field(default_factory=Counter)  # RANK_BINS -> decisions
    recorded_ranks: Counter = field(default_factory=Counter)
    picks: Counter = field(default_factory=Counter)  # replica -> decisions it would have got
    routed: Counter = field(default_factory=Counter)  # replica -> decisions it got
    members: Dict[str, Tuple[Optional[str], Optional[str]]] = field(default_factory=dict)  # -> (node, zone)
    # Decisions by the reason their router gave (routelens_explain): the recorded router's, the replayed
    # router's; at most MAX_REASONS_PER_DEPLOYMENT by name, as the collector counts them, the rest OTHER_REASONS.
    reasons: Counter = field(default_factory=Counter)
    replay_reasons: Counter = field(default_factory=Counter)


def count_reason(reasons: Counter, reason: str) -> None:
    if reason not in reasons and len(reasons) >= MAX_REASONS_PER_DEPLOYMENT:
        reason = OTHER_REASONS
    reasons[reason] += 1


Tally = Dict[Tuple[str, str], DeploymentTally]


def interval(values: Sequence[float], low: float = -math.inf, high: float = math.inf) -> Optional[dict]:
    """Mean and 95% interval (Student's t) of a figure over runs, within
    [low, high]; one run, or runs that agree: the value itself. None when
    no run has the figure."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    if len(values) < 2 or max(values) == min(values):
        return {"mean": mean, "low": mean, "high": mean}
    df = len(values) - 1
    t = _T975[max(k for k in _T975 if k <= df)]
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": max(mean - half, low), "high": min(mean + half, high)}


def _rate(part: float, whole: float) -> Optional[float]:
    return part / whole if whole else None


def _rates(values: Sequence[Optional[float]]) -> Optional[dict]:
    return interval(values, 0.0, 1.0)


def report(runs: List[Tally]) -> List[dict]:
    """Per deployment (by app, then name), the recorded router's figures and
    the replayed router's over `runs` (one run: a deterministic router)."""
    first = runs[0]
    out = []
    for key in sorted(first):
        recorded = first[key]
        tallies = [run[key] for run in runs]
        n = recorded.with_outcome
        members = sorted(set(recorded.members) | set(recorded.routed) | {r for t in tallies for r in t.picks})
        routed_total = sum(recorded.routed.values())
        picks_total = [sum(t.picks.values()) for t in tallies]
        replicas = []
        for replica_id in members:
            node, zone = recorded.members.get(replica_id, (None, None))
            replicas.append({
                "replica_id": replica_id, "node_id": node, "availability_zone": zone,
                "recorded_routed": recorded.routed[replica_id],
                "recorded_share": _rate(recorded.routed[replica_id], routed_total),
                "replay_picks": interval([t.picks[replica_id] for t in tallies], 0.0),
                "replay_share": _rates([_rate(t.picks[replica_id], total) for t, total in zip(tallies, picks_total)]),
            })
        replay_imbalance = [imbalance([t.picks[r] for r in members]) for t in tallies]
        errors = next((t.first_error for t in tallies if t.first_error), None)
        out.append({
            "app": recorded.app, "deployment": recorded.deployment,
            "recorded_router_classes": sorted(recorded.router_classes), "sources": len(recorded.sources),
            "decisions": recorded.decisions, "with_outcome": n, "membership_inferred": recorded.membership_inferred,
            "recorded": {
                "rank0_rate": _rate(recorded.recorded_ranks["0"], n),
                "ranks": {b: _rate(recorded.recorded_ranks[b], n) for b in RANK_BINS},
                "imbalance": imbalance([recorded.routed[r] for r in members]),
                "reasons": [{**reason_name(reason), "decisions": count}
                            for reason, count in sorted(recorded.reasons.items(), key=lambda item: -item[1])],
            },
            "replay": {
                "first_tier_hit_rate": _rates([_rate(t.first_tier_hits, n) for t in tallies]),
                "agreement": _rates([_rate(t.agreements, n) for t in tallies]),
                "no_pick_rate": _rates([_rate(t.no_pick, n) for t in tallies]),
                "ranks": {b: _rates([_rate(t.replay_ranks[b], n) for t in tallies]) for b in RANK_BINS},
                "imbalance": {name: interval([i[name] for i in replay_imbalance], *bounds)
                              for name, bounds in _IMBALANCE_BOUNDS.items()},
                "router_errors": interval([t.router_errors for t in tallies], 0.0),
                "first_error": errors,
                "reasons": [{**reason_name(reason), "decisions": interval([t.replay_reasons[reason] for t in tallies],
                                                                          0.0)}
                            for reason in sorted({r for t in tallies for r in t.replay_reasons})],
            },
            "replicas": replicas,
        })
    return out


# --- simulate ---

# Milliseconds, in bins 2% wide from 1 us to 10^7 ms: percentiles exact to 2%
# in constant memory (the rollups' latency bins are far coarser).
FINE_MS = Bins("ms", tuple(0.001 * 1.02 ** i for i in range(1, 1164)))


class Distribution:
    """Counts of values (ms) in FINE_MS bins: percentiles to 2%, constant memory."""

    __slots__ = ("counts", "maximum", "n")

    def __init__(self):
        self.counts = [0] * (len(FINE_MS.bounds) + 1)
        self.maximum: Optional[float] = None
        self.n = 0

    def add(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(FINE_MS.bounds, value_ms)] += 1
        self.n += 1
        if self.maximum is None or value_ms > self.maximum:
            self.maximum = value_ms

    def merge(self, other: "Distribution") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.n += other.n
        if other.maximum is not None and (self.maximum is None or other.maximum > self.maximum):
            self.maximum = other.maximum

    def percentiles(self) -> Dict[str, Optional[float]]:
        return {name: _round(FINE_MS.percentile(self.counts, q, self.maximum))
                for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


@dataclass
class ServedTally:
    """What one replica did in one run (recorded, or simulated)."""

    requests: int = 0  # routed (accepted) requests
    rejections: int = 0  # refused send attempts
    handoffs: int = 0  # routed with a replica another request's decision found (FIFO)
    queue_wait: Distribution = field(default_factory=Distribution)
    latency: Distribution = field(default_factory=Distribution)


def replica_figures(tally: ServedTally, deployment_requests: int) -> dict:
    return {
        "requests": tally.requests,
        "share": _rate(tally.requests, deployment_requests),
        "rejections": tally.rejections,
        "handoffs": tally.handoffs,
        "queue_wait_ms": tally.queue_wait.percentiles(),
        "latency_ms": tally.latency.percentiles(),
    }


def deployment_figures(tallies: Sequence[ServedTally]) -> dict:
    """A deployment's figures over its replicas' tallies (imbalance over every replica, as
    the Distribution view defines it)."""
    queue_wait, latency = Distribution(), Distribution()
    for t in tallies:
        queue_wait.merge(t.queue_wait)
        latency.merge(t.latency)
    requests = sum(t.requests for t in tallies)
    handoffs = sum(t.handoffs for t in tallies)
    return {
        "requests": requests,
        "imbalance": imbalance([t.requests for t in tallies]),
        "rejections": sum(t.rejections for t in tallies),
        "handoffs": handoffs,
        "handoff_rate": _rate(handoffs, requests),
        "queue_wait_ms": queue_wait.percentiles(),
        "latency_ms": latency.percentiles(),
    }
