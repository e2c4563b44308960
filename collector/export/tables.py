"""Each table's record batches (`collector.export.schema`), a chunk at a time:
the rows read (`collector.export.chunks`, `collector.export.outcomes`),
converted to the table's columns (`collector.export.convert`)."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Connection

from ..query.explore import outcome_conditions
from ..query.figures import Scope
from ..query.filters import Filters
from ..store.models import ANSWER_QUEUE_LENS, completed, routed
from ..store.types import stored_bytes
from .arrow_reader import ArrowReader
from .chunks import BLOB, Reading, chunks, in_background
from .convert import FALSE, TRUE, UNKNOWN, Names, Rankings, request_ids, scores, times, uuids
from .outcomes import completions, decision_chunks
from .schema import DECISION, record_batch

r, c = routed.c, completed.c
_ROUTED = Reading({
    "id": (stored_bytes(r.id), BLOB), "ts": (r.ts, pa.float64()), "router_pk": (r.router_pk, pa.int64()),
    "source_pk": (r.source_pk, pa.int64()), "request_id": (stored_bytes(r.request_id), BLOB),
    "internal_request_id": (stored_bytes(r.internal_request_id), BLOB), "model_id": (r.model_id, pa.string()),
    "replica_pk": (r.replica_pk, pa.int64()), "decision_id": (stored_bytes(r.decision_id), BLOB),
    "rank": (r.rank, pa.int32()), "own_ranking": (r.own_ranking, pa.bool_()), "attempts": (r.attempts, pa.int32()),
    "queue_wait_ms": (r.queue_wait_ms, pa.float64()), **{name: (r[name], pa.int64()) for name in ANSWER_QUEUE_LENS},
})
_COMPLETED = Reading({
    "id": (stored_bytes(c.id), BLOB), "ts": (c.ts, pa.float64()), "router_pk": (c.router_pk, pa.int64()),
    "source_pk": (c.source_pk, pa.int64()), "internal_request_id": (stored_bytes(c.internal_request_id), BLOB),
    "replica_pk": (c.replica_pk, pa.int64()), "routed_id": (stored_bytes(c.routed_id), BLOB),
    "latency_ms": (c.latency_ms, pa.float64()), "ok": (c.ok, pa.bool_()), "rejected": (c.rejected, pa.bool_()),
    "decision_id": (stored_bytes(c.decision_id), BLOB), **{name: (c[name], pa.int64()) for name in ANSWER_QUEUE_LENS},
})
del r, c


def _decision_columns(rows: pa.RecordBatch, names: Names) -> Dict[str, pa.Array]:
    """The decision's own columns."""
    column = rows.column
    return {"decision_id": uuids(column("id")), "time": times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "request_id": request_ids(column("request_id")),
            "internal_request_id": request_ids(column("internal_request_id")),
            **{name: column(name) for name in ("model_id", "attempt", "duration_us", "n_candidates")}}


def decision_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                     names: Names) -> Iterator[pa.RecordBatch]:
    for chunk in in_background(decision_chunks(conn, reader, f, sc)):
        columns = _decision_columns(chunk.rows, names)
        rankings = Rankings(chunk.rows.column("ranking"), names)
        routing, completion, refusal = chunk.routing.column, chunk.completion.column, chunk.refusal.column
        # A routed request was accepted; an unrouted one was refused (its rejection
        # stands in for the routing and its completion), or its outcome is unknown.
        accepted = routing("replica_pk").is_valid()
        columns.update(ranks=rankings.ranks(), candidates=rankings.candidates(),
                       chosen_replica=names.replica_ids(pc.coalesce(routing("replica_pk"), refusal("replica_pk"))),
                       rank=routing("rank"), own_ranking=routing("own_ranking"),
                       queue_wait_ms=routing("queue_wait_ms"),
                       latency_ms=pc.coalesce(completion("latency_ms"), refusal("latency_ms")),
                       ok=pc.coalesce(completion("ok"), refusal("ok")),
                       rejected=pc.if_else(refusal("replica_pk").is_valid(), TRUE,
                                           pc.if_else(accepted, FALSE, UNKNOWN)),
                       **_answer(accepted, *(pc.coalesce(routing(name), refusal(name)) for name in ANSWER_QUEUE_LENS)),
                       reason=chunk.rows.column("reason"),
                       scores=scores(chunk.rows.column("reason"), chunk.rows.column("scores")))
        yield record_batch("decisions", columns)


def _answer(accepted, believed: pa.Array, shortest: pa.Array, reported: pa.Array) -> Dict[str, pa.Array]:
    """The columns of an answer's decision quality (schema.ANSWER; docs/design.md,
    Definitions; the rollups count the same, `collector.ingest.rollups`), whether
    the replica accepted (an array, or one value for all). Null wherever an
    input is: answers of wire format v1 have none."""
    # The replica's count before this request: an accepting replica counts the one it accepted.
    before = pc.if_else(accepted, pc.max_element_wise(pc.subtract(reported, 1), 0, skip_nulls=False), reported)
    return {"believed_queue_len": believed, "shortest_queue_len": shortest, "regret": pc.subtract(believed, shortest),
            "reported_queue_len": reported, "belief_error": pc.subtract(believed, before)}


def candidate_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                      names: Names) -> Iterator[pa.RecordBatch]:
    for chunk in in_background(decision_chunks(conn, reader, f, sc, with_rejections=False)):
        decision = _decision_columns(chunk.rows, names)
        rankings = Rankings(chunk.rows.column("ranking"), names)
        parents = rankings.parents  # each candidate's decision: its columns repeat per candidate
        columns = {column.name: decision[column.name].take(parents) for column in DECISION}
        entries = rankings.entries
        chosen_pk = chunk.routing.column("replica_pk").take(parents)
        columns.update(
            candidate_rank=entries["rank"], replica_id=entries["replica_id"],
            node_id=names.replica_info("node_id", rankings.replica_pks),
            availability_zone=names.replica_info("availability_zone", rankings.replica_pks),
            queue_len=entries["queue_len"], queue_len_age_s=entries["queue_len_age_s"],
            stats_age_s=entries["stats_age_s"], stats_age_source=entries["stats_age_source"], stats=entries["stats"],
            chosen=pc.fill_null(pc.equal(chosen_pk, rankings.replica_pks), False))
        if len(parents):
            yield record_batch("candidates", columns)


def _routed_chunks(reader: ArrowReader, where: list) -> Iterator[Tuple[pa.RecordBatch, pa.RecordBatch]]:
    for rows in chunks(reader, _ROUTED, where):
        yield rows, completions(reader, rows.column("id"))()


def routed_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                   names: Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    where = outcome_conditions(routed, f, sc)
    for rows, completion in in_background(_routed_chunks(reader, where)):
        column = rows.column
        yield record_batch("routed", {
            "routed_id": uuids(column("id")), "time": times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "request_id": request_ids(column("request_id")),
            "internal_request_id": request_ids(column("internal_request_id")), "model_id": column("model_id"),
            "replica_id": names.replica_ids(column("replica_pk")), "decision_id": uuids(column("decision_id")),
            "rank": column("rank"), "own_ranking": column("own_ranking"), "attempts": column("attempts"),
            "queue_wait_ms": column("queue_wait_ms"), "latency_ms": completion.column("latency_ms"),
            "ok": completion.column("ok"), **_answer(True, *map(column, ANSWER_QUEUE_LENS))})


def completed_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                      names: Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    where = outcome_conditions(completed, f, sc)
    for rows in in_background(chunks(reader, _COMPLETED, where)):
        column = rows.column
        yield record_batch("completed", {
            "completed_id": uuids(column("id")), "time": times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "internal_request_id": request_ids(column("internal_request_id")),
            "replica_id": names.replica_ids(column("replica_pk")), "routed_id": uuids(column("routed_id")),
            **{name: column(name) for name in ("latency_ms", "ok", "rejected")},
            # Only a rejection is an answer (the ingest refuses these fields on other completions).
            "decision_id": uuids(column("decision_id")), **_answer(False, *map(column, ANSWER_QUEUE_LENS))})


# Each table but `events` (`collector.export.wire_batches`): its batches, given (conn, reader, f, scope, names).
BATCHES: Dict[str, Callable[..., Iterator[pa.RecordBatch]]] = {
    "decisions": decision_batches, "candidates": candidate_batches, "routed": routed_batches,
    "completed": completed_batches,
}
