"""The fixed histograms the rollups keep, and percentiles read back from them.

Panels never scan raw rows, so distributions (staleness, latencies, ranks)
are kept as counts per bin in the rollup rows. Bins are fixed here, once:
changing them changes the database schema (a migration).

A percentile read from a histogram is exact to the bin: the raw percentile
lies in the bin the reported value lies in. Within a bin the value is
interpolated linearly and never exceeds the maximum actually seen.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class Bins:
    """`name_0 .. name_{n}` columns; bin i holds values in (bounds[i-1], bounds[i]],
    the last bin everything above the last bound."""

    name: str
    bounds: Sequence[float]
    # Values are whole numbers (queue lengths): a percentile is rounded up to one, which stays in its bin.
    whole: bool = False

    @cached_property
    def columns(self) -> List[str]:
        return [f"{self.name}_{i}" for i in range(len(self.bounds) + 1)]

    def column(self, value: float) -> str:
        """The column that counts `value`."""
        return self.columns[bisect.bisect_left(self.bounds, value)]

    def edges(self, i: int) -> tuple:
        low = self.bounds[i - 1] if i > 0 else 0.0
        high = self.bounds[i] if i < len(self.bounds) else math.inf
        return low, high

    def percentile(self, counts: Sequence[int], q: float, maximum: Optional[float] = None) -> Optional[float]:
        """The q-quantile (0..1) of the values counted in `counts`."""
        total = sum(counts)
        if total == 0:
            return None
        target = q * total
        seen = 0
        for i, count in enumerate(counts):
            if count and seen + count >= target:
                low, high = self.edges(i)
                if maximum is not None:
                    high = min(high, maximum)
                if math.isinf(high):
                    return low
                fraction = (target - seen) / count
                value = low + (high - low) * fraction
                return float(math.ceil(value)) if self.whole else value
            seen += count
        return maximum


# Age of the routing_stats a decision ranked on, seconds. Dense around the
# usual stats periods (0.1 s to 10 s), where "within 2 x period" is judged.
STALENESS = Bins("stale", (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0,
                           10.0, 20.0, 30.0, 60.0, 300.0))
# Time spent in the wrapped choose_replicas, microseconds.
CHOOSE_US = Bins("choose_us", (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000))
# Request latency seen by the router (sent -> completed; before wire format v3, routed -> completed), milliseconds.
LATENCY_MS = Bins("latency_ms", (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000))
# From a request's send to on_request_routed, milliseconds: the replica's answer (about a millisecond), and
# beyond it how long the router's loop took to resume the sender (a router that blocks it: tens).
SEND_TO_ROUTED_MS = Bins("send_to_routed_ms", (0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
# Decisions made for a request by the time it was routed.
ATTEMPTS = Bins("attempts", (1, 2, 3, 4, 6, 10))
# Decision quality (docs/design.md, Definitions), in requests: one bin per whole number up to 4, then wider.
_QUEUE_GAPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Regret: the chosen replica's queue length minus the shortest among the candidates, as the router saw them.
REGRET = Bins("regret", _QUEUE_GAPS, whole=True)
# Belief error, absolute: the queue length the router believed against the one the replica reported.
BELIEF_ERROR = Bins("belief_error", _QUEUE_GAPS, whole=True)

# Rank a routed replica came from: rank_0 .. rank_4, rank_5 (5 and deeper), and unknown.
RANK_COLUMNS = [f"rank_{i}" for i in range(6)] + ["rank_unknown"]


def rank_column(rank: Optional[int]) -> str:
    if rank is None or rank < 0:
        return "rank_unknown"
    return RANK_COLUMNS[min(rank, 5)]


HISTOGRAMS = (STALENESS, CHOOSE_US, LATENCY_MS, ATTEMPTS, REGRET, BELIEF_ERROR, SEND_TO_ROUTED_MS)
