"""Writing validated batches: one transaction per batch, idempotent by event id.

`Ingestor.ingest` stores a `ValidBatch` (see `collector.schema`) in three steps:

1. resolve names to keys: deployment, router (deployment x class x labels),
   source and replicas. These rows are committed on their own, first: they
   are idempotent upserts, cached in memory, and harmless if the batch
   transaction then fails;
2. in one transaction: insert every event with ON CONFLICT DO NOTHING,
   RETURNING the ids actually inserted; feed only those to the rollups and
   the membership; record the batch number and the source's counters;
3. commit. Either all of the batch is stored or none of it.

On SQLite the transaction begins IMMEDIATE and a lock serializes writers
of this process, so concurrent batches queue instead of failing. On Postgres
several collectors can write at once; rollup rows are upserted in key order
so that two transactions never wait on each other in a cycle.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import msgspec
from sqlalchemy import func, select, type_coerce, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.types import LargeBinary

from collector.db import is_sqlite, writer
from collector.models import (
    RAW_TABLES, ROLLUP_COUNTS, ROLLUP_KEY, ROLLUP_MAXIMA, ROLLUP_SUMS, Deployment, Replica, Router, Source, SourceBatch,
    completed, decisions, memberships, rollups, routed, stats_changes,
)
from collector.rollups import RollupDelta
from collector.schema import (
    CompletedEvent, DecisionEvent, ReplicasEvent, RoutedEvent, StatsEvent, ValidBatch,
)

_json = msgspec.json.Encoder()
AGE_SOURCE_CODES = {"stamped": "s", "observed": "o", None: None}


@dataclass
class IngestResult:
    stored: int
    duplicates: int
    stored_by_type: Dict[str, int]


# Event type -> the table that stores it.
TABLE_OF_TYPE = {"decision": decisions, "routed": routed, "completed": completed, "stats": stats_changes,
                 "replicas": memberships}


def _text(value) -> Optional[str]:
    return None if value is None else _json.encode(value).decode()


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 3)


def labels_key(labels: Dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


class Ingestor:
    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self._clock = clock
        self._sqlite = is_sqlite(engine)
        self._dialect_insert = sqlite.insert if self._sqlite else postgresql.insert
        self._write_lock = threading.Lock() if self._sqlite else None
        self._deployments: Dict[Tuple[str, str], int] = {}
        self._routers: Dict[Tuple[int, str, str], int] = {}
        self._sources: Dict[str, Tuple[int, int]] = {}  # source_id -> (source_pk, router_pk)
        self._replicas: Dict[Tuple[int, str], int] = {}
        self._cache_lock = threading.Lock()
        self._rollup_upsert = self._make_rollup_upsert()
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_sql = {
            table.name: f"INSERT INTO {table.name} ({', '.join(table.c.keys())}) "
                        f"VALUES ({', '.join([mark] * len(table.c))}) ON CONFLICT (id) DO NOTHING"
            for table in RAW_TABLES
        }

    # --- step 1: keys ---

    def _keys(self, valid: ValidBatch) -> Tuple[int, int, int, Dict[str, int]]:
        info = valid.batch.source
        cached = self._sources.get(info.source_id)
        if cached is not None:
            source_pk, router_pk = cached
            deployment_pk = self._deployments[(info.app, info.deployment)]
        else:
            source_pk, router_pk, deployment_pk = self._resolve_source(valid)
        wanted = set()
        for event in valid.batch.events:
            if isinstance(event, DecisionEvent):
                for rank in event.ranks:
                    wanted.update(rank)
            elif isinstance(event, ReplicasEvent):
                wanted.update(member.replica_id for member in event.replicas)
            else:
                wanted.add(event.replica_id)
        missing = [replica_id for replica_id in wanted if (deployment_pk, replica_id) not in self._replicas]
        if missing:
            self._resolve_replicas(deployment_pk, missing, valid)
        replica_pks = {replica_id: self._replicas[(deployment_pk, replica_id)] for replica_id in wanted}
        return source_pk, router_pk, deployment_pk, replica_pks

    def _resolve_source(self, valid: ValidBatch) -> Tuple[int, int, int]:
        info = valid.batch.source
        now = self._clock()
        insert = self._dialect_insert
        with self.engine.begin() as connection:
            deployment_pk = self._deployments.get((info.app, info.deployment))
            if deployment_pk is None:
                connection.execute(insert(Deployment).values(app=info.app, deployment=info.deployment)
                                   .on_conflict_do_nothing())
                deployment_pk = connection.scalar(select(Deployment.pk).where(
                    Deployment.app == info.app, Deployment.deployment == info.deployment))
            key = labels_key(info.labels)
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
            source_pk, stored_router_pk = connection.execute(select(Source.pk, Source.router_pk).where(
                Source.source_id == info.source_id)).one()
        with self._cache_lock:
            self._deployments[(info.app, info.deployment)] = deployment_pk
            # A source keeps the router it first reported (its labels are fixed at start).
            self._sources[info.source_id] = (source_pk, stored_router_pk)
        return source_pk, stored_router_pk, deployment_pk

    def _resolve_replicas(self, deployment_pk: int, replica_ids: List[str], valid: ValidBatch) -> None:
        first_seen = min((event.ts for event in valid.batch.events), default=self._clock())
        with self.engine.begin() as connection:
            connection.execute(
                self._dialect_insert(Replica).on_conflict_do_nothing(),
                [{"deployment_pk": deployment_pk, "replica_id": replica_id, "first_seen": first_seen}
                 for replica_id in sorted(replica_ids)],
            )
            rows = connection.execute(select(Replica.replica_id, Replica.pk).where(
                Replica.deployment_pk == deployment_pk, Replica.replica_id.in_(replica_ids))).all()
        with self._cache_lock:
            for replica_id, pk in rows:
                self._replicas[(deployment_pk, replica_id)] = pk

    # --- step 2: the batch transaction ---

    def ingest(self, valid: ValidBatch) -> IngestResult:
        source_pk, router_pk, deployment_pk, replica_pks = self._keys(valid)
        rows = _Rows(valid, source_pk, router_pk, replica_pks)
        if self._write_lock is not None:
            with self._write_lock:
                stored_by_type = self._write(valid, rows, source_pk, deployment_pk)
        else:
            stored_by_type = self._write(valid, rows, source_pk, deployment_pk)
        stored = sum(stored_by_type.values())
        return IngestResult(stored=stored, duplicates=len(valid.batch.events) - stored, stored_by_type=stored_by_type)

    def _write(self, valid: ValidBatch, rows: "_Rows", source_pk: int, deployment_pk: int) -> Dict[str, int]:
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
                for kind, table in TABLE_OF_TYPE.items():
                    inserted = self._insert_new(connection, table, rows.of(table))
                    if inserted:
                        stored_by_type[kind] = len(inserted)
                        new_ids.update(inserted)
                delta = RollupDelta()
                changes: List[ReplicasEvent] = []
                for event, event_id in zip(batch.events, valid.ids):
                    if event_id in new_ids:
                        rows.feed(delta, event, changes)
                rollup_rows = delta.rows()
                if rollup_rows:
                    connection.execute(self._rollup_upsert, rollup_rows)
                for event in sorted(changes, key=lambda e: e.ts):
                    self._apply_membership(connection, deployment_pk, event, rows.replica_pks)
                self._record_batch(connection, source_pk, batch, now)
        return stored_by_type

    def _insert_new(self, connection: Connection, table, table_rows: List[tuple]) -> List[bytes]:
        """Insert the rows whose id is not stored yet; return their ids."""
        if not table_rows:
            return []
        key = type_coerce(table.c.id, LargeBinary)
        existing = {bytes(found) for found in connection.scalars(
            select(key).where(key.in_([row[0] for row in table_rows])))}
        new_rows = [row for row in table_rows if row[0] not in existing] if existing else table_rows
        if new_rows:
            connection.exec_driver_sql(self._insert_sql[table.name], new_rows)
        return [row[0] for row in new_rows]

    def _make_rollup_upsert(self):
        statement = self._dialect_insert(rollups)
        excluded = statement.excluded
        greatest = func.max if self._sqlite else func.greatest
        assignments = {name: rollups.c[name] + excluded[name] for name in (*ROLLUP_COUNTS, *ROLLUP_SUMS)}
        for name in ROLLUP_MAXIMA:
            # max() of SQLite is NULL if an argument is; coalesce keeps the known one.
            assignments[name] = greatest(func.coalesce(rollups.c[name], excluded[name]),
                                         func.coalesce(excluded[name], rollups.c[name]))
        return statement.on_conflict_do_update(index_elements=list(ROLLUP_KEY), set_=assignments)

    def _apply_membership(self, connection: Connection, deployment_pk: int, event: ReplicasEvent,
                          replica_pks: Dict[str, int]) -> None:
        members = {replica_pks[member.replica_id]: member for member in event.replicas}
        for pk, member in sorted(members.items()):
            connection.execute(update(Replica).where(Replica.pk == pk).values(
                node_id=member.node_id, availability_zone=member.availability_zone,
                max_ongoing_requests=member.max_ongoing_requests, model_ids=_text(sorted(member.model_ids)),
                added_at=func.coalesce(Replica.added_at, event.ts), removed_at=None,
            ))
        connection.execute(update(Replica).where(
            Replica.deployment_pk == deployment_pk, Replica.removed_at.is_(None), Replica.added_at.is_not(None),
            Replica.pk.not_in(list(members) or [-1]),
        ).values(removed_at=event.ts))

    def _record_batch(self, connection: Connection, source_pk: int, batch, now: float) -> None:
        connection.execute(self._dialect_insert(SourceBatch).values(
            source_pk=source_pk, seq=batch.seq, received_at=now).on_conflict_do_nothing())
        connection.execute(update(Source).where(Source.pk == source_pk).values(last_seen=now))
        # Counters are cumulative: the batch with the highest number has the newest.
        connection.execute(update(Source).where(Source.pk == source_pk, Source.last_seq <= batch.seq).values(
            last_seq=batch.seq, produced=batch.produced, dropped=_text(batch.dropped)))


def _ranking_json(event: DecisionEvent, pks: Dict[str, int]) -> str:
    """The `ranking` column: per rank, per replica, the inputs it was ranked on."""
    ranking = []
    for rank in event.ranks:
        entries = []
        for replica_id in rank:
            candidate = event.replicas.get(replica_id)
            if candidate is None:
                entries.append([pks[replica_id]])
                continue
            entries.append([
                pks[replica_id], candidate.queue_len, _ms(candidate.queue_len_age_s), _ms(candidate.stats_age_s),
                AGE_SOURCE_CODES[candidate.stats_age_source], candidate.stats or None,
            ])
        ranking.append(entries)
    return _text(ranking)


def _kept_fields(event, unknown: Optional[dict]) -> Optional[dict]:
    """What goes to an event's `extra` column: optional fields with no column of
    their own, and fields this version does not know."""
    kept = dict(unknown) if unknown else {}
    if isinstance(event, DecisionEvent) and event.attributes:
        kept["attributes"] = event.attributes
    elif isinstance(event, RoutedEvent) and event.attribution is not None:
        kept["attribution"] = event.attribution
    return kept or None


class _Rows:
    """A batch's events as table rows (tuples in column order), and what each
    adds to the rollups once stored."""

    def __init__(self, valid: ValidBatch, source_pk: int, router_pk: int, replica_pks: Dict[str, int]):
        self.replica_pks = replica_pks
        self.router_pk = router_pk
        self._tables: Dict[object, List[tuple]] = {table: [] for table in RAW_TABLES}
        extras = valid.extras or [None] * len(valid.ids)
        pks = replica_pks
        for event, event_id, extra in zip(valid.batch.events, valid.ids, extras):
            head = (event_id, event.ts, router_pk, source_pk)
            kept = _text(_kept_fields(event, extra))
            if isinstance(event, DecisionEvent):
                self._tables[decisions].append((
                    *head, event.request_id, event.internal_request_id, event.model_id, event.attempt,
                    event.duration_us, event.n_candidates, _ranking_json(event, pks), kept))
            elif isinstance(event, RoutedEvent):
                self._tables[routed].append((
                    *head, pks[event.replica_id], event.decision_id.bytes if event.decision_id else None,
                    event.rank, event.own_ranking, event.attempts, event.queue_wait_ms, event.request_id,
                    event.internal_request_id, event.model_id, kept))
            elif isinstance(event, CompletedEvent):
                self._tables[completed].append((
                    *head, pks[event.replica_id], event.internal_request_id,
                    event.routed_id.bytes if event.routed_id else None, event.latency_ms, event.ok,
                    event.rejected, kept))
            elif isinstance(event, StatsEvent):
                self._tables[stats_changes].append((
                    *head, pks[event.replica_id], _text(event.stats), event.collected_at, kept))
            else:
                self._tables[memberships].append((*head, _text(event.replicas), kept))

    def of(self, table) -> List[tuple]:
        return self._tables[table]

    def feed(self, delta: RollupDelta, event, changes: List[ReplicasEvent]) -> None:
        pks = self.replica_pks
        if isinstance(event, DecisionEvent):
            candidates = []
            for replica_id, candidate in event.replicas.items():
                pk = pks.get(replica_id)
                if pk is not None:
                    candidates.append((pk, candidate.stats_age_s, candidate.stats_age_source))
            delta.decision(event.ts, self.router_pk, event.duration_us, candidates)
        elif isinstance(event, RoutedEvent):
            delta.routed(event.ts, self.router_pk, pks[event.replica_id], event.rank, event.own_ranking,
                         event.attempts)
        elif isinstance(event, CompletedEvent):
            delta.completed(event.ts, self.router_pk, pks[event.replica_id], event.rejected, event.ok,
                            event.latency_ms)
        elif isinstance(event, ReplicasEvent):
            changes.append(event)
