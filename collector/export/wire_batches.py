"""A window's raw events as wire-format batches (this version's): the `events` export.

The form the tracer's local sink writes and `routelens import` loads, so
that a log moves losslessly from one database to another: each source's
events of the window, then a batch that carries the source's counters.
The window is widened to whole minutes, as the panels read it, and each
source's membership begins with the last `replicas` event before it, so
that an import answers every panel query of the window as the original does.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Dict, Iterator, List, Optional, Tuple

import msgspec
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..ingest.schema import WIRE_SCHEMA_VERSION
from ..query.explore import id_bytes, in_window
from ..query.figures import Scope
from ..query.filters import Filters
from ..store.models import (
    ANSWER_QUEUE_LENS,
    REFUSAL_COLUMNS,
    Replica,
    Source,
    SourceBatch,
    completed,
    decisions,
    memberships,
    routed,
    stats_changes,
)
from ..store.types import AGE_SOURCE_NAMES, ranking_layout, stored_bytes

EVENTS_PER_BATCH = 1_000

_json = msgspec.json.Encoder()



def wire_batches(conn: Connection, f: Filters, sc: Scope) -> Iterator[Tuple[int, bytes]]:
    """(events, line) per wire-format batch: each source's events of the
    window, then one batch that carries the source's counters. Its number is
    chosen so that the batches a database received from the source, and the
    ones it lost (gaps in the numbers), come out as they are here."""
    if not sc.routers:
        return
    since, until = f.rollup_bounds()
    f = replace(f, since=float(since), until=float(until))
    replica_ids = _ReplicaIds(conn, {pk: info["replica_id"] for pk, info in sc.replicas.items()})
    batches = dict((pk, (max_seq, count)) for pk, max_seq, count in conn.execute(
        select(SourceBatch.source_pk, func.max(SourceBatch.seq), func.count()).group_by(SourceBatch.source_pk)))
    for source in conn.execute(select(Source).where(Source.router_pk.in_(sorted(sc.routers)))
                               .order_by(Source.pk)).all():
        router = sc.routers[source.router_pk]
        header = {
            "schema_version": WIRE_SCHEMA_VERSION,
            "source": {"source_id": source.source_id, "app": router["app"], "deployment": router["deployment"],
                       "router_class": router["router_class"], "handle_source": source.handle_source,
                       "node_id": source.node_id, "actor_id": source.actor_id, "hostname": source.hostname,
                       "pid": source.pid, "tracer_version": source.tracer_version, "labels": router["labels"]},
        }
        seq = 0
        for events in _source_events(conn, f, source.pk, replica_ids):
            seq += 1
            yield len(events), _json.encode({**header, "seq": seq, "events": events}) + b"\n"
        # Lost batches as the read API counts them: numbers missing below the highest received.
        max_seq, received = batches.get(source.pk, (0, 0))
        counters = {**header, "seq": seq + (max_seq - received) + 1, "events": [],
                    "dropped": json.loads(source.dropped or "{}"), "produced": source.produced}
        yield 0, _json.encode(counters) + b"\n"


class _ReplicaIds(dict):
    """Replica key -> id; a replica that joined after the export began (a
    PostgreSQL export reads more than one snapshot) is looked up when met."""

    def __init__(self, conn: Connection, known: Dict[int, str]):
        super().__init__(known)
        self._conn = conn

    def __missing__(self, pk: int) -> str:
        replica_id = self[pk] = self._conn.scalar(select(Replica.replica_id).where(Replica.pk == pk))
        return replica_id


def _source_events(conn: Connection, f: Filters, source_pk: int,
                   replica_ids: Dict[int, str]) -> Iterator[List[dict]]:
    """One source's events of the window as wire-format events, EVENTS_PER_BATCH at a time,
    after the last membership it reported before the window (who was a member when it began)."""
    before = conn.execute(select(memberships).where(memberships.c.source_pk == source_pk,
                                                    memberships.c.ts < f.since)
                          .order_by(memberships.c.ts.desc()).limit(1)).first()
    if before is not None:
        yield [_replicas_event(before._mapping, replica_ids)]
    for table, to_event in ((memberships, _replicas_event), (stats_changes, _stats_event),
                            (decisions, _decision_event), (routed, _routed_event), (completed, _completed_event)):
        key = id_bytes(table)
        columns = [stored_bytes(column) if column.name == "ranking" else column for column in table.c]
        where = [*in_window(table, f.since, f.until), table.c.source_pk == source_pk]
        # A query per batch, for the rows after the last one's key (as `chunks` reads): no cursor stays
        # open while the client reads, so a stalled one holds no snapshot (the API's exports autocommit).
        after: list = []
        while True:
            rows = conn.execute(select(*columns, key.label("id_key")).where(*after, *where)
                                .order_by(key).limit(EVENTS_PER_BATCH)).all()
            if rows:
                yield [to_event(row._mapping, replica_ids) for row in rows]
            if len(rows) < EVENTS_PER_BATCH:
                break
            after = [key > rows[-1].id_key]


def _with_extra(event: dict, extra: Optional[str]) -> dict:
    # Fields without a column of their own (attributes, attribution) and fields this version does not know.
    if extra:
        event.update(json.loads(extra))
    return event


def _decision_event(row, replica_ids: Dict[int, str]) -> dict:
    layout = ranking_layout(row["ranking"])
    inputs = {}
    for entries in layout:
        for entry in entries:
            if len(entry) > 1:  # [pk] alone: ranked, without inputs
                pk, queue_len, queue_len_age_us, stats_age_us, age_source, stats = entry
                inputs[replica_ids[pk]] = {
                    "queue_len": queue_len, "queue_len_age_s": _seconds(queue_len_age_us), "stats": stats or {},
                    "stats_age_s": _seconds(stats_age_us), "stats_age_source": AGE_SOURCE_NAMES[age_source]}
    return _with_extra({
        "type": "decision", "id": row["id"], "ts": row["ts"], "request_id": row["request_id"],
        "internal_request_id": row["internal_request_id"], "model_id": row["model_id"], "attempt": row["attempt"],
        "duration_us": row["duration_us"], "n_candidates": row["n_candidates"],
        "ranks": [[replica_ids[entry[0]] for entry in entries] for entries in layout], "replicas": inputs,
        **_explanation(row),
    }, row["extra"])


def _explanation(row) -> dict:
    """A decision's reason and scores (wire format v3), as stored: left out when the router gave none."""
    if row["reason"] is None:
        return {}
    return {"reason": row["reason"], "scores": json.loads(row["scores"]) if row["scores"] else {}}


def _seconds(us: Optional[int]) -> Optional[float]:
    return None if us is None else us / 1e6


def _routed_event(row, replica_ids: Dict[int, str]) -> dict:
    return _with_extra({
        "type": "routed", "id": row["id"], "ts": row["ts"], "request_id": row["request_id"],
        "internal_request_id": row["internal_request_id"], "model_id": row["model_id"],
        "replica_id": replica_ids[row["replica_pk"]], "decision_id": row["decision_id"], "rank": row["rank"],
        "own_ranking": row["own_ranking"], "attempts": row["attempts"], "queue_wait_ms": row["queue_wait_ms"],
        **_known(row, ANSWER_QUEUE_LENS),
    }, row["extra"])


def _completed_event(row, replica_ids: Dict[int, str]) -> dict:
    return _with_extra({
        "type": "completed", "id": row["id"], "ts": row["ts"], "internal_request_id": row["internal_request_id"],
        "replica_id": replica_ids[row["replica_pk"]], "latency_ms": row["latency_ms"], "ok": row["ok"],
        "rejected": row["rejected"], "routed_id": row["routed_id"], **_known(row, REFUSAL_COLUMNS),
    }, row["extra"])


def _known(row, names) -> dict:
    """An answer's fields of wire format v2, as stored: left out when none
    is known (events of v1, completions that are no answer)."""
    values = {name: row[name] for name in names}
    return values if any(value is not None for value in values.values()) else {}


def _stats_event(row, replica_ids: Dict[int, str]) -> dict:
    return _with_extra({
        "type": "stats", "id": row["id"], "ts": row["ts"], "replica_id": replica_ids[row["replica_pk"]],
        "stats": json.loads(row["stats"]) if row["stats"] else {}, "collected_at": row["collected_at"],
    }, row["extra"])


def _replicas_event(row, replica_ids: Dict[int, str]) -> dict:
    return _with_extra({"type": "replicas", "id": row["id"], "ts": row["ts"],
                        "replicas": json.loads(row["replicas"])}, row["extra"])
