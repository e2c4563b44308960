"""`--mode decisions`: each recorded decision's candidates, rebuilt with the
inputs they had, given to another router, decision by decision.

The router runs on the offline harness (`routelens.routers.testing`): one
instance per recorded source (a router lives in each process that calls
the deployment), built as Ray builds it there (its node; a proxy's prefers
its own node), a traced class with its tracer off. Before each decision its
replicas take the recorded membership and routing stats (Ray calls
`update_replicas` when either changes), its queue-length cache holds the
recorded lengths with their ages (so that routers reading it see what the
recorded router saw, and nothing probes), and `choose_replicas` is called
with every replica, as Ray calls it, and the request: the same
`PendingRequest` for a request's later decisions (backoff, locality
tiers), as in Ray. Its ranking is compared with the replica that really
got the request (`collector.replay.figures`); its pick is the replica Ray
would take from that ranking: the first rank with a replica below capacity,
the shortest cached queue in it.

Randomized routers: every run is seeded (Python's `random`, and numpy's)
from `--seed`; two runs with different seeds that rank every decision alike
mark the router deterministic (one run reported), else `runs` runs are
reported as intervals.

This module imports Ray: the command imports it only to replay
(tests/test_packaging.py allows it alone among the collector's modules).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict
from contextlib import closing
from itertools import islice
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy
from sqlalchemy.engine import Connection

from routelens.routers.explanations import explained
from routelens.routers.testing import make_replica, make_request, prime_queue_len_cache

from ..query.filters import Filters
from . import DEFAULT_RUNS
from .figures import DeploymentTally, Tally, count_reason, rank_bin, report
from .no_cluster import ClusterGuard, refusing_cluster_calls
from .recorded import DEFAULT_MAX_ONGOING_REQUESTS, RecordedDecision, recorded_decisions
from .spec import ReplayError, RouterSpec, build_router

# Decisions each run replays before the next run of the pass takes its turn (what the runs hold at once,
# read once for all of them); also the progress step.
BATCH = 1_000
REQUESTS_KEPT = 4_096  # per source: the latest requests, whose later decisions reuse their PendingRequest


def replay(conn: Connection, f: Filters, router: RouterSpec, seed: int, on_progress: Callable[[int], None],
           runs: int = DEFAULT_RUNS) -> dict:
    """Replays the window's decisions through `router`; the result (docs/replay.md).
    Raises ReplayError for a router that cannot be built or an empty window."""
    if runs < 2:
        raise ReplayError("runs: at least 2 (a second run with another seed tells a randomized router)")
    seeds = run_seeds(seed, runs)
    with refusing_cluster_calls() as guard:
        cls = router.load()
        # The first two runs, in one pass over the window, tell a randomized router (they differ) from a
        # deterministic one (one run reported); a randomized one's other runs take a second pass.
        done = _replay_pass(conn, f, cls, router.kwargs, seeds[:2], on_progress, guard)
        if not done[0].tally:
            raise ReplayError("no recorded decisions in the window and filters given")
        randomized = done[0].fingerprint != done[1].fingerprint
        if not randomized:
            on_progress(done[0].decisions * (runs - 2))  # the runs not needed
            done = done[:1]
        elif runs > 2:
            done += _replay_pass(conn, f, cls, router.kwargs, seeds[2:], on_progress, guard)
    deployments = report([run.tally for run in done])
    return {
        "mode": "decisions", "router": {"class": router.path, "kwargs": router.kwargs},
        "seed": seed, "runs": len(done), "run_seeds": seeds[:len(done)], "randomized": randomized,
        "window": {"since": f.since, "until": f.until},
        "decisions": sum(d["decisions"] for d in deployments),
        "with_outcome": sum(d["with_outcome"] for d in deployments),
        "deployments": deployments,
    }


def run_seeds(seed: int, runs: int) -> List[int]:
    """Each run's seed, derived from `seed` (63 bits)."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{number}".encode(), digest_size=8).digest(), "big") >> 1
            for number in range(runs)]


def seeded_generators(seed: int) -> Tuple[Any, Any]:
    """The state of Python's `random` and numpy's global generator (a router may draw from either), seeded
    from `seed`."""
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    return generators_state()


def generators_state() -> Tuple[Any, Any]:
    return random.getstate(), numpy.random.get_state()


def use_generators(state: Tuple[Any, Any]) -> None:
    random.setstate(state[0])
    numpy.random.set_state(state[1])


class _SourceReplay:
    """The replayed router standing in for one recorded source, and its replicas."""

    def __init__(self, cls: type, kwargs: Dict[str, Any], d: RecordedDecision):
        self.now = d.ts  # the router's clock (its queue-length cache's): the recorded time of the decision
        self.router = build_router(cls, kwargs, d.app, d.deployment, d.source, d.members, self.clock)
        # The wrapped router's choose_replicas, as the mixin calls it, for a traced class (its tracer is
        # off): called through routers.explanations, so that what the router explains is counted here.
        self.choose = getattr(self.router, "_routelens_choose", self.router.choose_replicas)
        self.cache = self.router.replica_queue_len_cache
        self.fakes: Dict[str, Any] = {}
        self.candidates: List[Any] = []  # the replicas, in the order given to update_replicas, as Ray passes them
        self.members: Any = None
        self.stats: Any = None
        self.tally: Optional[DeploymentTally] = None  # its deployment's counts
        self.requests: "OrderedDict[str, Tuple[Any, float]]" = OrderedDict()  # internal id -> (request, first ts)

    def clock(self) -> float:
        return self.now

    def prime(self, d: RecordedDecision, replace: bool) -> None:
        """The router's queue-length cache as at the decision (on its clock, the recorded time):
        every entry when `replace`, else those the decision recorded anew (the others have not changed)."""
        self.now = d.ts
        fakes, queue_lens = self.fakes, d.queue_lens
        changed = {fakes[replica_id].replica_id: (queue_lens[replica_id].queue_len, d.ts - queue_lens[replica_id].at)
                   for replica_id in (queue_lens if replace else d.queue_lens_updated) if replica_id in fakes}
        if changed or replace:
            prime_queue_len_cache(self.router, changed, now=d.ts, replace=replace)

    def sync(self, d: RecordedDecision) -> bool:
        """The replicas as at the decision; True when update_replicas was called."""
        if (d.members is self.members or d.members == self.members) and d.stats is self.stats:
            return False
        candidates = []
        for member in d.members:
            fake = self.fakes.get(member.replica_id)
            if fake is None:
                fake = self.fakes[member.replica_id] = make_replica(member.replica_id, d.deployment, d.app)
            fake.node_id, fake.availability_zone = member.node_id, member.availability_zone
            fake.max_ongoing_requests = member.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS
            fake.multiplexed_model_ids = set(member.model_ids)
            seen = d.stats.get(member.replica_id)
            fake.routing_stats = seen.stats if seen is not None else {}
            queue = d.queue_lens.get(member.replica_id)
            fake.queue_len = queue.queue_len if queue is not None else 0  # what it would answer a probe
            candidates.append(fake)
        self.router.update_replicas(candidates)
        self.candidates, self.members, self.stats = candidates, d.members, d.stats
        return True

    def request(self, d: RecordedDecision) -> Any:
        """The request as Ray routes it: a request's later decisions reuse its
        PendingRequest (its routing context: locality and multiplex tiers tried),
        with the time since its first decision as recorded."""
        key = d.internal_request_id
        kept = self.requests.get(key) if key and d.attempt > 0 else None
        if kept is not None:
            self.requests.move_to_end(key)
            pr, first_ts = kept
            context = pr.routing_context
            if context.multiplexed_start_matching_time is not None:
                context.multiplexed_start_matching_time = time.time() - (d.ts - first_ts)
            return pr
        pr = make_request(d.model_id or "", d.request_id, d.internal_request_id)
        if key:
            self.requests[key] = (pr, d.ts)
            if len(self.requests) > REQUESTS_KEPT:
                self.requests.popitem(last=False)
        return pr

    def pick(self, ranks: List[List[Any]], d: RecordedDecision) -> Optional[str]:
        """The replica Ray would take from the ranking (`_select_from_candidate_replicas`,
        rank by rank): the shortest cached queue below capacity; without one,
        Ray probes, and each replica answers its latest recorded length (one
        never recorded answers last)."""
        for rank in ranks:
            chosen, lowest, probed = None, float("inf"), []
            for replica in rank:
                queue_len = self.cache.get(replica.replica_id)
                if queue_len is None or queue_len >= replica.max_ongoing_requests:
                    probed.append(replica)
                elif queue_len < lowest:
                    chosen, lowest = replica, queue_len
            if chosen is None:
                unknown = None
                for replica in probed:
                    seen = d.queue_lens.get(replica.replica_id.unique_id)
                    if seen is None:
                        unknown = unknown or replica
                    elif seen.queue_len < replica.max_ongoing_requests and seen.queue_len < lowest:
                        chosen, lowest = replica, seen.queue_len
                chosen = chosen or unknown
            if chosen is not None:
                return chosen.replica_id.unique_id
        return None


def _replay_pass(conn: Connection, f: Filters, cls: type, kwargs: Dict[str, Any], seeds: List[int],
                 on_progress: Callable[[int], None], guard: ClusterGuard) -> List["_Run"]:
    """One run per seed over the window, the window read once: each batch of decisions is replayed by
    every run in turn, each with its own routers and generators (its draws are those of a run made alone).
    A router that called a cluster (and caught the refusal) stops it at the batch's end."""
    runs = [_Run(cls, kwargs, seed) for seed in seeds]

    async def replay_all() -> None:
        with closing(recorded_decisions(conn, f)) as recorded:
            while True:
                batch = list(islice(recorded, BATCH))
                if not batch:
                    return
                for run in runs:
                    use_generators(run.generators)
                    await run.replay(batch)
                    run.generators = generators_state()
                guard.check()
                on_progress(len(batch) * len(runs))

    asyncio.run(replay_all())
    return runs


class _Run:
    """One run of the router over the window: a router per recorded source, the generators' state,
    the counts per deployment, and a fingerprint of what they count (each decision's first tier, and
    where the real replica sits and the pick), compared between runs of one process (str hashes are
    salted per process)."""

    def __init__(self, cls: type, kwargs: Dict[str, Any], seed: int):
        self.cls, self.kwargs = cls, kwargs
        self.generators = seeded_generators(seed)
        self.sources: Dict[int, _SourceReplay] = {}
        self.tally: Tally = {}
        self.fingerprint = 0
        self.decisions = 0

    async def replay(self, batch: List[RecordedDecision]) -> None:
        tally, sources = self.tally, self.sources
        fingerprint = self.fingerprint
        for d in batch:
            source = sources.get(d.source.pk)
            if source is None:
                source = sources[d.source.pk] = _SourceReplay(self.cls, self.kwargs, d)
                t = tally.get((d.app, d.deployment))
                if t is None:
                    t = tally[(d.app, d.deployment)] = DeploymentTally(d.app, d.deployment)
                t.sources.add(d.source.pk)
                t.router_classes.add(d.router_class)
                source.tally = t
            t = source.tally
            t.decisions += 1
            if d.reason is not None:
                count_reason(t.reasons, d.reason)
            t.membership_inferred += d.membership_inferred
            resynced = source.sync(d)
            if resynced:
                for member in d.members:
                    t.members.setdefault(member.replica_id, (member.node_id, member.availability_zone))
                await asyncio.sleep(0)  # what update_replicas started runs, as Ray's loop runs it before routing
            source.prime(d, replace=resynced)
            try:
                ranking, explanation = await explained(source.choose, source.candidates, source.request(d))
                ranks = [rank for rank in ranking if rank]
                if explanation is not None:
                    count_reason(t.replay_reasons, explanation[0])
            except Exception as exc:  # Ray logs it and routes again; here the decision has no ranking
                t.router_errors += 1
                t.first_error = t.first_error or f"{type(exc).__name__}: {exc}"
                ranks = []
            first = tuple(replica.replica_id.unique_id for replica in ranks[0]) if ranks else ()
            if d.chosen is not None:
                fingerprint = hash((fingerprint, first, *_count_outcome(t, d, ranks, source)))
            else:
                fingerprint = hash((fingerprint, first))
        self.fingerprint = fingerprint
        self.decisions += len(batch)


def _count_outcome(t: DeploymentTally, d: RecordedDecision, ranks: List[List[Any]],
                   source: _SourceReplay) -> Tuple[Optional[int], Optional[str]]:
    """Counts a decision with an outcome; where the real replica sits in the replayed ranking, and the pick."""
    t.with_outcome += 1
    t.routed[d.chosen] += 1
    t.recorded_ranks[rank_bin(rank_of([rank for rank in d.ranks if rank], d.chosen))] += 1
    replayed = next((number for number, rank in enumerate(ranks)
                     if any(replica.replica_id.unique_id == d.chosen for replica in rank)), None)
    t.replay_ranks[rank_bin(replayed)] += 1
    t.first_tier_hits += replayed == 0
    pick = source.pick(ranks, d)
    if pick is None:
        t.no_pick += 1
    else:
        t.picks[pick] += 1
        t.agreements += pick == d.chosen
    return replayed, pick


def rank_of(ranks: List[List[str]], replica_id: str) -> Optional[int]:
    """The first rank holding the replica, or None."""
    for number, rank in enumerate(ranks):
        if replica_id in rank:
            return number
    return None
