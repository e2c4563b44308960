"""Following what ingest stores, for live readers: `GET /v1/tail`
(`collector.api.tail`), which `routelens tail` and the dashboard's Decisions
view read.

Each batch that stores decisions, routed or completed events numbers itself
in `stored_batches`, in its own transaction (collector/store/models.py says
why the raw tables' ids cannot be followed). A `Follower` keeps the highest
number it has read and, at each poll, asks for the next few batches: one
query on the table's primary key, whichever process stored them (any worker
of `--workers N`, any collector on the database), then their events by id.
It holds no transaction between polls.

Numbers still missing. On PostgreSQL a batch takes its number when its row
is inserted, just before it commits, and the processes that store batches
commit in their own order: number 12 can be read before 11. A number missing
below the highest read is asked for again at each poll for GAP_WAIT_S, then
given up (a rolled back transaction leaves its number unused for good). On
SQLite writers take turns: numbers come in order.

Falling behind. A reader whose client reads slowly asks again only once its
client has taken what it was sent. When the next batch it would read was
stored more than `max_behind_s` ago, it skips to the newest batch and says
how many events it missed (a `missed` record): those of the batches skipped
whose router it follows. A reader resuming after a batch (the stream's
`Last-Event-ID`) is held to the same bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..store.db import IDS_PER_STATEMENT
from ..store.models import completed, decisions, routed, stored_batches
from ..store.types import ranking_layouts, stored_bytes
from .explore import decision_field_conditions
from .figures import Scope, scope
from .filters import Filters

PAGE_BATCHES = 50  # batches read by one query
GAP_WAIT_S = 5.0  # how long a number missing below the highest read is waited for
MAX_GAPS = 1000  # numbers waited for at once; a longer run of missing ones (a jump in the sequence) is given up
ID_BYTES = 16

_seq = stored_batches.c.seq
_BATCH = (_seq, stored_batches.c.stored_at, stored_batches.c.router_pk, stored_batches.c.decision_ids,
          stored_batches.c.routed_ids, stored_batches.c.completed_ids)
_DECISION = (decisions.c.id, decisions.c.ts, decisions.c.request_id, decisions.c.internal_request_id,
             decisions.c.model_id, decisions.c.attempt, stored_bytes(decisions.c.ranking).label("ranking"))
_ROUTED = (routed.c.id, routed.c.ts, routed.c.decision_id, routed.c.replica_pk, routed.c.rank, routed.c.own_ranking,
           routed.c.request_id)
# The decision an outcome belongs to: its routing's, or the one a refusal names (wire format v2).
_OUTCOMES_DECISION = func.coalesce(routed.c.decision_id, completed.c.decision_id)
_COMPLETED = (completed.c.id, completed.c.ts, completed.c.routed_id, completed.c.replica_pk,
              completed.c.internal_request_id, completed.c.latency_ms, completed.c.ok, completed.c.rejected,
              _OUTCOMES_DECISION.label("decision_id"))
_COMPLETED_FROM = completed.outerjoin(routed, routed.c.id == completed.c.routed_id)


def newest(conn: Connection) -> int:
    """The number of the newest batch stored (0: none yet)."""
    return conn.scalar(select(func.coalesce(func.max(_seq), 0)))


class Follower:
    """One reader's place in `stored_batches`, its filters, and the names it knows."""

    def __init__(self, f: Filters, max_behind_s: float, after: int):
        """`after`: the number of the last batch already seen (`newest()`: start now)."""
        self.filters = f
        self.max_behind_s = max_behind_s
        self.last = after  # the highest number read
        self.more = False  # whether the last poll left batches to read (a full page, or a skip)
        self._gaps: Dict[int, float] = {}  # numbers missing below `last` -> when first found missing
        # Routers and replicas by key, as `scope` finds them (every replica, for the names in rankings;
        # --replica is applied to the records), and every key looked up, found or not.
        self._names_filters = replace(f, replicas=())
        self._scope = Scope(routers={})
        self._looked_up: Set[int] = set()
        self._replicas_looked_up: Set[int] = set()

    @property
    def position(self) -> int:
        """The number up to which every batch has been read, or given up: where a reader that comes
        back (`Last-Event-ID`) resumes, maybe seeing again a few batches read past a number missing."""
        return min(self._gaps) - 1 if self._gaps else self.last

    def poll(self, conn: Connection) -> List[dict]:
        """The records of the batches stored since the last poll (at most PAGE_BATCHES of them),
        in the order read; `missed` when this reader had fallen too far behind. A poll that fails
        (the database away) leaves the reader where it was."""
        place = self.last, dict(self._gaps)
        try:
            return self._poll(conn)
        except BaseException:
            self.last, self._gaps = place
            raise

    def _poll(self, conn: Connection) -> List[dict]:
        rows = conn.execute(select(*_BATCH).where(_seq > self.last).order_by(_seq).limit(PAGE_BATCHES)).all()
        self.more = len(rows) == PAGE_BATCHES
        if rows and rows[0].stored_at < time.time() - self.max_behind_s:
            self.more = True
            return [self._skip(conn)]
        late = self._late(conn) if self._gaps else []
        self._note_gaps(rows)
        batches = late + rows
        self._learn(conn, routers=[batch.router_pk for batch in batches])
        return self._records(conn, [batch for batch in batches if batch.router_pk in self._scope.routers])

    def _skip(self, conn: Connection) -> dict:
        """To the newest batch; the events of the batches skipped that this reader follows."""
        head = newest(conn)
        sizes = conn.execute(
            select(stored_batches.c.router_pk,
                   func.sum(func.length(stored_batches.c.decision_ids) + func.length(stored_batches.c.routed_ids)
                            + func.length(stored_batches.c.completed_ids)))
            .where(_seq > self.last, _seq <= head).group_by(stored_batches.c.router_pk)).all()
        self._learn(conn, routers=[router_pk for router_pk, _size in sizes])
        missed = sum(int(size) for router_pk, size in sizes if router_pk in self._scope.routers) // ID_BYTES
        self.last, self._gaps = head, {}
        return {"type": "missed", "count": missed}

    def _late(self, conn: Connection) -> list:
        """The batches of numbers missing before, committed since; the numbers waited for long enough given up."""
        found = conn.execute(select(*_BATCH).where(_seq.in_(sorted(self._gaps))).order_by(_seq)).all()
        for batch in found:
            del self._gaps[batch.seq]
        now = time.monotonic()
        self._gaps = {seq: since for seq, since in self._gaps.items() if now - since < GAP_WAIT_S}
        return found

    def _note_gaps(self, rows) -> None:
        now = time.monotonic()
        for batch in rows:
            if batch.seq - self.last - 1 <= MAX_GAPS - len(self._gaps):
                self._gaps.update(dict.fromkeys(range(self.last + 1, batch.seq), now))
            self.last = batch.seq

    def _learn(self, conn: Connection, routers: Iterable[int] = (), replicas: Iterable[int] = ()) -> None:
        """Looks the routers and replicas up again when one is new to this reader."""
        routers, replicas = set(routers), set(replicas)
        if routers <= self._looked_up and replicas <= self._replicas_looked_up:
            return
        self._scope = scope(conn, self._names_filters)
        self._looked_up |= routers | set(self._scope.routers)
        self._replicas_looked_up |= replicas | set(self._scope.replicas)

    def _replica_id(self, pk: int) -> Optional[str]:
        return self._scope.replicas.get(pk, {}).get("replica_id")

    def _records(self, conn: Connection, batches: list) -> List[dict]:
        """The batches' records, batch after batch (`_batch_records`), those of --replica's replicas."""
        if not batches:
            return []
        # --request-id, --model-id, --reason: a decision passes if its fields match, a routing or outcome
        # if its decision's do, read by joining it (its primary key). Unlike remembering the ids of the
        # decisions sent, this is exact for decisions stored before the reader started or resumed, holds
        # nothing between polls, and costs nothing when these filters are not given.
        where = decision_field_conditions(self.filters)
        routed_from, completed_from = routed, _COMPLETED_FROM
        if where:
            routed_from = routed.join(decisions, decisions.c.id == routed.c.decision_id)
            completed_from = _COMPLETED_FROM.join(decisions, decisions.c.id == _OUTCOMES_DECISION)
        found = Found(
            decisions=_by_id(conn, _DECISION, decisions, [b.decision_ids for b in batches], where=where),
            routed=_by_id(conn, _ROUTED, routed, [b.routed_ids for b in batches], routed_from, where),
            completed=_by_id(conn, _COMPLETED, completed, [b.completed_ids for b in batches], completed_from, where))
        found.rankings = dict(zip(found.decisions, ranking_layouts([bytes(row.ranking)
                                                                    for row in found.decisions.values()])))
        self._learn(conn, replicas={entry[0] for ranking in found.rankings.values() for rank in ranking
                                    for entry in rank}
                    | {row.replica_pk for row in (*found.routed.values(), *found.completed.values())})
        wanted = set(self.filters.replicas)
        return [record for batch in batches for record in self._batch_records(batch, found)
                if not wanted or record["replica"] in wanted]

    def _batch_records(self, batch, found: "Found") -> List[dict]:
        """A batch's decisions, with their routing and outcome when they were in the same batch; the
        routings and outcomes of earlier decisions, each a record of its own; in the order they happened."""
        router = self._scope.routers[batch.router_pk]
        common = {"app": router["app"], "deployment": router["deployment"]}
        records: List[dict] = []
        of_decision: Dict[str, dict] = {}  # decision id -> its record, in this batch
        of_routed: Dict[str, dict] = {}  # routed id -> the record its outcome goes to
        for key, row in _stored(batch.decision_ids, found.decisions):
            ranks = [[self._replica_id(entry[0]) for entry in rank] for rank in found.rankings[key]]
            record = {"type": "decision", "id": row.id, "ts": row.ts, **common, "request_id": row.request_id,
                      "internal_request_id": row.internal_request_id, "model_id": row.model_id,
                      "attempt": row.attempt, "ranks": ranks, "replica": None, "rank": None,
                      "own_ranking": None, "outcome": None}
            of_decision[row.id] = record
            records.append(record)
        for _key, row in _stored(batch.routed_ids, found.routed):
            replica = self._replica_id(row.replica_pk)
            decision = of_decision.get(row.decision_id)
            if decision is not None and decision["replica"] is None:
                decision.update(replica=replica, rank=row.rank, own_ranking=row.own_ranking)
                of_routed[row.id] = decision
                continue
            record = {"type": "routed", "id": row.id, "ts": row.ts, **common, "decision_id": row.decision_id,
                      "request_id": row.request_id, "replica": replica, "rank": row.rank,
                      "own_ranking": row.own_ranking}
            of_routed[row.id] = record
            records.append(record)
        for _key, row in _stored(batch.completed_ids, found.completed):
            outcome = {"ok": row.ok, "latency_ms": row.latency_ms, "rejected": row.rejected}
            decision = of_routed.get(row.routed_id)
            if decision is not None and decision["type"] == "decision" and decision["outcome"] is None:
                decision["outcome"] = outcome
                continue
            records.append({"type": "completed", "id": row.id, "ts": row.ts, **common,
                            "decision_id": row.decision_id, "routed_id": row.routed_id,
                            "internal_request_id": row.internal_request_id,
                            "replica": self._replica_id(row.replica_pk), **outcome})
        records.sort(key=lambda record: record["ts"])
        return records


@dataclass
class Found:
    """The events of a page of batches, by id as stored; the decisions' rankings (stored layout)."""

    decisions: Dict[bytes, Any]
    routed: Dict[bytes, Any]
    completed: Dict[bytes, Any]
    rankings: Dict[bytes, list] = field(default_factory=dict)


def _stored(packed, found: Dict[bytes, Any]) -> Iterator[Tuple[bytes, Any]]:
    """(id, row) of the ids of a `stored_batches` column whose rows are still stored (retention may
    have pruned an imported batch's old events since), in the batch's order."""
    return ((key, found[key]) for key in _ids(packed) if key in found)


def _ids(packed) -> List[bytes]:
    """A `stored_batches` id column: 16-byte ids one after another."""
    packed = bytes(packed)
    return [packed[start:start + ID_BYTES] for start in range(0, len(packed), ID_BYTES)]


def _by_id(conn: Connection, columns, table, packed: List[bytes], from_=None, where=()) -> Dict[bytes, Any]:
    """The rows of `table` (or `from_`, joined to it) with these ids (packed, per batch) that meet
    `where`, by id as stored."""
    keys = [key for ids in packed for key in _ids(ids)]
    key = stored_bytes(table.c.id)
    found: Dict[bytes, Any] = {}
    for start in range(0, len(keys), IDS_PER_STATEMENT):
        query = select(key.label("key"), *columns).where(key.in_(keys[start:start + IDS_PER_STATEMENT]), *where)
        for row in conn.execute(query.select_from(table if from_ is None else from_)):
            found[bytes(row.key)] = row
    return found
