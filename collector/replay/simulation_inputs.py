"""What `--mode simulate` reads from the database, and the recorded figures
it is compared with (docs/replay.md, "--mode simulate").

Per deployment in view:

- its replicas (recorded membership: when each joined and left, its
  `max_ongoing_requests`, node, zone) and the traced routers that
  served it (`recorded.sources`: one per router instance);
- each replica's service times: the `latency_ms` of its completed, accepted
  attempts. docs/design.md defines that latency from `on_request_routed`
  (the replica's acceptance reached the router) to the completion reaching
  the router: the time the request held a slot, without the time it queued
  before (`queue_wait_ms`, from its arrival to its routing, is apart). A
  bounded, seeded reservoir of them per replica is kept;
- the round trips of actor calls (`round_trips`) and every recorded stats
  change, streamed, with when a router saw it;
- every recorded change of a replica's multiplexed models (`model_changes`),
  streamed from the `replicas` events, with when a router saw it, after
  the models each replica held before the window;
- the order Ray lists its replicas in (`listing_order`), as its routers'
  recorded rankings show it;
- the requests, streamed in arrival order: one per `routed` event, arriving
  at `ts - queue_wait_ms` (the `PendingRequest`'s `created_at`, which the
  tracer measures the wait from), with its model id, ids and, when its own
  decision supplied its replica, the attributes recorded with it.

Everything is read as the export and the decisions mode read it
(`export.chunks`: key-range chunks, as Arrow columns), so memory does not
grow with the window: a million recorded requests cost what a thousand do,
plus the reservoirs (bounded) and the requests that arrived within one queue
wait of each other (those are reordered by arrival).
"""

from __future__ import annotations

import heapq
import json
import random
from array import array
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Tuple

import pyarrow as pa
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..export.arrow_reader import ArrowReader
from ..export.chunks import BLOB, Reading, chunks
from ..export.convert import request_ids
from ..query import figures
from ..query.explore import in_window
from ..query.filters import Filters
from ..store.models import completed, decisions, memberships, routed, stats_changes
from ..store.types import ranking_layouts, stored_bytes
from .figures import ServedTally
from .recorded import SourceInfo, joined_order, memberships_before, sources

# Service times kept per replica (a uniform sample of all its recorded ones), and round trips per deployment.
RESERVOIR = 10_000
# Arrivals are reordered within this much more than the window's longest
# queue wait: routed events come in id (time) order, arrivals up to one wait earlier.
REORDER_SLACK_S = 1.0
MAX_REORDER_S = 3600.0
# Round trips are read from this many of the window's first routed requests, at most.
ROUND_TRIP_ROWS = 200_000
MAX_ROUND_TRIP_S = 10.0


@dataclass
class ReplicaInput:
    pk: int
    replica_id: str
    node_id: Optional[str]
    availability_zone: Optional[str]
    max_ongoing_requests: Optional[int]
    added_at: Optional[float]
    removed_at: Optional[float]
    samples: array = field(default_factory=lambda: array("d"))  # service times, ms
    seen: int = 0  # service times recorded (the reservoir keeps up to RESERVOIR)
    recorded: ServedTally = field(default_factory=ServedTally)


@dataclass
class DeploymentInput:
    pk: int
    app: str
    deployment: str
    router_pks: List[int]
    router_classes: Dict[int, str]  # router_pk -> stored class (module.QualName)
    sources: Dict[int, SourceInfo]  # source_pk -> source
    replicas: Dict[int, ReplicaInput]  # replica_pk -> replica
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


_COMPLETED = Reading({"id": (stored_bytes(completed.c.id), BLOB),
                      "replica_pk": (completed.c.replica_pk, pa.int64()),
                      "latency_ms": (completed.c.latency_ms, pa.float64()),
                      "rejected": (completed.c.rejected, pa.bool_()),
                      "routed_id": (stored_bytes(completed.c.routed_id), BLOB)})
_ROUTED = Reading({"id": (stored_bytes(routed.c.id), BLOB), "ts": (routed.c.ts, pa.float64()),
                   "source_pk": (routed.c.source_pk, pa.int64()), "replica_pk": (routed.c.replica_pk, pa.int64()),
                   "queue_wait_ms": (routed.c.queue_wait_ms, pa.float64()),
                   "own_ranking": (routed.c.own_ranking, pa.bool_()),
                   "request_id": (stored_bytes(routed.c.request_id), BLOB),
                   "internal_request_id": (stored_bytes(routed.c.internal_request_id), BLOB),
                   "model_id": (routed.c.model_id, pa.string()),
                   "decision_id": (stored_bytes(routed.c.decision_id), BLOB)})
_DECISIONS = Reading({"id": (stored_bytes(decisions.c.id), BLOB), "ts": (decisions.c.ts, pa.float64()),
                      "extra": (decisions.c.extra, pa.string())})
_RANKINGS = Reading({"id": (stored_bytes(decisions.c.id), BLOB),
                     "ranking": (stored_bytes(decisions.c.ranking), BLOB)})
_MEMBERSHIPS = Reading({"id": (stored_bytes(memberships.c.id), BLOB), "ts": (memberships.c.ts, pa.float64()),
                        "replicas": (memberships.c.replicas, pa.string())})
_STATS = Reading({"id": (stored_bytes(stats_changes.c.id), BLOB), "ts": (stats_changes.c.ts, pa.float64()),
                  "replica_pk": (stats_changes.c.replica_pk, pa.int64()),
                  "stats": (stats_changes.c.stats, pa.string())})


def deployments(conn: Connection, reader: ArrowReader, f: Filters, seed: int) -> List[DeploymentInput]:
    """The deployments in view with their replicas, sources and the replicas' service times (a
    seeded reservoir), recorded latencies and refusals."""
    sc = figures.scope(conn, f)
    known = sources(conn, sc)
    out = []
    for deployment_pk, names in sorted(sc.deployments.items()):
        router_pks = sc.routers_of(deployment_pk)
        replicas = {pk: ReplicaInput(pk=pk, replica_id=info["replica_id"], node_id=info["node_id"],
                                     availability_zone=info["availability_zone"],
                                     max_ongoing_requests=info["max_ongoing_requests"], added_at=info["added_at"],
                                     removed_at=info["removed_at"])
                    for pk, info in sc.replicas.items() if info["deployment_pk"] == deployment_pk}
        dep = DeploymentInput(
            pk=deployment_pk, app=names["app"], deployment=names["deployment"], router_pks=router_pks,
            router_classes={pk: sc.routers[pk]["router_class"] for pk in router_pks},
            sources={pk: s for pk, s in known.items() if s.router_pk in router_pks},
            replicas=replicas,
            recorded_decisions=conn.scalar(select(func.count()).select_from(decisions).where(
                *_of(decisions, f, router_pks))) or 0)
        _read_completions(reader, f, dep, random.Random(f"{seed}/{deployment_pk}"))
        out.append(dep)
    return out


def _of(table, f: Filters, router_pks: List[int]) -> list:
    """Conditions for a raw table's rows of the window, recorded by a deployment's routers."""
    return in_window(table, f.since, f.until) + [table.c.router_pk.in_(sorted(router_pks))]


def _keep(reservoir: array, seen: int, value: float, rng: random.Random) -> None:
    """Reservoir sampling: `value`, the `seen`-th of its kind, kept with probability RESERVOIR / seen."""
    if len(reservoir) < RESERVOIR:
        reservoir.append(value)
    else:
        at = rng.randrange(seen)
        if at < RESERVOIR:
            reservoir[at] = value


def _read_completions(reader: ArrowReader, f: Filters, dep: DeploymentInput, rng: random.Random) -> None:
    """Each replica's recorded latencies (a reservoir of them, and their distribution) and refusals."""
    for rows in chunks(reader, _COMPLETED, _of(completed, f, dep.router_pks)):
        for replica_pk, latency_ms, rejected, routed_id in zip(*(rows.column(name).to_pylist() for name in (
                "replica_pk", "latency_ms", "rejected", "routed_id"))):
            replica = dep.replicas.get(replica_pk)
            if replica is None:
                continue
            if rejected:
                replica.recorded.rejections += 1
            elif routed_id is not None and latency_ms is not None:
                replica.recorded.latency.add(latency_ms)
                replica.seen += 1
                _keep(replica.samples, replica.seen, latency_ms, rng)


class _Routed(NamedTuple):
    """One recorded routed event, with what its decision recorded."""
    ts: float
    source_pk: int
    replica_pk: int
    wait_ms: Optional[float]
    own: Optional[bool]  # false: a FIFO hand-off (the decision was another request's)
    request_id: Optional[str]
    internal_request_id: Optional[str]
    model_id: Optional[str]
    decision_ts: Optional[float]
    extra: Optional[str]  # the decision's JSON extra: its attributes


def _routed(reader: ArrowReader, f: Filters, dep: DeploymentInput) -> Iterator[_Routed]:
    """The deployment's routed events in id order, each with its decision's ts and
    extra: the decisions of a chunk's span are one range of the decisions' key."""
    key = stored_bytes(decisions.c.id)
    for rows in chunks(reader, _ROUTED, _of(routed, f, dep.router_pks)):
        decision_ids = [d for d in rows.column("decision_id").to_pylist() if d is not None]
        found: Dict[bytes, Tuple[float, Optional[str]]] = {}
        if decision_ids:
            named = reader.read(_DECISIONS.query(key >= min(decision_ids), key <= max(decision_ids),
                                                 decisions.c.router_pk.in_(sorted(dep.router_pks))), _DECISIONS.schema)
            found = dict(zip(named.column("id").to_pylist(),
                             zip(named.column("ts").to_pylist(), named.column("extra").to_pylist())))
        columns = [rows.column(name).to_pylist() for name in
                   ("ts", "source_pk", "replica_pk", "queue_wait_ms", "own_ranking")]
        columns += [request_ids(rows.column(name)).to_pylist() for name in ("request_id", "internal_request_id")]
        columns += [rows.column("model_id").to_pylist(), rows.column("decision_id").to_pylist()]
        for *values, model_id, decision_id in zip(*columns):
            decision_ts, extra = found.get(decision_id, (None, None))
            yield _Routed(*values, model_id, decision_ts, extra)


def listing_order(reader: ArrowReader, f: Filters, dep: DeploymentInput) -> List[int]:
    """The deployment's replica pks in the order Ray lists them to its routers, as far as the record tells.

    Routers break ties by that order (Ray's pick takes the first of equal queue lengths, `min()` the first
    of equals), and no event records it: `replicas` events list members by id. The rankings do, where a
    router ranks as Ray's rank_replicas_via_* helpers do, keeping Ray's order within a rank: two replicas
    one rank holds are in Ray's order. A pair is ordered so when every recorded ranking that holds both
    in one rank agrees (pow-2's two replicas come in a random order: their pairs disagree and tell
    nothing); the rest as they joined (`joined_order`), which is Ray's order too but cannot tell apart
    replicas that joined in one update."""
    seen: Dict[Tuple[int, int], bool] = {}  # (a, b), a < b -> whether a came first in every ranking so far
    contradicted = set()
    for rows in chunks(reader, _RANKINGS, _of(decisions, f, dep.router_pks)):
        for ranking in ranking_layouts(rows.column("ranking").to_pylist()):
            for rank in ranking:
                for first, then in zip(rank, rank[1:]):  # neighbours: the order of the rest follows from them
                    a, b = first[0], then[0]
                    if a == b:
                        continue
                    pair, forward = ((a, b), True) if a < b else ((b, a), False)
                    if seen.setdefault(pair, forward) != forward:
                        contradicted.add(pair)
    after: Dict[int, List[int]] = {pk: [] for pk in dep.replicas}
    waiting = dict.fromkeys(dep.replicas, 0)  # replica pk -> how many it is seen to come after
    for (a, b), forward in seen.items():
        if (a, b) in contradicted or a not in after or b not in after:
            continue
        first, then = (a, b) if forward else (b, a)
        after[first].append(then)
        waiting[then] += 1
    key = {pk: joined_order(r.added_at, r.replica_id) for pk, r in dep.replicas.items()}
    ready = [(key[pk], pk) for pk, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: List[int] = []
    while waiting:
        if not ready:  # pairs ordered in a cycle (rankings that keep no order, seen too rarely to disagree)
            pk = min(waiting, key=key.__getitem__)
            waiting[pk] = 0
            ready.append((key[pk], pk))
        pk = heapq.heappop(ready)[1]
        order.append(pk)
        del waiting[pk]
        for then in after[pk]:
            if then in waiting:
                waiting[then] -= 1
                if waiting[then] == 0:
                    heapq.heappush(ready, (key[then], then))
    return order


def round_trips(reader: ArrowReader, f: Filters, dep: DeploymentInput, rng: random.Random) -> array:
    """Seconds from a request's own decision to its replica's acceptance
    reaching the router: an actor call's round trip (the send and the
    answer to the rejection protocol) plus the router's own steps between,
    and one more round trip when the router probed queue lengths first.
    A seeded reservoir, from the window's first ROUND_TRIP_ROWS routed
    requests that were routed by their own decision."""
    out = array("d")
    seen = 0
    for event in _routed(reader, f, dep):
        if not event.own or event.decision_ts is None:
            continue
        seconds = event.ts - event.decision_ts
        if not 0.0 <= seconds < MAX_ROUND_TRIP_S:
            continue
        seen += 1
        _keep(out, seen, seconds, rng)
        if seen >= ROUND_TRIP_ROWS:
            break
    return out


def arrivals(conn: Connection, reader: ArrowReader, f: Filters, dep: DeploymentInput) -> Iterator[Arrival]:
    """The deployment's recorded requests in arrival order, tallying each
    replica's recorded requests, hand-offs and queue waits on the way.

    A request arrives at its routed event's `ts` minus its queue wait: routed
    events come in id order, so arrivals are held back (in a heap) until no
    later routed event can hold an earlier arrival: the window's longest
    queue wait plus a second."""
    longest_ms = conn.scalar(select(func.max(routed.c.queue_wait_ms)).where(*_of(routed, f, dep.router_pks)))
    horizon = min((longest_ms or 0.0) / 1000.0 + REORDER_SLACK_S, MAX_REORDER_S)
    held: List[Tuple[float, int, Arrival]] = []
    replicas = dep.replicas
    for order, event in enumerate(_routed(reader, f, dep)):
        wait_ms = event.wait_ms if event.wait_ms is not None and event.wait_ms >= 0 else 0.0
        replica = replicas.get(event.replica_pk)
        if replica is not None:
            tally = replica.recorded
            tally.requests += 1
            tally.queue_wait.add(wait_ms)
            if event.own is False:
                tally.handoffs += 1
        # A hand-off's decision was another request's: its attributes are not this one's.
        attributes = None
        if event.own and event.extra and "attributes" in event.extra:
            attributes = json.loads(event.extra).get("attributes")
        at = event.ts - wait_ms / 1000.0
        heapq.heappush(held, (at, order, Arrival(
            at, event.source_pk, event.request_id or f"replayed-{order}",
            event.internal_request_id or f"replayed-{order}", event.model_id or "", attributes)))
        while held[0][0] + horizon < event.ts:
            yield heapq.heappop(held)[2]
    while held:
        yield heapq.heappop(held)[2]


def stats_changes_stream(reader: ArrowReader, f: Filters, dep: DeploymentInput) -> Iterator[Tuple[float, int, dict]]:
    """(when a router saw it, replica_pk, stats) of every recorded stats change of the deployment,
    in id order (each router that saw a change recorded it: the first sighting counts)."""
    for rows in chunks(reader, _STATS, _of(stats_changes, f, dep.router_pks)):
        for ts, replica_pk, stats in zip(*(rows.column(name).to_pylist() for name in ("ts", "replica_pk", "stats"))):
            yield ts, replica_pk, json.loads(stats)


def model_changes(conn: Connection, reader: ArrowReader, f: Filters,
                  dep: DeploymentInput) -> Iterator[Tuple[float, int, FrozenSet[str]]]:
    """(when a router saw it, replica_pk, models) each time a replica's multiplexed models changed, in id
    order, from the `replicas` events (recorded on every change of a member's models): first what each
    replica held before the window (each source's last event before it, the newest last), then the
    window's changes. Replicas start with no model. Every router instance records every change: the
    first sighting counts, as for stats (`stats_changes_stream`)."""
    replica_pks = {r.replica_id: pk for pk, r in dep.replicas.items()}
    held: Dict[int, FrozenSet[str]] = {}  # replica_pk -> the models it holds
    before = [(ts, members) for ts, _, _, members in memberships_before(conn, sorted(dep.router_pks), f.since)]
    for ts, members in chain(before, _memberships(reader, f, dep)):
        for member in members:
            pk, models = replica_pks.get(member["replica_id"]), frozenset(member.get("model_ids") or ())
            if pk is not None and models != held.get(pk, frozenset()):
                held[pk] = models
                yield ts, pk, models


def _memberships(reader: ArrowReader, f: Filters, dep: DeploymentInput) -> Iterator[Tuple[float, list]]:
    """The deployment's `replicas` events of the window, in id order: (ts, members)."""
    for rows in chunks(reader, _MEMBERSHIPS, _of(memberships, f, dep.router_pks)):
        for ts, members in zip(rows.column("ts").to_pylist(), rows.column("replicas").to_pylist()):
            yield ts, json.loads(members)
