"""A window's recorded decisions, each with the inputs its router had: what a replay gives another router.

Per decision: its deployment and the traced router that made it (source),
the request (ids, multiplexed model id, recorded attributes), the recorded
ranking, the replica that really got the request from it (the `routed`
event that names the decision) with its rank, and every candidate the
router was given, rebuilt with its inputs:

- the candidates are the source's membership at the decision (its latest
  `replicas` event: node, availability zone, max_ongoing_requests, models
  held), plus any ranked replica that membership lacks, in the order Ray
  lists them as far as the record tells (`joined_order`);
- a ranked replica's queue length, routing stats and their ages are the
  decision's own record of them;
- an unranked one's (Ray passes every replica; pow-2 ranks two) are the
  latest this source recorded before: its routing stats from its `stats`
  events (or an earlier decision), its queue length from the last decision
  that ranked it, aged since. A length never recorded is unknown, as
  a replica missing from Ray's cache is.

Decisions are read as the export reads them (`collector.export.outcomes`:
key-range chunks, outcomes matched by id in Arrow, a thread reading ahead),
membership and stats events of each chunk's time span beside them, so
memory stays flat however long the window. State before the window is
looked for up to `LOOKBACK_S` earlier, and each source's last membership
before that.
"""

from __future__ import annotations

import json
import math
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import pyarrow as pa
from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from ..export.arrow_reader import ArrowReader
from ..export.chunks import BLOB, Reading, chunks, in_background
from ..export.convert import request_ids, uuids
from ..export.outcomes import DECISIONS, decision_chunks
from ..query.explore import id_bytes, in_window
from ..query.figures import Scope, scope
from ..query.filters import Filters
from ..store.models import Replica, Source, decisions, memberships, stats_changes
from ..store.types import AGE_SOURCE_NAMES, ranking_layouts, stored_bytes

# How far before the window membership and stats events are read, for the state its first decisions saw.
LOOKBACK_S = 3600.0
DEFAULT_MAX_ONGOING_REQUESTS = 5  # Ray's (ray.serve._private.constants), for a replica no membership event describes


class Member(NamedTuple):
    """A replica as a `replicas` event describes it."""
    replica_id: str
    node_id: Optional[str]
    availability_zone: Optional[str]
    max_ongoing_requests: Optional[int]
    model_ids: Tuple[str, ...]


class StatsSeen(NamedTuple):
    stats: Dict[str, Any]
    at: Optional[float]  # when collected (stamped) or first seen (observed); None: unknown
    age_source: Optional[str]  # "stamped" | "observed" | None


class QueueLenSeen(NamedTuple):
    queue_len: int
    at: float  # the time the router's cache entry dates from


class Candidate(NamedTuple):
    """One candidate's inputs at a decision."""
    replica_id: str
    node_id: Optional[str]
    availability_zone: Optional[str]
    max_ongoing_requests: Optional[int]
    model_ids: Tuple[str, ...]
    queue_len: Optional[int]
    queue_len_age_s: Optional[float]
    stats: Dict[str, Any]
    stats_age_s: Optional[float]
    stats_age_source: Optional[str]


@dataclass(frozen=True)
class SourceInfo:
    """A traced router instance (one per process that routed to the deployment), as stored."""
    pk: int
    router_pk: Optional[int]
    node_id: Optional[str]
    handle_source: Optional[str]


def sources(conn: Connection, sc: Scope) -> Dict[int, SourceInfo]:
    """The traced router instances of the routers in scope, by key."""
    if not sc.routers:
        return {}
    return {row.pk: SourceInfo(row.pk, row.router_pk, row.node_id, row.handle_source) for row in conn.execute(
        select(Source.pk, Source.router_pk, Source.node_id, Source.handle_source)
        .where(Source.router_pk.in_(sorted(sc.routers))))}


class RecordedDecision(NamedTuple):
    id: str
    ts: float
    app: str
    deployment: str
    router_class: str  # the recording router's, module.QualName
    source: SourceInfo
    request_id: Optional[str]
    internal_request_id: Optional[str]
    model_id: Optional[str]
    attempt: int  # 0-based choose_replicas call for the request
    attributes: Optional[Dict[str, Any]]
    reason: Optional[str]  # what the recording router said of the decision (routelens_explain), or None
    n_candidates: int  # as recorded
    ranks: List[List[str]]  # the recorded ranking, replica ids, rank 0 first
    members: Tuple[Member, ...]  # the candidates, in membership order
    membership_inferred: bool  # the source's membership was not known, or did not match n_candidates
    # Snapshots (never changed once made): replica id -> what the source last recorded of it.
    stats: Mapping[str, StatsSeen]
    queue_lens: Mapping[str, QueueLenSeen]
    # The replicas whose queue length this decision recorded anew: all that changed in `queue_lens`
    # since the source's previous decision (a reader of every decision can follow the changes alone).
    queue_lens_updated: Tuple[str, ...]
    chosen: Optional[str]  # the replica that got the request from this decision (routed), or None
    chosen_rank: Optional[int]  # its rank, as recorded
    own_ranking: Optional[bool]  # false: a FIFO hand-off to another request

    def candidates(self) -> List[Candidate]:
        """Each candidate's inputs, as the router had them (ages at this decision)."""
        out = []
        for member in self.members:
            queue, stats = self.queue_lens.get(member.replica_id), self.stats.get(member.replica_id)
            out.append(Candidate(
                *member, queue_len=queue.queue_len if queue else None,
                queue_len_age_s=self.ts - queue.at if queue else None, stats=stats.stats if stats else {},
                stats_age_s=self.ts - stats.at if stats and stats.at is not None else None,
                stats_age_source=stats.age_source if stats else None))
        return out


_DECISIONS = Reading({**DECISIONS.columns, "extra": (decisions.c.extra, pa.string())})
_MEMBERSHIPS = Reading({"id": (stored_bytes(memberships.c.id), BLOB), "ts": (memberships.c.ts, pa.float64()),
                        "source_pk": (memberships.c.source_pk, pa.int64()),
                        "replicas": (memberships.c.replicas, pa.string())})
_STATS = Reading({"id": (stored_bytes(stats_changes.c.id), BLOB), "ts": (stats_changes.c.ts, pa.float64()),
                  "source_pk": (stats_changes.c.source_pk, pa.int64()),
                  "replica_pk": (stats_changes.c.replica_pk, pa.int64()),
                  "stats": (stats_changes.c.stats, pa.string()),
                  "collected_at": (stats_changes.c.collected_at, pa.float64())})
_MEMBERSHIP, _STATS_CHANGE = 0, 1  # kinds of state event


def recorded_decisions(conn: Connection, f: Filters) -> Iterator[RecordedDecision]:
    """The window's decisions that match the filters, oldest first, each with its candidates' inputs."""
    sc = scope(conn, f)
    if not sc.routers:
        return
    # Every replica of the deployments, not only those a replica filter selects (they are all candidates).
    replicas = scope(conn, replace(f, replicas=())).replicas if f.replicas else sc.replicas
    replica_ids = _ReplicaIds({pk: info["replica_id"] for pk, info in replicas.items()})
    state = _State(sc, sources(conn, sc), replicas, replica_ids)
    reader = ArrowReader(conn)
    try:
        with closing(in_background(_chunks(conn, reader, f, sc, replica_ids))) as read:
            for chunk, events in read:
                yield from state.decisions(chunk, events)
    finally:
        reader.close()


class _ReplicaIds(dict):
    """Replica key -> id. Replicas that joined after the reading began are added by the reading
    thread, chunk by chunk; one still unknown (it cannot be: ingest stores a replica before its
    events) is named by its key rather than looked up from this thread."""

    def __missing__(self, pk: int) -> str:
        return f"<replica {pk}>"


def _chunks(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
            replica_ids: _ReplicaIds) -> Iterator[tuple]:
    """Each chunk of decisions (with their outcome), and the membership and
    stats events up to its last decision's time, in time order (run by the
    read-ahead thread: every use of the connection and the reader is here)."""
    routers = sorted(sc.routers)
    deployment_pks = sorted({router["deployment_pk"] for router in sc.routers.values()})
    start = max(f.since - LOOKBACK_S, 0.0)
    events = memberships_before(conn, routers, start)
    for chunk in decision_chunks(conn, reader, f, sc, with_rejections=False, reading=_DECISIONS):
        # Replicas that joined meanwhile (keys only grow); a PostgreSQL read sees more than one snapshot.
        replica_ids.update(conn.execute(select(Replica.pk, Replica.replica_id).where(
            Replica.pk > max(replica_ids, default=0), Replica.deployment_pk.in_(deployment_pks))).all())
        end = math.nextafter(max(chunk.rows.column("ts").to_pylist()), math.inf)
        if end > start:
            for rows in chunks(reader, _MEMBERSHIPS, [*in_window(memberships, start, end),
                                                     memberships.c.router_pk.in_(routers)]):
                events += [(ts, _MEMBERSHIP, source_pk, json.loads(members)) for ts, source_pk, members in zip(
                    *(rows.column(name).to_pylist() for name in ("ts", "source_pk", "replicas")))]
            for rows in chunks(reader, _STATS, [*in_window(stats_changes, start, end),
                                               stats_changes.c.router_pk.in_(routers)]):
                events += [(ts, _STATS_CHANGE, source_pk, (replica_pk, stats, collected_at))
                           for ts, source_pk, replica_pk, stats, collected_at in zip(*(
                               rows.column(name).to_pylist()
                               for name in ("ts", "source_pk", "replica_pk", "stats", "collected_at")))]
            start = end
        events.sort(key=lambda event: event[:2])
        yield chunk, events
        events = []


def memberships_before(conn: Connection, routers: List[int], start: float) -> List[tuple]:
    """Each source's last membership event before `start` (who its members were then)."""
    m = memberships.c
    latest = (select(m.source_pk, func.max(m.ts).label("ts")).where(m.router_pk.in_(routers), m.ts < start)
              .group_by(m.source_pk).subquery())
    rows = conn.execute(select(m.ts, m.source_pk, m.replicas)
                        .join(latest, and_(m.source_pk == latest.c.source_pk, m.ts == latest.c.ts))
                        .order_by(id_bytes(memberships)))
    return [(ts, _MEMBERSHIP, source_pk, json.loads(members)) for ts, source_pk, members in rows]


class _SourceState:
    """What one traced router had recorded so far. `stats` and `queue_lens`
    are replaced, never changed, so that each decision keeps its snapshot."""

    __slots__ = ("members", "member_ids", "stats", "queue_lens")

    def __init__(self):
        self.members: Optional[Tuple[Member, ...]] = None
        self.member_ids: frozenset = frozenset()
        self.stats: Dict[str, StatsSeen] = {}
        self.queue_lens: Dict[str, QueueLenSeen] = {}


class _State:
    def __init__(self, sc: Scope, sources: Dict[int, SourceInfo], replicas: Dict[int, dict],
                 replica_ids: "_ReplicaIds"):
        self._sc = sc
        self._sources = sources
        self._replica_ids = replica_ids
        self._by_source: Dict[int, _SourceState] = {}
        # Replicas by id, per deployment, as last reported: for candidates no membership event describes.
        self._known: Dict[Tuple[int, str], dict] = {(info["deployment_pk"], info["replica_id"]): info
                                                    for info in replicas.values()}
        # deployment_pk -> (members, their ids, from, until): the members inferred for decisions in [from, until).
        self._inferred: Dict[int, tuple] = {}

    def _source(self, pk: int) -> _SourceState:
        found = self._by_source.get(pk)
        if found is None:
            found = self._by_source[pk] = _SourceState()
        return found

    def _apply(self, event: tuple) -> None:
        ts, kind, source_pk, payload = event
        source = self._source(source_pk)
        if kind == _MEMBERSHIP:
            info = self._sources.get(source_pk)
            router = self._sc.routers.get(info.router_pk) if info is not None else None
            deployment_pk = router["deployment_pk"] if router is not None else None
            ordered = sorted(payload, key=lambda r: joined_order(
                self._known.get((deployment_pk, r["replica_id"]), {}).get("added_at"), r["replica_id"]))
            source.members = tuple(Member(r["replica_id"], r.get("node_id"), r.get("availability_zone"),
                                          r.get("max_ongoing_requests"), tuple(r.get("model_ids") or ()))
                                   for r in ordered)
            source.member_ids = frozenset(member.replica_id for member in source.members)
        else:
            replica_pk, stats, collected_at = payload
            seen = StatsSeen(json.loads(stats) if stats else {}, collected_at if collected_at is not None else ts,
                             "stamped" if collected_at is not None else "observed")
            source.stats = {**source.stats, self._replica_ids[replica_pk]: seen}

    def decisions(self, chunk, events: List[tuple]) -> Iterator[RecordedDecision]:
        rows, routing = chunk.rows, chunk.routing
        columns = {name: rows.column(name).to_pylist() for name in
                   ("ts", "router_pk", "source_pk", "model_id", "attempt", "n_candidates", "extra", "reason")}
        ids = uuids(rows.column("id")).to_pylist()
        request, internal = (request_ids(rows.column(name)).to_pylist()
                             for name in ("request_id", "internal_request_id"))
        layouts = ranking_layouts(rows.column("ranking").to_pylist())
        chosen_pks, chosen_ranks, own = (routing.column(name).to_pylist()
                                         for name in ("replica_pk", "rank", "own_ranking"))
        replica_ids, routers = self._replica_ids, self._sc.routers
        pending = iter(events)
        event = next(pending, None)
        for i, ts in enumerate(columns["ts"]):
            while event is not None and event[0] <= ts:
                self._apply(event)
                event = next(pending, None)
            source_pk = columns["source_pk"][i]
            source = self._source(source_pk)
            ranks, updated = self._read_ranking(source, layouts[i], ts)
            router = routers[columns["router_pk"][i]]
            members, inferred = self._members(source, router["deployment_pk"], ranks, ts)
            extra = columns["extra"][i]
            chosen_pk = chosen_pks[i]
            yield RecordedDecision(
                id=ids[i], ts=ts, app=router["app"], deployment=router["deployment"],
                router_class=router["router_class"],
                source=self._sources.get(source_pk) or SourceInfo(source_pk, None, None, None),
                request_id=request[i], internal_request_id=internal[i], model_id=columns["model_id"][i] or None,
                attempt=columns["attempt"][i], attributes=json.loads(extra).get("attributes") if extra else None,
                reason=columns["reason"][i], n_candidates=columns["n_candidates"][i], ranks=ranks, members=members,
                membership_inferred=inferred or len(members) != columns["n_candidates"][i],
                stats=source.stats, queue_lens=source.queue_lens, queue_lens_updated=updated,
                chosen=replica_ids[chosen_pk] if chosen_pk is not None else None, chosen_rank=chosen_ranks[i],
                own_ranking=own[i])
        for event in ([event] if event is not None else []) + list(pending):
            self._apply(event)  # events after the chunk's last decision (its time is not in order with its id's)

    def _read_ranking(self, source: _SourceState, layout: list, ts: float) -> Tuple[List[List[str]], Tuple[str, ...]]:
        """The ranking's replica ids, and those whose queue length it recorded anew; the inputs
        it records update the source's state."""
        replica_ids = self._replica_ids
        ranks = []
        queue_lens = stats_seen = None
        updated = []
        for entries in layout:
            rank = []
            for entry in entries:
                replica_id = replica_ids[entry[0]]
                rank.append(replica_id)
                if len(entry) == 1:  # ranked, without inputs
                    continue
                _, queue_len, queue_len_age_us, stats_age_us, age_source, stats = entry
                if queue_len is not None:
                    seen = QueueLenSeen(queue_len, ts - queue_len_age_us / 1e6 if queue_len_age_us is not None else ts)
                    if source.queue_lens.get(replica_id) != seen:
                        queue_lens = queue_lens if queue_lens is not None else dict(source.queue_lens)
                        queue_lens[replica_id] = seen
                        updated.append(replica_id)
                stats = stats or {}
                known = source.stats.get(replica_id)
                if known is None or known.stats != stats:
                    stats_seen = stats_seen if stats_seen is not None else dict(source.stats)
                    stats_seen[replica_id] = StatsSeen(
                        stats, ts - stats_age_us / 1e6 if stats_age_us is not None else None,
                        AGE_SOURCE_NAMES.get(age_source))
            ranks.append(rank)
        if queue_lens is not None:
            source.queue_lens = queue_lens
        if stats_seen is not None:
            source.stats = stats_seen
        return ranks, tuple(updated)

    def _members(self, source: _SourceState, deployment_pk: int, ranks: List[List[str]],
                 ts: float) -> Tuple[Tuple[Member, ...], bool]:
        """The candidates: the source's membership, with any ranked replica it lacks (then inferred)."""
        if source.members is not None:
            members, ids, inferred = source.members, source.member_ids, False
        else:  # no membership event seen: the deployment's replicas that were members then
            members, ids = self._members_at(deployment_pk, ts)
            inferred = True
        missing = [replica_id for rank in ranks for replica_id in rank if replica_id not in ids]
        if missing:
            members = members + tuple(self._member(self._known.get((deployment_pk, replica_id),
                                                                   {"replica_id": replica_id}))
                                      for replica_id in dict.fromkeys(missing))
            inferred = True
        return members, inferred

    def _members_at(self, deployment_pk: int, ts: float) -> Tuple[Tuple[Member, ...], frozenset]:
        """The deployment's replicas that were members at `ts`, as the replicas table dates their
        membership; kept until the next time one joins or leaves."""
        found = self._inferred.get(deployment_pk)
        if found is None or not found[2] <= ts < found[3]:
            known = sorted((info for info in self._known.values() if info["deployment_pk"] == deployment_pk),
                           key=lambda info: joined_order(info["added_at"], info["replica_id"]))
            members = tuple(self._member(info) for info in known if _member_at(info, ts))
            changes = [at for info in known for at in (info.get("added_at"), info.get("removed_at")) if at is not None]
            found = self._inferred[deployment_pk] = (
                members, frozenset(m.replica_id for m in members),
                max((at for at in changes if at <= ts), default=-math.inf),
                min((at for at in changes if at > ts), default=math.inf))
        return found[0], found[1]

    @staticmethod
    def _member(info: dict) -> Member:
        return Member(info["replica_id"], info.get("node_id"), info.get("availability_zone"),
                      info.get("max_ongoing_requests"), tuple(info.get("model_ids") or ()))


def joined_order(added_at: Optional[float], replica_id: str) -> Tuple[float, str]:
    """A replica's place in the list Ray gives routers, as far as the record tells: Ray lists a
    deployment's replicas as they joined (its replicas table dates that), then by id (membership
    events list them by id). It matters: routers break ties by it (`min()` takes the first of equals)."""
    return (added_at if added_at is not None else math.inf, replica_id)


def _member_at(info: dict, ts: float) -> bool:
    added, removed = info.get("added_at"), info.get("removed_at")
    return added is not None and added <= ts and (removed is None or removed > ts)
