"""Writing validated batches: one transaction per batch, idempotent by event id.

`Ingestor.ingest` stores a `ValidBatch` (see `collector.ingest.schema`) in three steps:

1. resolve names to keys: deployment, router (deployment x class x labels),
   source and replicas. These rows are committed on their own, first: they
   are idempotent upserts, cached in memory, and harmless if the batch
   transaction then fails;
2. in one transaction: insert the events; feed those actually inserted to
   the rollups and the membership; record the batch number and the
   source's counters; number the batch in `stored_batches` with the ids of
   its decisions and outcomes, for live readers (`GET /v1/tail`);
3. commit. Either all of the batch is stored or none of it.

Step 2 first assumes that every event is new (almost every batch is): it
inserts them all in bulk (SQLite: executemany; PostgreSQL: COPY) and learns
that some were stored already (a re-sent batch) from the count of rows
inserted, or from COPY's unique violation. Then it rolls back and writes the
batch again, looking up which ids are stored and inserting only the others.

This runs for every event received, tens of thousands a second: rows are
plain tuples written with driver SQL (no per-row SQLAlchemy processing), and
the code on the way is written for speed (see `bench/ingest.py`).

On SQLite the transaction begins IMMEDIATE and a lock serializes writers
of this process, so concurrent batches queue instead of failing; writers in
other processes (the workers of `--workers N`, the pruner, other collectors
on the file) wait for SQLite's lock, up to its busy timeout. On Postgres
several collectors can write at once; rollup rows are upserted in key order
so that two transactions never wait on each other in a cycle, and batches of
one source are written one at a time (an advisory lock). On both, the rows
of step 1 are inserted with ON CONFLICT DO NOTHING and read back, so that
two processes registering the same source or replica at once agree on it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from itertools import chain, count
from operator import add, itemgetter
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import msgspec
import psycopg
from sqlalchemy import bindparam, case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ..settings import STORED_BATCHES_KEEP_S
from ..store.db import IDS_PER_STATEMENT, is_sqlite, writer
from ..store.models import (
    OTHER_REASONS,
    PREFIX_GRAINS,
    PREFIX_ROLLUP_KEY,
    PREFIX_ROLLUP_VALUES,
    RAW_TABLES,
    REASON_ROLLUP_KEY,
    ROLLUP_KEY,
    ROLLUP_MAXIMA,
    Deployment,
    Replica,
    Router,
    Source,
    SourceBatch,
    completed,
    decisions,
    memberships,
    prefix_rollups,
    reason_rollups,
    routed,
    stats_changes,
    stored_batches,
)
from ..store.prefix_pairs import batch_pairs, grouped_pairs
from ..store.types import ranking_bytes, request_ids_bytes, stored_bytes
from .rollups import MAX_REASONS_PER_DEPLOYMENT, ROLLUP_VALUES, RollupDelta, reason_tuples
from .schema import (
    Batch,
    CompletedEvent,
    DecisionEvent,
    Event,
    ReplicasEvent,
    RoutedEvent,
    StatsEvent,
    ValidBatch,
    labels_key,
)

_json = msgspec.json.Encoder()

# Each process deletes the `stored_batches` rows past keeping (settings.STORED_BATCHES_KEEP_S) in one of
# every PRUNE_STORED_BATCHES_EVERY batches it stores, in that batch's transaction: a few milliseconds.
PRUNE_STORED_BATCHES_EVERY = 1000

# A replica's membership as a `replicas` event sets it, in this order (see `Ingestor._apply_membership`).
_MEMBERSHIP_COLUMNS = (Replica.node_id, Replica.availability_zone, Replica.max_ongoing_requests, Replica.model_ids,
                       Replica.added_at, Replica.removed_at)
_MEMBERSHIP_KEYS = tuple(f"new_{column.key}" for column in _MEMBERSHIP_COLUMNS)  # their bound parameters


# Column types as PostgreSQL names them (SQLAlchemy's DDL name -> psycopg's), for a binary COPY.
_PG_COPY_TYPES = {"BYTEA": "bytea", "FLOAT": "float8", "INTEGER": "int4", "SMALLINT": "int2", "BOOLEAN": "bool",
                  "VARCHAR": "varchar", "TEXT": "text"}


def _pg_types(table) -> List[str]:
    return [_PG_COPY_TYPES[column.type.compile(dialect=postgresql.dialect()).split("(")[0]] for column in table.c]


class SourceConflict(ValueError):
    """A batch whose source_id is registered for another deployment, router class or labels."""


class _KnownSource(NamedTuple):
    source_pk: int
    router_pk: int
    deployment_pk: int
    identity: Tuple[str, str, str, str]  # app, deployment, router class, labels key


def _stored_source(connection: Connection, source_id: str) -> Optional[_KnownSource]:
    row = connection.execute(
        select(Source.pk, Source.router_pk, Router.deployment_pk, Deployment.app, Deployment.deployment,
               Router.router_class, Router.labels_key)
        .join(Router, Router.pk == Source.router_pk).join(Deployment, Deployment.pk == Router.deployment_pk)
        .where(Source.source_id == source_id)).first()
    return None if row is None else _KnownSource(row[0], row[1], row[2], tuple(row[3:]))


class _SomeStored(Exception):
    """Raised inside a batch's first write attempt: some of its events are stored already."""


class SourceBefore(NamedTuple):
    """A source's record as a batch found it: whether the batch's number is new, and the
    highest batch number received before it with the counters that batch carried."""

    new_seq: bool
    last_seq: int
    produced: Optional[int]
    dropped: Dict[str, int]


@dataclass
class StoredBatch:
    """What one batch stored, for the collector's routing metrics
    (`collector.api.routing_metrics`), which count what was stored, once: a
    re-sent batch's events are not in `events`."""

    batch: Batch  # the batch as received: its source, number and counters
    events: List[Event]  # the events stored, in the batch's order
    stored_by_type: Dict[str, int]
    identity: Tuple[str, str, str, str]  # app, deployment, router class, labels key
    replica_pks: Dict[str, int]
    rollup_rows: List[tuple]  # `RollupDelta.tuples()` of the stored events
    reason_rows: List[tuple]  # `reason_tuples()` of the stored decisions (reason_rollups' rows)
    delta: RollupDelta
    before: SourceBefore
    received_at: float


@dataclass
class IngestResult:
    stored: int
    duplicates: int
    stored_by_type: Dict[str, int]
    detail: Optional[StoredBatch] = None


# Event type -> the table that stores it.
TABLE_OF_TYPE = {"decision": decisions, "routed": routed, "completed": completed, "stats": stats_changes,
                 "replicas": memberships}


def _text(value) -> Optional[str]:
    return None if value is None else _json.encode(value).decode()


class _MultiRowInsert:
    """An INSERT of many rows into SQLite, in statements of up to MAX_ROWS
    rows each (`INSERT ... VALUES (...), (...), ...`), written for speed:

    - executemany steps SQLite once per row and releases the GIL around each
      step. With another thread busy meanwhile (the server parses the next
      batch while this one is written), taking the GIL back can wait up to
      Python's switch interval (5 ms) each time: a batch crawled, holding
      SQLite's write lock. One statement per 128 rows releases it 8 times
      per 1000 rows instead of 1000, and is faster anyway (3.8 us a row, not
      4.3). Statements hold a power of two of rows, so that few distinct
      ones are prepared (the driver caches them);
    - columns that are NULL in every row (say `model_id` and `extra`, in
      most batches) are left out of the statement, as they default to NULL:
      the sqlite3 module binds a None through its adapter look-up, about
      0.5 us each, as long as inserting the rest of a decision's row."""

    MAX_ROWS = 128  # x a rollup row's columns (127; at most 255) stays within SQLite's 32766 parameters

    def __init__(self, table: str, columns: Sequence[str], tail: str = ""):
        self._table, self._columns, self._tail = table, tuple(columns), tail
        self._statements: Dict[Tuple[Tuple[int, ...], int], str] = {}

    def _statement(self, present: Tuple[int, ...], rows: int) -> str:
        statement = self._statements.get((present, rows))
        if statement is None:
            names = ", ".join(f'"{self._columns[i]}"' for i in present)
            row = f"({', '.join(['?'] * len(present))})"
            statement = self._statements[(present, rows)] = (
                f"INSERT INTO {self._table} ({names}) VALUES {', '.join([row] * rows)} {self._tail}")
        return statement

    def execute(self, connection: Connection, rows: List[tuple]) -> int:
        """Insert `rows` (tuples in column order) in the connection's transaction;
        the number of rows inserted."""
        if not rows:
            return 0
        present = tuple(i for i in range(len(self._columns)) if any(row[i] is not None for row in rows))
        if len(present) < len(self._columns):
            rows = list(map(itemgetter(*present), rows)) if len(present) > 1 else [(row[present[0]],) for row in rows]
        sqlite_connection = connection.connection.driver_connection
        inserted, done, size = 0, 0, self.MAX_ROWS
        while done < len(rows):
            while size > len(rows) - done:
                size //= 2
            cursor = sqlite_connection.execute(self._statement(present, size),
                                               list(chain.from_iterable(rows[done:done + size])))
            inserted += cursor.rowcount
            done += size
        return inserted


_ADDED_AT = len(ROLLUP_KEY) + len(ROLLUP_VALUES) - len(ROLLUP_MAXIMA)  # where a rollup row's maxima begin


def _sparse(row: tuple) -> Dict[str, float]:
    """A rollup row (`RollupDelta.tuples()`) as PostgreSQL's upsert takes it:
    its key, its counters that are not 0 and its maxima that are known."""
    out = dict(zip(ROLLUP_KEY, row))
    for name, value in zip(ROLLUP_VALUES, row[len(ROLLUP_KEY):_ADDED_AT]):
        if value:
            out[name] = value
    for name, value in zip(ROLLUP_MAXIMA, row[_ADDED_AT:]):
        if value is not None:
            out[name] = value
    return out


def _stored_request_ids(events: Sequence[Event]) -> Dict[Optional[str], Optional[bytes]]:
    """Each request id of a batch -> its stored form, converted together
    (see `request_ids_bytes`) and once each: a request's ids recur in its
    decisions, routed and completed events. A client may choose its request
    ids, while internal ones are Ray's UUIDs: the two are converted apart, so
    that odd request ids leave the internal ones their fast path."""
    external, internal = set(), set()
    for event in events:
        if isinstance(event, (DecisionEvent, RoutedEvent)):
            external.add(event.request_id)
            internal.add(event.internal_request_id)
        elif isinstance(event, CompletedEvent):
            internal.add(event.internal_request_id)
    stored: Dict[Optional[str], Optional[bytes]] = {None: None}
    for ids in (external, internal):
        ids.discard(None)
        texts = list(ids)
        stored.update(zip(texts, request_ids_bytes(texts)))
    return stored


class Ingestor:
    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self._clock = clock
        self._sqlite = is_sqlite(engine)
        self._dialect_insert = sqlite.insert if self._sqlite else postgresql.insert
        self._write_lock = threading.Lock() if self._sqlite else None
        self._least = func.min if self._sqlite else func.least  # of two values
        self._sources: Dict[str, _KnownSource] = {}
        self._replicas: Dict[Tuple[int, str], int] = {}
        # deployment_pk -> the reasons its decisions are counted under by name in reason_rollups (at most
        # MAX_REASONS_PER_DEPLOYMENT), read from the database the first time the deployment explains.
        self._reasons: Dict[int, Set[str]] = {}
        self._cache_lock = threading.Lock()
        self._rollup_upsert = self._make_rollup_upsert()
        self._record_batch_statements = self._make_record_batch()
        self._reason_upsert = self._adding_upsert(reason_rollups, REASON_ROLLUP_KEY, ("decisions",))
        self._prefix_upsert = self._adding_upsert(prefix_rollups, PREFIX_ROLLUP_KEY, PREFIX_ROLLUP_VALUES)
        self._number_batch = stored_batches.insert()
        self._prune_numbered = delete(stored_batches).where(stored_batches.c.stored_at < bindparam("oldest"))
        self._batches_numbered = count(1)
        # One replica's membership, executed for many at once (executemany).
        self._set_membership = update(Replica).where(Replica.pk == bindparam("member_pk")).values(
            dict(zip(_MEMBERSHIP_COLUMNS, map(bindparam, _MEMBERSHIP_KEYS))))
        # Raw rows: on SQLite, multi-row INSERTs; on PostgreSQL, COPY, and
        # executemany's INSERTs when some ids may be stored already.
        self._sqlite_insert = {
            table.name: _MultiRowInsert(table.name, table.c.keys(),
                                        "ON CONFLICT (id) DO NOTHING")
            for table in RAW_TABLES
        }
        self._insert_sql = {
            table.name: f"INSERT INTO {table.name} ({', '.join(table.c.keys())}) "
                        f"VALUES ({', '.join(['%s'] * len(table.c))}) ON CONFLICT (id) DO NOTHING"
            for table in RAW_TABLES
        }
        # Binary COPY: it costs the collector a quarter less CPU than text, and needs each column's type.
        self._copy_sql = {table.name: f"COPY {table.name} ({', '.join(table.c.keys())}) FROM STDIN (FORMAT BINARY)"
                          for table in RAW_TABLES}
        self._copy_types = {table.name: _pg_types(table) for table in RAW_TABLES}

    # --- step 1: keys ---

    def _keys(self, valid: ValidBatch) -> Tuple[int, int, int, Dict[str, int]]:
        info = valid.batch.source
        identity = (info.app, info.deployment, info.router_class, labels_key(info.labels))
        known = self._sources.get(info.source_id)
        if known is None:
            known = self._resolve_source(valid, identity)
        if known.identity != identity:
            raise SourceConflict(
                f"source.source_id {info.source_id!r} already reports app {known.identity[0]!r}, deployment "
                f"{known.identity[1]!r}, router_class {known.identity[2]!r}, labels {known.identity[3]}; "
                f"a source is one router instance and keeps them: a changed router needs a new source_id")
        deployment_pk = known.deployment_pk
        wanted = set()
        for event in valid.batch.events:
            if isinstance(event, DecisionEvent):
                wanted.update(*event.ranks)
            elif isinstance(event, ReplicasEvent):
                wanted.update(member.replica_id for member in event.replicas)
            else:
                wanted.add(event.replica_id)
        missing = [replica_id for replica_id in wanted if (deployment_pk, replica_id) not in self._replicas]
        if missing:
            self._resolve_replicas(deployment_pk, missing, valid)
        replica_pks = {replica_id: self._replicas[(deployment_pk, replica_id)] for replica_id in wanted}
        return known.source_pk, known.router_pk, deployment_pk, replica_pks

    def _resolve_source(self, valid: ValidBatch, identity: Tuple[str, str, str, str]) -> "_KnownSource":
        """The source's keys, creating its deployment, router and source rows the first time."""
        info = valid.batch.source
        now = self._clock()
        insert = self._dialect_insert
        with self.engine.connect() as connection, writer(connection).begin():
            known = _stored_source(connection, info.source_id)
            if known is None:
                connection.execute(insert(Deployment).values(app=info.app, deployment=info.deployment)
                                   .on_conflict_do_nothing())
                deployment_pk = connection.scalar(select(Deployment.pk).where(
                    Deployment.app == info.app, Deployment.deployment == info.deployment))
                key = identity[3]
                connection.execute(insert(Router).values(
                    deployment_pk=deployment_pk, router_class=info.router_class, labels=key, labels_key=key,
                ).on_conflict_do_nothing())
                router_pk = connection.scalar(select(Router.pk).where(
                    Router.deployment_pk == deployment_pk, Router.router_class == info.router_class,
                    Router.labels_key == key))
                connection.execute(insert(Source).values(
                    source_id=info.source_id, router_pk=router_pk, handle_source=info.handle_source,
                    node_id=info.node_id, actor_id=info.actor_id, hostname=info.hostname, pid=info.pid,
                    tracer_version=info.tracer_version, first_seen=now, last_seen=now, last_seq=0, dropped="{}",
                ).on_conflict_do_nothing())
                # Another collector may have registered it meanwhile: what is stored is what counts.
                known = _stored_source(connection, info.source_id)
        with self._cache_lock:
            self._sources[info.source_id] = known
        return known

    def _resolve_replicas(self, deployment_pk: int, replica_ids: List[str], valid: ValidBatch) -> None:
        first_seen = min((event.ts for event in valid.batch.events), default=self._clock())
        with self.engine.connect() as connection, writer(connection).begin():
            connection.execute(
                self._dialect_insert(Replica).on_conflict_do_nothing(),
                [{"deployment_pk": deployment_pk, "replica_id": replica_id, "first_seen": first_seen}
                 for replica_id in sorted(replica_ids)],
            )
            rows = [row for start in range(0, len(replica_ids), IDS_PER_STATEMENT)
                    for row in connection.execute(select(Replica.replica_id, Replica.pk).where(
                        Replica.deployment_pk == deployment_pk,
                        Replica.replica_id.in_(replica_ids[start:start + IDS_PER_STATEMENT])))]
        with self._cache_lock:
            for replica_id, pk in rows:
                self._replicas[(deployment_pk, replica_id)] = pk

    def _named_reasons(self, deployment_pk: int, reasons: Set[str]) -> Set[str]:
        """The reasons of the deployment counted by name, `reasons` among them while there is room.
        Collectors that admit new reasons at the same moment may together pass the bound by a few."""
        with self._cache_lock:
            named = self._reasons.get(deployment_pk)
        if named is None:
            with self.engine.connect() as connection:
                named = set(connection.scalars(
                    select(reason_rollups.c.reason).distinct()
                    .join(Router, Router.pk == reason_rollups.c.router_pk)
                    .where(Router.deployment_pk == deployment_pk, reason_rollups.c.grain == 3600,
                           reason_rollups.c.reason != OTHER_REASONS)))
        with self._cache_lock:
            named = self._reasons.setdefault(deployment_pk, named)
            for reason in sorted(reasons - named):
                if len(named) >= MAX_REASONS_PER_DEPLOYMENT:
                    break
                named.add(reason)
            return set(named)

    # --- step 2: the batch transaction ---

    def ingest(self, valid: ValidBatch) -> IngestResult:
        received = len(valid.batch.events)
        valid = _first_of_each_id(valid)
        source_pk, router_pk, deployment_pk, replica_pks = self._keys(valid)
        rows = _Rows(valid, source_pk, router_pk, replica_pks)
        if rows.reasons:
            rows.named_reasons = self._named_reasons(deployment_pk, rows.reasons)
        identity = self._sources[valid.batch.source.source_id].identity
        if self._write_lock is not None:
            with self._write_lock:
                detail = self._write_once(valid, rows, source_pk, deployment_pk, identity)
        else:
            detail = self._write_once(valid, rows, source_pk, deployment_pk, identity)
        stored = len(detail.events)
        return IngestResult(stored=stored, duplicates=received - stored, stored_by_type=detail.stored_by_type,
                            detail=detail)

    def _write_once(self, valid: ValidBatch, rows: "_Rows", source_pk: int, deployment_pk: int,
                    identity: Tuple[str, str, str, str]) -> StoredBatch:
        # Almost every batch is new: the first attempt inserts all its events
        # at once, without looking up which are stored (that cost as much as
        # inserting them). If some were (a re-sent batch), the attempt is
        # rolled back and the batch written again, storing only the new ones.
        try:
            return self._write(valid, rows, source_pk, deployment_pk, identity, all_new=True)
        except _SomeStored:
            return self._write(valid, rows, source_pk, deployment_pk, identity, all_new=False)

    def _write(self, valid: ValidBatch, rows: "_Rows", source_pk: int, deployment_pk: int,
               identity: Tuple[str, str, str, str], all_new: bool) -> StoredBatch:
        batch = valid.batch
        now = self._clock()
        with self.engine.connect() as connection:
            with writer(connection).begin():
                if not self._sqlite:
                    # Batches of one source are written one at a time (ids never
                    # repeat across sources), so "which ids are new" cannot race
                    # with a retry of the same batch on another collector.
                    connection.execute(select(func.pg_advisory_xact_lock(source_pk)))
                new_ids = set()
                stored_by_type = {}
                numbered = {"decision": [], "routed": [], "completed": []}  # the ids live readers follow
                for kind, table in TABLE_OF_TYPE.items():
                    table_rows = rows.of(table)
                    if not table_rows:
                        continue
                    if all_new:
                        self._insert_all(connection, table, table_rows)
                        inserted = [row[0] for row in table_rows]
                    else:
                        inserted = self._insert_new(connection, table, table_rows)
                    if inserted:
                        stored_by_type[kind] = len(inserted)
                        new_ids.update(inserted)
                        if kind in numbered:
                            numbered[kind] = inserted
                stored = batch.events if all_new else [
                    event for event, event_id in zip(batch.events, valid.ids) if event_id in new_ids]
                delta = RollupDelta()
                delta.add(stored, rows.router_pk, rows.replica_pks)
                rollup_rows = delta.tuples()
                if rollup_rows:
                    self._upsert_rollups(connection, rollup_rows)
                reason_rows = reason_tuples(stored, rows.router_pk, rows.named_reasons) if rows.reasons else []
                if reason_rows:  # in key order, as the rollups: a fixed lock order on PostgreSQL
                    connection.execute(self._reason_upsert, [
                        dict(zip((*REASON_ROLLUP_KEY, "decisions"), row)) for row in reason_rows])
                prefix_rows = self._prefix_rows(connection, rows, numbered["routed"], numbered["decision"])
                if prefix_rows:  # in key order, as the rollups
                    connection.execute(self._prefix_upsert, prefix_rows)
                changes = [event for event in stored if isinstance(event, ReplicasEvent)]
                for event in sorted(changes, key=lambda e: e.ts):
                    self._apply_membership(connection, deployment_pk, event, rows.replica_pks)
                before = self._record_batch(connection, source_pk, batch, now)
                if any(numbered.values()):
                    # Last: on PostgreSQL the number is taken when the row is inserted, and readers wait
                    # a moment for a number still missing (collector.query.tail); the commit follows at once.
                    self._number(connection, rows.router_pk, numbered, now)
        return StoredBatch(batch=batch, events=stored, stored_by_type=stored_by_type, identity=identity,
                           replica_pks=rows.replica_pks,
                           rollup_rows=rollup_rows, reason_rows=reason_rows, delta=delta, before=before,
                           received_at=now)

    def _number(self, connection: Connection, router_pk: int, ids: Dict[str, List[bytes]], now: float) -> None:
        """The batch's row in `stored_batches`; the rows past keeping deleted, now and then."""
        connection.execute(self._number_batch, {
            "stored_at": now, "router_pk": router_pk, "decision_ids": b"".join(ids["decision"]),
            "routed_ids": b"".join(ids["routed"]), "completed_ids": b"".join(ids["completed"])})
        if next(self._batches_numbered) % PRUNE_STORED_BATCHES_EVERY == 0:
            connection.execute(self._prune_numbered, {"oldest": now - STORED_BATCHES_KEEP_S})

    def _insert_all(self, connection: Connection, table, table_rows: List[tuple]) -> None:
        """Insert every row; raises `_SomeStored` when an id is stored already."""
        if self._sqlite:
            # ON CONFLICT DO NOTHING: the count of rows inserted tells.
            if self._sqlite_insert[table.name].execute(connection, table_rows) != len(table_rows):
                raise _SomeStored()
            return
        # PostgreSQL: COPY, four times as fast as executemany's INSERTs. It
        # cannot skip conflicts, but fails on the first one.
        cursor = connection.connection.driver_connection.cursor()
        try:
            with cursor.copy(self._copy_sql[table.name]) as copy:
                copy.set_types(self._copy_types[table.name])
                for row in table_rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation:
            raise _SomeStored() from None
        finally:
            cursor.close()

    def _insert_new(self, connection: Connection, table, table_rows: List[tuple]) -> List[bytes]:
        """Insert the rows whose id is not stored yet; return their ids."""
        key = stored_bytes(table.c.id)
        existing = {bytes(found) for found in connection.scalars(
            select(key).where(key.in_([row[0] for row in table_rows])))}
        new_rows = [row for row in table_rows if row[0] not in existing] if existing else table_rows
        if new_rows and self._sqlite:
            self._sqlite_insert[table.name].execute(connection, new_rows)
        elif new_rows:
            connection.exec_driver_sql(self._insert_sql[table.name], new_rows)
        return [row[0] for row in new_rows]

    def _adding_upsert(self, table, key: Sequence[str], added: Sequence[str]):
        """The upsert of rows of a table of counters (`reason_rollups`, `prefix_rollups`): a row already
        stored under the key gets the new row's counters added to its own."""
        insert = self._dialect_insert(table)
        return insert.on_conflict_do_update(index_elements=list(key),
                                            set_={name: table.c[name] + insert.excluded[name] for name in added})

    def _prefix_rows(self, connection: Connection, rows: "_Rows", new_routed: List[bytes],
                     new_decisions: List[bytes]) -> List[dict]:
        """What the batch adds to `prefix_rollups`, sorted by key: each routed request it stored whose
        decision is stored (in this batch or before), and each routed request stored before its decision
        that a decision it stored pairs. A pair counts once, when the later of the two is stored: ids are
        stored once, and a decision and the routed events that name it come from one source, whose batches
        are written one at a time. Added up by the statement Prefix affinity reads raw rows with, so that
        the two agree (collector.store.prefix_pairs)."""
        stored = set(new_routed)
        paired = [routed_id for routed_id in rows.prefix_candidates if routed_id in stored]
        found = [decision_id for decision_id in new_decisions if decision_id in rows.prefix_decisions]
        routed_key, named = stored_bytes(routed.c.id), stored_bytes(routed.c.decision_id)
        for start in range(0, len(found), IDS_PER_STATEMENT):
            paired += [bytes(routed_id) for routed_id in connection.scalars(
                select(routed_key).where(named.in_(found[start:start + IDS_PER_STATEMENT])))
                if bytes(routed_id) not in stored]
        dialect = connection.dialect.name
        sums: Dict[tuple, list] = {}
        for start in range(0, len(paired), IDS_PER_STATEMENT):
            chunk = paired[start:start + IDS_PER_STATEMENT]
            for row in connection.execute(grouped_pairs(dialect, 60, batch_pairs(dialect, chunk))):
                minute = int(row.step_start)
                values = (row.routed, row.match_rate_sum or 0.0, row.match_rates, row.prompt_chars_sum or 0.0)
                for grain in PREFIX_GRAINS:
                    key = (grain, minute // grain * grain, row.router_pk, row.prefix_group, row.replica_pk)
                    total = sums.get(key)
                    sums[key] = list(values) if total is None else list(map(add, total, values))
        return [dict(zip((*PREFIX_ROLLUP_KEY, *PREFIX_ROLLUP_VALUES), (*key, *sums[key]))) for key in sorted(sums)]

    def _make_rollup_upsert(self):
        """The upsert of a batch's rollup rows (`RollupDelta.tuples()`, about a
        hundred), as driver SQL: SQLAlchemy's per-row parameter processing of
        an 80-column statement cost more than the upsert itself.

        SQLite takes them in multi-row INSERTs (see `_MultiRowInsert`).
        PostgreSQL takes them all in one statement, as one JSON parameter
        holding each row's key and non-zero values (most of a row's counters
        are 0 in any one batch): executemany's 8,000 parameters a batch cost
        the collector 3 ms of CPU and the server 5, this 0.8 and 1.5."""
        quoted = [f'"{name}"' for name in (*ROLLUP_KEY, *ROLLUP_VALUES)]
        greatest = "max" if self._sqlite else "greatest"
        assignments = []
        for name in ROLLUP_VALUES:
            if name in ROLLUP_MAXIMA:
                # max() of SQLite is NULL if an argument is; coalesce keeps the known one.
                assignments.append(f'"{name}" = {greatest}(coalesce(rollups."{name}", excluded."{name}"), '
                                   f'coalesce(excluded."{name}", rollups."{name}"))')
            else:
                assignments.append(f'"{name}" = rollups."{name}" + excluded."{name}"')
        on_conflict = f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {', '.join(assignments)}"
        if self._sqlite:
            return _MultiRowInsert("rollups", (*ROLLUP_KEY, *ROLLUP_VALUES), on_conflict)
        # Counters left out of a row's JSON are 0; maxima left out are unknown (NULL).
        values = [f'x."{name}"' if name in ROLLUP_KEY or name in ROLLUP_MAXIMA else f'coalesce(x."{name}", 0)'
                  for name in (*ROLLUP_KEY, *ROLLUP_VALUES)]
        return (f"INSERT INTO rollups ({', '.join(quoted)}) SELECT {', '.join(values)} "
                f"FROM jsonb_populate_recordset(NULL::rollups, %s::jsonb) AS x "
                f"ORDER BY {', '.join(f'x.{name}' for name in ROLLUP_KEY)} {on_conflict}")

    def _upsert_rollups(self, connection: Connection, rows: List[tuple]) -> None:
        if self._sqlite:
            self._rollup_upsert.execute(connection, rows)
            return
        connection.exec_driver_sql(self._rollup_upsert, (_json.encode([_sparse(row) for row in rows]).decode(),))

    def _apply_membership(self, connection: Connection, deployment_pk: int, event: ReplicasEvent,
                          replica_pks: Dict[str, int]) -> None:
        """Apply one `replicas` event (the members a router saw at event.ts)
        to the replicas' membership. Events may arrive late (a spooled batch
        replayed): the newest event applied decides who is a member now, and
        an older one only adds what it knows of the past.

        Set-based, as an event may list 100,000 members (one UPDATE per
        member took minutes): the deployment's replicas are read once, the
        event's effect on each is worked out here, and only the rows it
        changes are written, in bulk."""
        newest = connection.scalar(select(Deployment.membership_at).where(Deployment.pk == deployment_pk)
                                   .with_for_update())
        is_newest = newest is None or event.ts >= newest
        members = {replica_pks[member.replica_id]: member for member in event.replicas}
        stored = {row[0]: tuple(row[1:]) for row in connection.execute(
            select(Replica.pk, *_MEMBERSHIP_COLUMNS).where(Replica.deployment_pk == deployment_pk))}
        changed = []
        for pk, member in members.items():
            before = stored[pk]
            described = (member.node_id, member.availability_zone, member.max_ongoing_requests,
                         _text(sorted(member.model_ids)))
            if not is_newest:  # newer events described it already, if they knew it
                described = tuple(new if old is None else old for old, new in zip(before, described))
            added_at, removed_at = before[-2:]
            after = (*described,
                     event.ts if added_at is None else min(added_at, event.ts),
                     # A member now; or, seen only in an older event, gone by the newest one.
                     None if is_newest else (newest if added_at is None else removed_at))
            if after != before:
                changed.append(dict(zip(_MEMBERSHIP_KEYS, after), member_pk=pk))
        if changed:
            connection.execute(self._set_membership, changed)
        if not is_newest:
            return
        gone = [{"member_pk": pk} for pk, (*_, added_at, removed_at) in stored.items()
                if pk not in members and added_at is not None and removed_at is None]
        if gone:
            connection.execute(update(Replica).where(Replica.pk == bindparam("member_pk"))
                               .values(removed_at=event.ts), gone)
        connection.execute(update(Deployment).where(Deployment.pk == deployment_pk)
                           .values(membership_at=event.ts))

    def _make_record_batch(self) -> list:
        """The statements of `_record_batch`, built once: building them for
        each batch cost the collector 0.3 ms, ten times as much as running them."""
        received = self._dialect_insert(SourceBatch).values(
            source_pk=bindparam("source_pk"), seq=bindparam("seq"), received_at=bindparam("now"),
        ).on_conflict_do_nothing()
        # Counters are cumulative: the batch with the highest number has the newest.
        newest = Source.last_seq <= bindparam("seq")
        seen = update(Source).where(Source.pk == bindparam("source_pk")).values(
            last_seen=bindparam("now"),
            last_seq=case((newest, bindparam("seq", type_=Source.last_seq.type)), else_=Source.last_seq),
            produced=case((newest, bindparam("produced", type_=Source.produced.type)), else_=Source.produced),
            dropped=case((newest, bindparam("dropped", type_=Source.dropped.type)), else_=Source.dropped),
        )
        # The source's record before this batch changes it (`SourceBefore`).
        before = select(Source.last_seq, Source.produced, Source.dropped).where(Source.pk == bindparam("source_pk"))
        if self._sqlite:
            return [before, received, seen]
        # One statement, one round trip: each costs the batch's transaction (and its locks) time. Every part
        # of it sees the database as the statement found it, so `previous` reads the row before the update
        # (which the source's advisory lock keeps from changing meanwhile).
        received = received.returning(SourceBatch.seq).cte("received")
        previous = before.cte("previous")
        return [seen.add_cte(received).add_cte(previous).returning(
            select(previous.c.last_seq).scalar_subquery(), select(previous.c.produced).scalar_subquery(),
            select(previous.c.dropped).scalar_subquery(),
            select(func.count()).select_from(received).scalar_subquery())]

    def _record_batch(self, connection: Connection, source_pk: int, batch, now: float) -> SourceBefore:
        """Records the batch's number and the counters it carries; what the source's record was before."""
        values = {"source_pk": source_pk, "seq": batch.seq, "now": now, "produced": batch.produced,
                  "dropped": _text(batch.dropped)}
        if self._sqlite:
            read, received, seen = self._record_batch_statements
            last_seq, produced, dropped = connection.execute(read, values).one()
            new_seq = connection.execute(received, values).rowcount == 1
            connection.execute(seen, values)
        else:
            last_seq, produced, dropped, new_seq = connection.execute(self._record_batch_statements[0], values).one()
        return SourceBefore(bool(new_seq), last_seq, produced, json.loads(dropped or "{}"))


def _first_of_each_id(valid: ValidBatch) -> ValidBatch:
    """The batch with each event id once (its first event): a batch that
    repeats an event stores it, and counts it in the rollups, once."""
    if len(set(valid.ids)) == len(valid.ids):
        return valid
    seen, keep = set(), []
    for index, event_id in enumerate(valid.ids):
        if event_id not in seen:
            seen.add(event_id)
            keep.append(index)
    events = valid.batch.events
    return ValidBatch(msgspec.structs.replace(valid.batch, events=[events[i] for i in keep]),
                      [valid.ids[i] for i in keep],
                      None if valid.extras is None else [valid.extras[i] for i in keep])


def _extra(event, unknown: Optional[dict]) -> Optional[str]:
    """An event's `extra` column (JSON): optional fields with no column of
    their own, and fields this version does not know. None for most events."""
    kept = dict(unknown) if unknown else {}
    if isinstance(event, DecisionEvent):
        if event.attributes:
            kept["attributes"] = event.attributes
    elif isinstance(event, RoutedEvent) and event.attribution is not None:
        kept["attribution"] = event.attribution
    return _text(kept) if kept else None


class _Rows:
    """A batch's events as table rows (tuples in column order), with the
    router and replica keys their rollups are counted under."""

    def __init__(self, valid: ValidBatch, source_pk: int, router_pk: int, replica_pks: Dict[str, int]):
        self.replica_pks = replica_pks
        self.router_pk = router_pk
        self.reasons: Set[str] = set()  # the decisions' reasons (wire format v3)
        self.named_reasons: Set[str] = set()  # those counted by name in reason_rollups (Ingestor._named_reasons)
        # For `prefix_rollups` (Ingestor._prefix_rows): the ids of the decisions that recorded a prefix group,
        # and of the routed events that may belong to one (not handed another request's replica, and not
        # routed by a decision of this batch that recorded none).
        self.prefix_decisions: Set[bytes] = set()
        self.prefix_candidates: List[bytes] = []
        without_group: Set[bytes] = set()
        named_decisions: List[Tuple[bytes, bytes]] = []  # (routed id, its decision's id)
        self._tables: Dict[object, List[tuple]] = {table: [] for table in RAW_TABLES}
        events = valid.batch.events
        extras = valid.extras or [None] * len(valid.ids)
        pks = replica_pks
        decision_rows, routed_rows = self._tables[decisions], self._tables[routed]
        completed_rows = self._tables[completed]
        request_ids = _stored_request_ids(events)
        # `extra` is None for most events: `_extra` is called only when there is something to keep.
        for event, event_id, extra in zip(events, valid.ids, extras):
            if isinstance(event, DecisionEvent):
                decision_rows.append((
                    event_id, event.ts, router_pk, source_pk, request_ids[event.request_id],
                    request_ids[event.internal_request_id], event.model_id, event.attempt, event.duration_us,
                    event.n_candidates, ranking_bytes(event, pks),
                    _extra(event, extra) if extra or event.attributes else None,
                    event.reason, _text(event.scores) if event.scores else None))
                if event.reason is not None:
                    self.reasons.add(event.reason)
                if event.attributes and event.attributes.get("prefix_group") is not None:
                    self.prefix_decisions.add(event_id)
                else:
                    without_group.add(event_id)
            elif isinstance(event, RoutedEvent):
                routed_rows.append((
                    event_id, event.ts, router_pk, source_pk, pks[event.replica_id],
                    event.decision_id.bytes if event.decision_id else None, event.rank, event.own_ranking,
                    event.attempts, event.queue_wait_ms, request_ids[event.request_id],
                    request_ids[event.internal_request_id], event.model_id,
                    _extra(event, extra) if extra or event.attribution is not None else None,
                    event.believed_queue_len, event.shortest_queue_len, event.reported_queue_len,
                    event.send_to_routed_ms))
                if event.decision_id is not None and event.own_ranking is not False:
                    named_decisions.append((event_id, event.decision_id.bytes))
            elif isinstance(event, CompletedEvent):
                completed_rows.append((
                    event_id, event.ts, router_pk, source_pk, pks[event.replica_id],
                    request_ids[event.internal_request_id], event.routed_id.bytes if event.routed_id else None,
                    event.latency_ms, event.ok, event.rejected, _extra(event, extra) if extra else None,
                    event.decision_id.bytes if event.decision_id else None,
                    event.believed_queue_len, event.shortest_queue_len, event.reported_queue_len))
            elif isinstance(event, StatsEvent):
                self._tables[stats_changes].append((
                    event_id, event.ts, router_pk, source_pk, pks[event.replica_id], _text(event.stats),
                    event.collected_at, _extra(event, extra) if extra else None))
            else:
                self._tables[memberships].append((event_id, event.ts, router_pk, source_pk, _text(event.replicas),
                                                  _extra(event, extra) if extra else None))
        self.prefix_candidates = [routed_id for routed_id, decision_id in named_decisions
                                  if decision_id not in without_group]

    def of(self, table) -> List[tuple]:
        return self._tables[table]
