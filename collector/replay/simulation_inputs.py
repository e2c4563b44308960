"""What `--mode simulate` reads from the database, and the recorded figures
it is compared with (docs/replay.md, "Simulate").

Per deployment in view:

- its replicas (recorded membership: when each joined and left, its
  `max_ongoing_requests`, node, zone, models) and the traced routers that
  served it (`sources`: one per router instance, with the stored class);
- each replica's service times: the `latency_ms` of its completed, accepted
  attempts. docs/design.md defines that latency from `on_request_routed`
  (the replica's acceptance reached the router) to the completion reaching
  the router: the time the request held a slot, without the time it queued
  before (`queue_wait_ms`, from its arrival to its routing, is apart). A
  bounded, seeded reservoir of them per replica is kept;
- the routing-stats period (`figures.stats_period`) and every recorded
  stats change, streamed, for refreshing the replicas' stats;
- the requests, streamed in arrival order: one per `routed` event, arriving
  at `ts - queue_wait_ms` (the `PendingRequest`'s `created_at`, which the
  tracer measures the wait from), with its model id, ids and, when its own
  decision supplied its replica, the attributes recorded with it.

Everything is read in key-range chunks (a query each, `CHUNK_ROWS` rows), so
memory does not grow with the window: a million recorded requests cost what
a thousand do, plus the reservoirs (bounded) and the requests that arrived
within one queue wait of each other (those are reordered by arrival).
"""

from __future__ import annotations

import bisect
import heapq
import json
import random
from array import array
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..query import figures
from ..query.explore import id_bytes, in_window
from ..query.filters import Filters
from ..store.bins import Bins
from ..store.models import Source, completed, decisions, routed, stats_changes
from ..store.types import stored_bytes

CHUNK_ROWS = 10_000
# Service times kept per replica (a uniform sample of all its recorded ones).
RESERVOIR = 10_000
# Ray's default max_ongoing_requests (ray.serve._private.constants), for a
# replica no membership event described.
DEFAULT_MAX_ONGOING = 5
# Arrivals are reordered within this much more than the window's longest
# queue wait: routed events come in id (time) order, arrivals up to one wait earlier.
REORDER_SLACK_S = 1.0
# Round trips are read from this many of the window's first routed requests, at most.
ROUND_TRIP_ROWS = 200_000
MAX_ROUND_TRIP_S = 10.0
MAX_REORDER_S = 3600.0

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
        self.counts[_bin(value_ms)] += 1
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


def _bin(value_ms: float, _bounds=FINE_MS.bounds) -> int:
    return bisect.bisect_left(_bounds, value_ms)


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


@dataclass
class Tally:
    """What one replica did in one run (recorded, or simulated)."""

    requests: int = 0  # routed (accepted) requests
    rejections: int = 0  # refused send attempts
    handoffs: int = 0  # routed with a replica another request's decision found (FIFO)
    queue_wait: Distribution = field(default_factory=Distribution)
    latency: Distribution = field(default_factory=Distribution)


@dataclass
class ReplicaInput:
    pk: int
    replica_id: str
    node_id: Optional[str]
    availability_zone: Optional[str]
    max_ongoing_requests: Optional[int]
    model_ids: List[str]
    added_at: Optional[float]
    removed_at: Optional[float]
    samples: array = field(default_factory=lambda: array("d"))  # service times, ms
    seen: int = 0  # service times recorded (the reservoir keeps up to RESERVOIR)
    recorded: Tally = field(default_factory=Tally)


@dataclass
class SourceInput:
    pk: int
    source_id: str
    router_pk: int
    router_class: str
    handle_source: Optional[str]
    node_id: Optional[str]


@dataclass
class DeploymentInput:
    pk: int
    app: str
    deployment: str
    router_pks: List[int]
    router_classes: Dict[int, str]  # router_pk -> stored class (module.QualName)
    sources: Dict[int, SourceInput]  # source_pk -> source
    replicas: Dict[int, ReplicaInput]  # replica_pk -> replica
    stats_period_s: Optional[float]
    recorded_decisions: int


@dataclass
class Arrival:
    """One recorded request, as the simulation replays it."""

    __slots__ = ("at", "source_pk", "request_id", "internal_request_id", "model_id", "attributes")
    at: float
    source_pk: int
    request_id: str
    internal_request_id: str
    model_id: str
    attributes: Optional[Dict[str, Any]]


def deployments(conn: Connection, f: Filters, seed: int) -> List[DeploymentInput]:
    """The deployments in view with their replicas, sources, stats period and
    the replicas' service times (a seeded reservoir) and recorded latencies
    and refusals."""
    sc = figures.scope(conn, f)
    sources = _sources(conn, sc)
    out = []
    for deployment_pk, names in sorted(sc.deployments.items()):
        router_pks = sc.routers_of(deployment_pk)
        replicas = {pk: ReplicaInput(pk=pk, replica_id=info["replica_id"], node_id=info["node_id"],
                                     availability_zone=info["availability_zone"],
                                     max_ongoing_requests=info["max_ongoing_requests"],
                                     model_ids=info["model_ids"], added_at=info["added_at"],
                                     removed_at=info["removed_at"])
                    for pk, info in sc.replicas.items() if info["deployment_pk"] == deployment_pk}
        dep = DeploymentInput(
            pk=deployment_pk, app=names["app"], deployment=names["deployment"], router_pks=router_pks,
            router_classes={pk: sc.routers[pk]["router_class"] for pk in router_pks},
            sources={pk: s for pk, s in sources.items() if s.router_pk in router_pks},
            replicas=replicas, stats_period_s=figures.stats_period(conn, f, router_pks),
            recorded_decisions=_count(conn, decisions, f, router_pks))
        _read_completions(conn, f, dep, random.Random(f"{seed}/{deployment_pk}"))
        out.append(dep)
    return out


def _sources(conn: Connection, sc: figures.Scope) -> Dict[int, SourceInput]:
    if not sc.routers:
        return {}
    rows = conn.execute(select(Source.pk, Source.source_id, Source.router_pk, Source.handle_source, Source.node_id)
                        .where(Source.router_pk.in_(sorted(sc.routers))))
    return {pk: SourceInput(pk=pk, source_id=source_id, router_pk=router_pk,
                            router_class=sc.routers[router_pk]["router_class"], handle_source=handle_source,
                            node_id=node_id)
            for pk, source_id, router_pk, handle_source, node_id in rows}


def _count(conn: Connection, table, f: Filters, router_pks: Sequence[int]) -> int:
    if not router_pks:
        return 0
    return conn.scalar(select(func.count()).select_from(table).where(
        *in_window(table, f.since, f.until), table.c.router_pk.in_(sorted(router_pks)))) or 0


def _chunks(conn: Connection, table, columns: Sequence[Any], where: list) -> Iterator[list]:
    """Rows of `table` (first column selected: its key, as bytes) in key order, CHUNK_ROWS a query."""
    key = id_bytes(table)
    last = None
    while True:
        bound = [key > last] if last is not None else []
        rows = conn.execute(select(key, *columns).where(*bound, *where).order_by(key).limit(CHUNK_ROWS)).all()
        if rows:
            yield rows
        if len(rows) < CHUNK_ROWS:
            return
        last = rows[-1][0]


def _read_completions(conn: Connection, f: Filters, dep: DeploymentInput, rng: random.Random) -> None:
    """Each replica's recorded latencies (a reservoir of them, and their
    distribution) and refusals."""
    if not dep.router_pks:
        return
    where = in_window(completed, f.since, f.until) + [completed.c.router_pk.in_(sorted(dep.router_pks))]
    columns = (completed.c.replica_pk, completed.c.latency_ms, completed.c.rejected, completed.c.routed_id)
    for rows in _chunks(conn, completed, columns, where):
        for _key, replica_pk, latency_ms, rejected, routed_id in rows:
            replica = dep.replicas.get(replica_pk)
            if replica is None:
                continue
            if rejected:
                replica.recorded.rejections += 1
            elif routed_id is not None and latency_ms is not None:
                replica.recorded.latency.add(latency_ms)
                replica.seen += 1
                if len(replica.samples) < RESERVOIR:
                    replica.samples.append(latency_ms)
                else:
                    at = rng.randrange(replica.seen)
                    if at < RESERVOIR:
                        replica.samples[at] = latency_ms


def round_trips(conn: Connection, f: Filters, dep: DeploymentInput, rng: random.Random) -> array:
    """Seconds from a request's own decision to its replica's acceptance
    reaching the router: an actor call's round trip (the send and the
    answer to the rejection protocol) plus the router's own steps between,
    and one more round trip when the router probed queue lengths first.
    A seeded reservoir, from the window's first ROUND_TRIP_ROWS routed
    requests that were routed by their own decision."""
    out = array("d")
    if not dep.router_pks:
        return out
    joined = routed.join(decisions, decisions.c.id == routed.c.decision_id)
    where = in_window(routed, f.since, f.until) + [routed.c.router_pk.in_(sorted(dep.router_pks)),
                                                   routed.c.own_ranking.is_(True)]
    seen = 0
    key = id_bytes(routed)
    last = None
    while seen < ROUND_TRIP_ROWS:
        bound = [key > last] if last is not None else []
        rows = conn.execute(select(key, routed.c.ts - decisions.c.ts).select_from(joined).where(*bound, *where)
                            .order_by(key).limit(CHUNK_ROWS)).all()
        for _key, seconds in rows:
            if seconds is None or not 0.0 <= seconds < MAX_ROUND_TRIP_S:
                continue
            seen += 1
            if len(out) < RESERVOIR:
                out.append(seconds)
            else:
                at = rng.randrange(seen)
                if at < RESERVOIR:
                    out[at] = seconds
        if len(rows) < CHUNK_ROWS:
            break
        last = rows[-1][0]
    return out


def max_queue_wait_s(conn: Connection, f: Filters, dep: DeploymentInput) -> float:
    if not dep.router_pks:
        return 0.0
    longest = conn.scalar(select(func.max(routed.c.queue_wait_ms)).where(
        *in_window(routed, f.since, f.until), routed.c.router_pk.in_(sorted(dep.router_pks))))
    return (longest or 0.0) / 1000.0


def arrivals(conn: Connection, f: Filters, dep: DeploymentInput) -> Iterator[Arrival]:
    """The deployment's recorded requests in arrival order, tallying each
    replica's recorded requests, hand-offs and queue waits on the way.

    A request arrives at its routed event's `ts` minus its queue wait: routed
    events come in id order, so arrivals are held back (in a heap) until no
    later routed event can hold an earlier arrival: the window's longest
    queue wait plus a second."""
    if not dep.router_pks:
        return
    horizon = min(max_queue_wait_s(conn, f, dep) + REORDER_SLACK_S, MAX_REORDER_S)
    joined = routed.outerjoin(decisions, decisions.c.id == routed.c.decision_id)
    where = in_window(routed, f.since, f.until) + [routed.c.router_pk.in_(sorted(dep.router_pks))]
    columns = (routed.c.ts, routed.c.source_pk, routed.c.replica_pk, routed.c.queue_wait_ms, routed.c.own_ranking,
               stored_bytes(routed.c.request_id), stored_bytes(routed.c.internal_request_id), routed.c.model_id,
               decisions.c.extra)
    held: List[Tuple[float, int, Arrival]] = []
    order = 0
    replicas = dep.replicas
    key = id_bytes(routed)
    last = None
    while True:
        bound = [key > last] if last is not None else []
        rows = conn.execute(select(key, *columns).select_from(joined).where(*bound, *where)
                            .order_by(key).limit(CHUNK_ROWS)).all()
        newest = None
        for _key, ts, source_pk, replica_pk, wait_ms, own, request_id, internal_id, model_id, extra in rows:
            wait_ms = wait_ms if wait_ms is not None and wait_ms >= 0 else 0.0
            replica = replicas.get(replica_pk)
            if replica is not None:
                tally = replica.recorded
                tally.requests += 1
                tally.queue_wait.add(wait_ms)
                if own is False:
                    tally.handoffs += 1
            attributes = None
            if own and extra and "attributes" in extra:
                attributes = json.loads(extra).get("attributes")
            order += 1
            heapq.heappush(held, (ts - wait_ms / 1000.0, order, Arrival(
                ts - wait_ms / 1000.0, source_pk, _text(request_id, order), _text(internal_id, order),
                model_id or "", attributes)))
            newest = ts
        if newest is not None:
            while held and held[0][0] + horizon < newest:
                yield heapq.heappop(held)[2]
        if len(rows) < CHUNK_ROWS:
            break
        last = rows[-1][0]
    while held:
        yield heapq.heappop(held)[2]


def _text(stored: Optional[bytes], order: int) -> str:
    """A request id as the simulation names it: its stored bytes in hex (only
    equality matters to Ray); a request without one gets a fresh name."""
    return bytes(stored).hex() if stored is not None else f"replayed-{order}"


def stats_changes_stream(conn: Connection, f: Filters, dep: DeploymentInput) -> Iterator[Tuple[float, int, dict]]:
    """(when collected, replica_pk, stats) of every recorded stats change of the
    deployment, in id order (the routers that saw one change each recorded it)."""
    if not dep.router_pks:
        return
    where = in_window(stats_changes, f.since, f.until) + [stats_changes.c.router_pk.in_(sorted(dep.router_pks))]
    columns = (stats_changes.c.ts, stats_changes.c.collected_at, stats_changes.c.replica_pk, stats_changes.c.stats)
    for rows in _chunks(conn, stats_changes, columns, where):
        for _key, ts, collected_at, replica_pk, stats in rows:
            yield (collected_at if collected_at is not None else ts), replica_pk, json.loads(stats)
