"""Decisions with their outcome, a chunk at a time.

A decision's outcome is the `routed` event that names it and that routing's
`completed` event, or, for a decision whose replica refused the request,
its rejection: the one that names it (wire format v2), else the one of its
request that followed it (v1's rejections name no decision). Each table is read by a range scan of its
own and the rows are matched to the decisions by id in Arrow: a join by
the database, whose per-row index lookups cost most of the reading, is
what this replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import false, or_, select
from sqlalchemy.engine import Connection

from ..query.explore import REQUEST_HORIZON_S, decision_conditions, id_bytes, in_window
from ..query.figures import Scope
from ..query.filters import Filters
from ..store.models import ANSWER_QUEUE_LENS, completed, decisions, routed
from ..store.types import stored_bytes
from .arrow_reader import ArrowReader
from .chunks import BLOB, Reading, chunks

d, r, c = decisions.c, routed.c, completed.c
DECISIONS = Reading({
    "id": (stored_bytes(d.id), BLOB), "ts": (d.ts, pa.float64()), "router_pk": (d.router_pk, pa.int64()),
    "source_pk": (d.source_pk, pa.int64()), "request_id": (stored_bytes(d.request_id), BLOB),
    "internal_request_id": (stored_bytes(d.internal_request_id), BLOB), "model_id": (d.model_id, pa.string()),
    "attempt": (d.attempt, pa.int32()), "duration_us": (d.duration_us, pa.int64()),
    "n_candidates": (d.n_candidates, pa.int32()), "ranking": (stored_bytes(d.ranking), BLOB),
    "reason": (d.reason, pa.string()), "scores": (d.scores, pa.string()),
})
_ROUTINGS = Reading({  # the outcome columns of a decision's routed event
    "decision_id": (stored_bytes(r.decision_id), BLOB), "routed_id": (stored_bytes(r.id), BLOB),
    "replica_pk": (r.replica_pk, pa.int64()), "rank": (r.rank, pa.int32()), "own_ranking": (r.own_ranking, pa.bool_()),
    "queue_wait_ms": (r.queue_wait_ms, pa.float64()),
    **{name: (r[name], pa.int64()) for name in ANSWER_QUEUE_LENS},
})
_COMPLETIONS = Reading({  # those of a routing's completion
    "routed_id": (stored_bytes(c.routed_id), BLOB), "latency_ms": (c.latency_ms, pa.float64()),
    "ok": (c.ok, pa.bool_()),
})
del d, r, c
_REFUSALS = pa.schema([("replica_pk", pa.int64()), ("latency_ms", pa.float64()), ("ok", pa.bool_()),
                       *((name, pa.int64()) for name in ANSWER_QUEUE_LENS)])


@dataclass
class Decisions:
    """A chunk of decisions and, row by row, their outcome (rows of nulls where there is none)."""
    rows: pa.RecordBatch  # DECISIONS
    routing: pa.RecordBatch  # _ROUTINGS: the routed event that names the decision
    completion: pa.RecordBatch  # _COMPLETIONS: that routing's completion
    refusal: Optional[pa.RecordBatch]  # _REFUSALS: the rejection that followed an unrouted decision


def decision_chunks(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                    with_rejections: bool = True, reading: Reading = DECISIONS) -> Iterator[Decisions]:
    """Decisions with their outcome, oldest first, a chunk at a time.
    `reading`: the decisions' columns to read (DECISIONS, or more: its columns first)."""
    if not sc.routers:
        return
    key = stored_bytes(routed.c.decision_id)
    for rows in chunks(reader, reading, decision_conditions(f, sc)):
        ids = rows.column("id")
        # The routed events naming these decisions: a range of routed's decision_id index, in its order.
        routings = reader.read(_ROUTINGS.query(key >= ids[0].as_py(), key <= ids[-1].as_py())
                               .order_by(key, stored_bytes(routed.c.id)), _ROUTINGS.schema)
        routing = _first_match(ids, routings, "decision_id")
        completion = completions(reader, routing.column("routed_id"))  # read while the refusals are found
        refusal = _refusals(conn, rows, routing) if with_rejections else None
        yield Decisions(rows, routing, completion(), refusal)


def completions(reader: ArrowReader, routed_ids: pa.Array) -> Callable[[], pa.RecordBatch]:
    """The completion of each routing (nulls: none), from one range scan of
    `completed`'s routed_id index over the routings' ids: the query is sent,
    the function returned waits for its rows."""
    key = stored_bytes(completed.c.routed_id)
    low, high = pc.min(routed_ids).as_py(), pc.max(routed_ids).as_py()
    found = reader.submit(_COMPLETIONS.query(key >= low, key <= high).order_by(key, stored_bytes(completed.c.id))
                          if low is not None else _COMPLETIONS.query(false()), _COMPLETIONS.schema)
    return lambda: _first_match(routed_ids, found(), "routed_id")


def _first_match(keys: pa.Array, rows: pa.RecordBatch, column: str) -> pa.RecordBatch:
    """For each key, the first of `rows` whose `column` equals it (rows of nulls where none does):
    a left join, in the keys' order, that keeps one match as the joins it replaces did."""
    return rows.take(pc.index_in(keys, value_set=rows.column(column)))


def _refusals(conn: Connection, rows: pa.RecordBatch, routing: pa.RecordBatch) -> pa.RecordBatch:
    """Row by row, the rejection (_REFUSALS' columns) of an unrouted
    decision: the first one that names it; for rejections that name none
    (v1), the first rejected completion of its request after it, with no
    other decision of the request in between (Ray decides again after a
    rejection). Few decisions go unrouted: this reads little."""
    unrouted = rows.filter(routing.column("replica_pk").is_null())
    found: Dict[bytes, tuple] = {}
    if unrouted.num_rows:
        requests = {request for request in unrouted.column("internal_request_id").to_pylist() if request is not None}
        since, until = pc.min(unrouted.column("ts")).as_py(), pc.max(unrouted.column("ts")).as_py()
        found = _rejections(conn, rows, requests, set(unrouted.column("id").to_pylist()), since,
                            until + REQUEST_HORIZON_S)
    refused = pa.RecordBatch.from_arrays([pa.array(column, field.type) for column, field in
                                          zip(list(zip(*found.values())) or [()] * len(_REFUSALS), _REFUSALS)],
                                         schema=_REFUSALS)
    return refused.take(pc.index_in(rows.column("id"), value_set=pa.array(list(found), pa.binary())))


def _rejections(conn: Connection, rows: pa.RecordBatch, requests: set, wanted: set, since: float,
                until: float) -> Dict[bytes, tuple]:
    """Decision id -> its row of _REFUSALS, for the `wanted` decisions
    of the chunk `rows` (of `requests`) that a rejection named or followed."""
    request_key, named_key = stored_bytes(completed.c.internal_request_id), stored_bytes(completed.c.decision_id)
    # A rejection is a completion without a routing (docs/design.md): found through routed_id's index, whose
    # nulls come first in id order, rather than by scanning every completion of the window. One that names a
    # decision may be another request's (a FIFO hand-off gave it the decision's replica).
    rows_found = conn.execute(
        select(completed.c.ts, request_key, named_key, *(completed.c[name] for name in _REFUSALS.names))
        .where(completed.c.routed_id.is_(None), *in_window(completed, since, until), completed.c.rejected.is_(True),
               or_(named_key.in_(wanted), request_key.in_(requests)))
        .order_by(id_bytes(completed))).all()
    found: Dict[bytes, tuple] = {}
    rejections = []  # those that name no decision
    for ts, request, named, *refusal in rows_found:
        if named is None:
            rejections.append((ts, request, *refusal))
        elif named in wanted:
            found.setdefault(named, tuple(refusal))
    if not rejections:
        return found
    # The requests' decisions that came before each rejection: the chunk's, then any after the chunk
    # up to the last rejection (its ts included).
    in_chunk = rows.filter(pc.is_in(rows.column("internal_request_id"), value_set=pa.array(list(requests), BLOB)))
    decided = zip(in_chunk.column("ts").to_pylist(), in_chunk.column("internal_request_id").to_pylist(),
                  in_chunk.column("id").to_pylist())
    until = math.nextafter(max(rejection[0] for rejection in rejections), math.inf)
    decision_request = stored_bytes(decisions.c.internal_request_id)
    later = conn.execute(
        select(decisions.c.ts, decision_request, id_bytes(decisions))
        .where(id_bytes(decisions) > rows.column("id")[-1].as_py(), *in_window(decisions, since, until),
               decision_request.in_(requests))
        .order_by(id_bytes(decisions)))
    by_request: Dict[bytes, List[Tuple[float, bytes]]] = {}
    for ts, request, decision_id in chain(decided, later):
        by_request.setdefault(request, []).append((ts, decision_id))
    for ts, request, *refusal in rejections:
        before = [decision_id for decision_ts, decision_id in by_request.get(request, ()) if decision_ts <= ts]
        if before and before[-1] in wanted and before[-1] not in found:
            found[before[-1]] = tuple(refusal)
    return found
