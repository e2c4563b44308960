"""Decision logs out of the database, as CSV, JSON Lines or Parquet.

One code path serves `routelens export`, `GET /v1/export` and the
dashboard's download buttons: `export()` yields the file's bytes chunk by
chunk, reading the database through a streaming cursor, so that memory
stays flat however many rows go out. Tables (`what`), schema version
`SCHEMA_VERSION`, documented in docs/export.md:

- `decisions` (default): one row per decision, with its outcome joined: the
  `routed` event that names it (the replica its ranking supplied; the
  request may be another one, a FIFO hand-off) and that routing's
  `completed` event. A decision whose replica refused the request has no
  routed event: the rejection of its request that followed it is joined
  instead (`rejected` true);
- `candidates`: one row per ranked replica of each decision, with the inputs
  it was ranked on;
- `routed`: one row per routed event, with its completion;
- `completed`: one row per completion, rejections included;
- `events` (JSON Lines only): the raw events of each source as wire-format
  v1 batches, one per line, the form the tracer's local sink writes and
  `routelens import` loads: a lossless copy from one database to another
  (see `collector.wire_export`).

Rows are read CHUNK_ROWS at a time and turned into an Arrow record batch
column by column (vectorized where Arrow can do the work), which the
format's writer (`collector.export_formats`) encodes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from itertools import accumulate, chain, zip_longest
from queue import Full, Queue
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import or_, select, type_coerce
from sqlalchemy.engine import Connection
from sqlalchemy.types import LargeBinary

from collector.columns import AGE_SOURCE_NAMES, ranking_layouts, request_id_text
from collector.explore import (
    REQUEST_HORIZON_S,
    decision_conditions,
    id_bytes,
    in_window,
)
from collector.export_formats import FORMATS, WRITERS
from collector.models import Source, completed, decisions, routed
from collector.queries import Filters, Scope, scope
from collector.wire_export import wire_batches

SCHEMA_VERSION = 1
TABLES = ("decisions", "candidates", "routed", "completed", "events")
CHUNK_ROWS = 10_000  # rows read, converted and written at a time: what bounds memory

_json = msgspec.json.Encoder()
T = TypeVar("T")


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why."""


# --- columns ---

@dataclass(frozen=True)
class Column:
    name: str
    arrow: pa.DataType  # its Parquet type; CSV and JSON Lines follow from it (see the writers)
    doc: str


_TIME = pa.timestamp("us", tz="UTC")
_LABELS = pa.map_(pa.string(), pa.string())
_CANDIDATE = pa.struct([
    ("replica_id", pa.string()), ("rank", pa.int32()), ("queue_len", pa.int64()),
    ("queue_len_age_s", pa.float64()), ("stats_age_s", pa.float64()), ("stats_age_source", pa.string()),
    ("stats", pa.string()),
])

_ROUTER = [
    Column("app", pa.string(), "Serve application"),
    Column("deployment", pa.string(), "deployment"),
    Column("router_class", pa.string(), "router class, module.QualName"),
    Column("source_id", pa.string(), "the traced router instance that recorded the event"),
    Column("labels", _LABELS, "the router's labels (CSV: a JSON object)"),
]
_DECISION = [
    Column("decision_id", pa.string(), "the decision's event id (UUIDv7)"),
    Column("time", _TIME, "when choose_replicas ran (CSV, JSON Lines: ISO-8601 UTC)"),
    *_ROUTER,
    Column("request_id", pa.string(), "Ray's request id"),
    Column("internal_request_id", pa.string(), "Ray's internal request id"),
    Column("model_id", pa.string(), "multiplexed model id"),
    Column("attempt", pa.int32(), "0-based choose_replicas call for this request"),
    Column("duration_us", pa.int64(), "time spent in the wrapped choose_replicas"),
    Column("n_candidates", pa.int32(), "candidates the router was given"),
]
COLUMNS: Dict[str, List[Column]] = {
    "decisions": [
        *_DECISION,
        Column("ranks", pa.list_(pa.list_(pa.string())), "replica ids per rank, rank 0 first (CSV: JSON)"),
        Column("candidates", pa.list_(_CANDIDATE), "each ranked replica's inputs (CSV: JSON)"),
        Column("chosen_replica", pa.string(), "the replica the request went to"),
        Column("rank", pa.int32(), "the rank it came from (null: unknown)"),
        Column("own_ranking", pa.bool_(), "false: FIFO gave this ranking's replica to another request"),
        Column("queue_wait_ms", pa.float64(), "time from the request's arrival to its routing"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "the request completed without error"),
        Column("rejected", pa.bool_(), "the chosen replica refused the request"),
    ],
    "candidates": [
        *_DECISION,
        Column("candidate_rank", pa.int32(), "the rank this replica was in"),
        Column("replica_id", pa.string(), "the ranked replica"),
        Column("node_id", pa.string(), "its node"),
        Column("availability_zone", pa.string(), "its availability zone"),
        Column("queue_len", pa.int64(), "its queue length as the router saw it"),
        Column("queue_len_age_s", pa.float64(), "age of that queue length"),
        Column("stats_age_s", pa.float64(), "age of its routing stats"),
        Column("stats_age_source", pa.string(), "stamped (exact) or observed (an upper bound)"),
        Column("stats", pa.string(), "its routing stats, JSON"),
        Column("chosen", pa.bool_(), "the decision's request went to this replica"),
    ],
    "routed": [
        Column("routed_id", pa.string(), "the routed event's id"),
        Column("time", _TIME, "when the request was routed"),
        *_ROUTER,
        Column("request_id", pa.string(), "Ray's request id"),
        Column("internal_request_id", pa.string(), "Ray's internal request id"),
        Column("model_id", pa.string(), "multiplexed model id"),
        Column("replica_id", pa.string(), "the replica it went to"),
        Column("decision_id", pa.string(), "the decision whose ranking supplied the replica"),
        Column("rank", pa.int32(), "the rank the replica came from (null: unknown)"),
        Column("own_ranking", pa.bool_(), "false: a FIFO hand-off"),
        Column("attempts", pa.int32(), "decisions made for this request"),
        Column("queue_wait_ms", pa.float64(), "time from arrival to routing"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "completed without error"),
    ],
    "completed": [
        Column("completed_id", pa.string(), "the completed event's id"),
        Column("time", _TIME, "when the request completed"),
        *_ROUTER,
        Column("internal_request_id", pa.string(), "Ray's internal request id"),
        Column("replica_id", pa.string(), "the replica"),
        Column("routed_id", pa.string(), "the routed event it completes (null for a rejection)"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "completed without error"),
        Column("rejected", pa.bool_(), "the replica refused the request"),
    ],
}


def check(f: Filters, what: str, fmt: str) -> None:
    """Raise `ExportError` for a table, format or filter that does not apply."""
    if what not in TABLES:
        raise ExportError(f"what: expected one of {', '.join(TABLES)}, got {what!r}")
    if fmt not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if what == "events":
        if fmt != "jsonl":
            raise ExportError("what=events: wire-format batches are JSON Lines only (format=jsonl)")
        if f.replicas or f.request_id or f.model_id:
            raise ExportError("what=events exports whole sources: replica, request_id and model_id do not apply")
    if what == "completed" and f.model_id:
        raise ExportError("what=completed: completions carry no model id (filter routed instead)")


def export(conn: Connection, f: Filters, what: str = "decisions", fmt: str = "parquet",
           on_rows: Optional[Callable[[int], None]] = None) -> Iterator[bytes]:
    """The export's bytes, chunk by chunk. `on_rows(n)` is told of every
    chunk of n rows written. Call `check` first: this raises `ExportError`
    too, but only once the first chunk is asked for."""
    check(f, what, fmt)
    sc = scope(conn, f)
    if what == "events":
        for n_events, line in wire_batches(conn, f, sc):
            if on_rows:
                on_rows(n_events)
            yield line
        return
    # Names for every replica of the deployments, not only those a replica filter selects.
    names = _Names(conn, scope(conn, replace(f, replicas=())) if f.replicas else sc)
    writer = WRITERS[fmt](arrow_schema(what))
    chunks = {"decisions": _decision_batches, "candidates": _candidate_batches, "routed": _routed_batches,
              "completed": _completed_batches}[what]
    for batch in chunks(conn, f, sc, names):
        data = writer.write(batch)
        if on_rows:
            on_rows(batch.num_rows)
        if data:
            yield data
    yield writer.close()


def arrow_schema(what: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow) for c in COLUMNS[what]],
                     metadata={"routelens.export": what, "routelens.export_schema_version": str(SCHEMA_VERSION)})


# --- reading: chunks of rows, turned into Arrow columns ---

class _Names:
    """Keys to names for one export, as Arrow arrays indexed by key, so that
    a chunk's names are one vectorized `take` of its keys."""

    def __init__(self, conn: Connection, sc: Scope):
        def by_key(values: Dict[int, object], type_: pa.DataType) -> pa.Array:
            dense = [None] * (max(values, default=0) + 1)
            for pk, value in values.items():
                dense[pk] = value
            return pa.array(dense, type_)

        routers = sc.routers
        self._router = {name: by_key({pk: r[name] for pk, r in routers.items()}, pa.string())
                        for name in ("app", "deployment", "router_class")}
        self._router["labels"] = by_key({pk: list(r["labels"].items()) for pk, r in routers.items()}, _LABELS)
        self._replica_ids = by_key({pk: r["replica_id"] for pk, r in sc.replicas.items()}, pa.string())
        self._replica_info = {name: by_key({pk: r[name] for pk, r in sc.replicas.items()}, pa.string())
                              for name in ("node_id", "availability_zone")}
        self._sources = by_key(dict(conn.execute(select(Source.pk, Source.source_id)).all()), pa.string())

    def router_columns(self, router_pks: Sequence[int], source_pks: Sequence[int]) -> Dict[str, pa.Array]:
        router_pks = pa.array(router_pks, pa.int64())
        out = {name: _lookup(self._router[name], router_pks) for name in ("app", "deployment", "router_class")}
        out["source_id"] = _lookup(self._sources, pa.array(source_pks, pa.int64()))
        out["labels"] = _lookup(self._router["labels"], router_pks)
        return out

    def replica_ids(self, replica_pks: Sequence[Optional[int]]) -> pa.Array:
        return _lookup(self._replica_ids, pa.array(replica_pks, pa.int64()))

    def replica_info(self, name: str, replica_pks: pa.Array) -> pa.Array:
        return _lookup(self._replica_info[name], replica_pks)


def _lookup(by_key: pa.Array, keys: pa.Array) -> pa.Array:
    # A key newer than the export's start (a replica that just joined) has no name here: null, not an error.
    return by_key.take(pc.if_else(pc.less(keys, len(by_key)), keys, pa.scalar(None, pa.int64())))


def _times(ts: Sequence[float]) -> pa.Array:
    return pc.round(pc.multiply(pa.array(ts, pa.float64()), 1e6)).cast(pa.int64()).cast(_TIME)


_UUID_PARTS = ((0, 8), (8, 4), (12, 4), (16, 4), (20, 12))  # hex digits between the dashes
_NO_ID = bytes(16)


def _uuids(values: Sequence[Optional[bytes]]) -> pa.Array:
    """UUIDs (16 bytes each, or None) as canonical text: hex-encoded by one C
    call for the whole chunk, cut and dashed by Arrow (a tenth of the cost of
    formatting them one by one)."""
    n = len(values)
    digits = b"".join(_NO_ID if v is None else v for v in values).hex().encode()
    hexed = pa.StringArray.from_buffers(n, pa.py_buffer(pa.array(range(0, 32 * n + 1, 32), pa.int32())
                                                         .buffers()[1]), pa.py_buffer(digits))
    parts = [pc.utf8_slice_codeunits(hexed, start, start + length) for start, length in _UUID_PARTS]
    text = pc.binary_join_element_wise(*parts, "-")
    if values.count(None):
        text = pc.if_else(pa.array([v is None for v in values]), pa.scalar(None, pa.string()), text)
    return text


def _request_ids(values: Sequence[Optional[bytes]]) -> pa.Array:
    # Ray's request ids are UUIDs, stored as their 16 bytes; other ids (and the
    # UUIDs that begin with 0xFF, one in 256) are stored as text, 0xFF first.
    as_text = [v is not None and (len(v) != 16 or v[0] == 0xFF) for v in values]
    if not any(as_text):
        return _uuids(values)
    texts = [request_id_text(v) for v, text in zip(values, as_text) if text]
    return pc.replace_with_mask(_uuids([None if text else v for v, text in zip(values, as_text)]),
                                pa.array(as_text), pa.array(texts, pa.string()))


def _record_batch(what: str, columns: Dict[str, object]) -> pa.RecordBatch:
    schema = arrow_schema(what)
    return pa.record_batch([columns[name] if isinstance(columns[name], pa.Array)
                            else pa.array(columns[name], schema.field(name).type) for name in schema.names],
                           schema=schema)


def _partitions(conn: Connection, query) -> Iterator[list]:
    # yield_per streams: a server-side cursor on PostgreSQL, SQLite's own stepping otherwise.
    result = conn.execution_options(yield_per=CHUNK_ROWS).execute(query)
    try:
        yield from result.partitions()
    finally:
        result.close()


def _in_background(chunks: Iterator[T], depth: int = 2) -> Iterator[T]:
    """The chunks of a generator that reads the database, read by a thread
    `depth` chunks ahead: the database steps (without the GIL) while this
    thread converts the chunk before. All of the generator's use of the
    connection happens in that thread, one statement at a time."""
    queue: "Queue[object]" = Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        """Queue the item, unless the consumer stops meanwhile (then it reads no more)."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def read() -> None:
        try:
            for chunk in chunks:
                if not hand_over(chunk):
                    return
            hand_over(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(_Failed(exc))
        finally:
            chunks.close()

    thread = threading.Thread(target=read, name="routelens-export-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()  # the consumer stopped (done, failed, or the client went away)
        thread.join()


_DONE = object()


@dataclass
class _Failed:
    exc: BaseException


def _first_of_each(rows: list, last_id: Optional[bytes]) -> Tuple[list, Optional[bytes]]:
    """Rows with a new id (the first column): a join that matched twice repeats a row."""
    unique = []
    for row in rows:
        if row[0] != last_id:
            unique.append(row)
            last_id = row[0]
    return unique, last_id


# Columns of `_decision_rows`' rows.
(_ID, _TS, _ROUTER_PK, _SOURCE_PK, _REQUEST_ID, _INTERNAL_ID, _MODEL_ID, _ATTEMPT, _DURATION, _N_CANDIDATES,
 _RANKING, _ROUTED_REPLICA, _ROUTED_RANK, _OWN_RANKING, _QUEUE_WAIT, _LATENCY, _OK) = range(17)


def _decision_rows(conn: Connection, f: Filters, sc: Scope,
                   with_rejections: bool = True) -> Iterator[Tuple[list, Dict[bytes, tuple]]]:
    """Decision rows with their outcome, oldest first, a chunk at a time, and
    (`with_rejections`) the rejections that followed the chunk's unrouted decisions."""
    if not sc.routers:
        return
    d, r, c = decisions.c, routed.c, completed.c
    query = (
        select(id_bytes(decisions), d.ts, d.router_pk, d.source_pk, type_coerce(d.request_id, LargeBinary),
               type_coerce(d.internal_request_id, LargeBinary), d.model_id, d.attempt, d.duration_us,
               d.n_candidates, type_coerce(d.ranking, LargeBinary), r.replica_pk, r.rank, r.own_ranking,
               r.queue_wait_ms, c.latency_ms, c.ok)
        .select_from(decisions.outerjoin(routed, r.decision_id == d.id).outerjoin(completed, c.routed_id == r.id))
        .where(*decision_conditions(f, sc))
        .order_by(id_bytes(decisions))
    )
    last_id = None
    for rows in _partitions(conn, query):
        rows, last_id = _first_of_each(rows, last_id)
        if rows:  # a chunk may hold nothing but the repeat of the previous chunk's last row
            yield rows, (_rejections(conn, [row for row in rows if row[_ROUTED_REPLICA] is None])
                         if with_rejections else {})


def _rejections(conn: Connection, unrouted: list) -> Dict[bytes, tuple]:
    """Decision id -> (replica_pk, latency_ms, ok) of the rejection that
    followed it: the first rejected completion of its request after it, with
    no other decision of the request in between (Ray decides again after a
    rejection). Few decisions go unrouted: this reads little."""
    requests = {row[_INTERNAL_ID] for row in unrouted if row[_INTERNAL_ID] is not None}
    if not requests:
        return {}
    since = min(row[_TS] for row in unrouted)
    until = max(row[_TS] for row in unrouted) + REQUEST_HORIZON_S
    request_key = type_coerce(completed.c.internal_request_id, LargeBinary)
    rejections = conn.execute(
        select(completed.c.ts, request_key, completed.c.replica_pk, completed.c.latency_ms, completed.c.ok)
        .where(*in_window(completed, since, until), completed.c.rejected.is_(True), request_key.in_(requests))
        .order_by(id_bytes(completed))).all()
    if not rejections:
        return {}
    decision_request = type_coerce(decisions.c.internal_request_id, LargeBinary)
    by_request: Dict[bytes, List[Tuple[float, bytes]]] = {}
    for ts, request, decision_id in conn.execute(
            select(decisions.c.ts, decision_request, id_bytes(decisions))
            .where(*in_window(decisions, since, until), decision_request.in_(requests))
            .order_by(id_bytes(decisions))):
        by_request.setdefault(request, []).append((ts, decision_id))
    wanted = {row[_ID] for row in unrouted}
    found: Dict[bytes, tuple] = {}
    for ts, request, replica_pk, latency_ms, ok in rejections:
        before = [decision_id for decision_ts, decision_id in by_request.get(request, ()) if decision_ts <= ts]
        if before and before[-1] in wanted and before[-1] not in found:
            found[before[-1]] = (replica_pk, latency_ms, ok)
    return found


def _decision_columns(by_column: list, names: _Names) -> Dict[str, object]:
    """The decision's own columns, from a chunk transposed (`list(zip(*rows))`)."""
    (decision_ids, ts, router_pks, source_pks, request_ids, internal_ids, model_ids, attempts, durations,
     n_candidates) = by_column[:_RANKING]
    return {"decision_id": _uuids(decision_ids), "time": _times(ts), **names.router_columns(router_pks, source_pks),
            "request_id": _request_ids(request_ids), "internal_request_id": _request_ids(internal_ids),
            "model_id": model_ids, "attempt": attempts, "duration_us": durations, "n_candidates": n_candidates}


class _Rankings:
    """The rankings of a chunk of decisions, flattened: one entry per ranked
    replica, in order, and the offsets that nest them per rank and per
    decision. Built for speed: the entries are flattened and transposed by
    C code (chain, zip_longest) and indexed by Arrow, not by Python loops."""

    def __init__(self, stored: Sequence[bytes], names: _Names):
        layouts = ranking_layouts(stored)
        ranks = list(chain.from_iterable(layouts))  # per rank: its entries
        entries = list(chain.from_iterable(ranks))  # per ranked replica: (pk, inputs...), or (pk,) alone
        columns = list(zip_longest(*entries))
        columns += [(None,) * len(entries)] * (6 - len(columns))  # no entry had inputs
        pks, queue_lens, queue_len_ages, stats_ages, age_sources, stats = columns
        self.replica_pks = pa.array(pks, pa.int64())
        self.replica_ids = names.replica_ids(self.replica_pks)
        self._rank_ends = _offsets(list(map(len, ranks)))  # per rank, where its entries end
        self._decision_ranks = _offsets(list(map(len, layouts)))  # per decision, where its ranks end
        self._decision_entries = self._rank_ends.take(self._decision_ranks)
        by_rank = pa.ListArray.from_arrays(self._rank_ends, self.replica_ids)
        # Each entry's rank within its decision: its rank's number, less its decision's first rank's.
        rank_decision = pa.ListArray.from_arrays(self._decision_ranks, pa.nulls(len(ranks))).value_parent_indices()
        rank_in_decision = pc.subtract(pa.array(range(len(ranks)), pa.int64()),
                                       self._decision_ranks.take(rank_decision).cast(pa.int64()))
        self.parents = pa.ListArray.from_arrays(self._decision_entries, self.replica_pks).value_parent_indices()
        self.entries = {
            "replica_id": self.replica_ids,
            "rank": rank_in_decision.take(by_rank.value_parent_indices()).cast(pa.int32()),
            "queue_len": pa.array(queue_lens, pa.int64()),
            "queue_len_age_s": pc.divide(pa.array(queue_len_ages, pa.float64()), 1e6),
            "stats_age_s": pc.divide(pa.array(stats_ages, pa.float64()), 1e6),
            "stats_age_source": _AGE_SOURCE_NAMES.take(pa.array(age_sources, pa.int8())),
            "stats": pa.array([None if s is None else _json.encode(s).decode() for s in stats], pa.string()),
        }

    def ranks(self) -> pa.Array:
        """Per decision: the replica ids of each rank."""
        return pa.ListArray.from_arrays(self._decision_ranks, pa.ListArray.from_arrays(self._rank_ends,
                                                                                        self.replica_ids))

    def candidates(self) -> pa.Array:
        """Per decision: each ranked replica's inputs."""
        return pa.ListArray.from_arrays(self._decision_entries, pa.StructArray.from_arrays(
            [self.entries[field.name] for field in _CANDIDATE], fields=list(_CANDIDATE)))


def _offsets(sizes: List[int]) -> pa.Array:
    """List offsets (int32) from list sizes: 0, then where each list ends."""
    return pa.array([0, *accumulate(sizes)], pa.int32())


_AGE_SOURCE_NAMES = pa.array([AGE_SOURCE_NAMES.get(i) for i in range(3)], pa.string())  # by stored code


def _decision_batches(conn: Connection, f: Filters, sc: Scope, names: _Names) -> Iterator[pa.RecordBatch]:
    for rows, rejections in _in_background(_decision_rows(conn, f, sc)):
        by_column = list(zip(*rows))
        columns = _decision_columns(by_column, names)
        rankings = _Rankings(by_column[_RANKING], names)
        replica, rank, own, wait, latency, ok = [list(column) for column in by_column[_ROUTED_REPLICA:]]
        # A routed request was accepted; an unrouted one was refused, or its outcome is unknown.
        rejected = [False if pk is not None else None for pk in replica]
        for i, row in enumerate(rows):
            refused = rejections.get(row[_ID]) if row[_ROUTED_REPLICA] is None else None
            if refused is not None:
                replica[i], latency[i], ok[i], rejected[i] = refused[0], refused[1], refused[2], True
        columns.update(ranks=rankings.ranks(), candidates=rankings.candidates(),
                       chosen_replica=names.replica_ids(replica), rank=rank, own_ranking=own, queue_wait_ms=wait,
                       latency_ms=latency, ok=ok, rejected=rejected)
        yield _record_batch("decisions", columns)


def _candidate_batches(conn: Connection, f: Filters, sc: Scope, names: _Names) -> Iterator[pa.RecordBatch]:
    for rows, _ in _in_background(_decision_rows(conn, f, sc, with_rejections=False)):
        by_column = list(zip(*rows))
        decision = _decision_columns(by_column, names)
        rankings = _Rankings(by_column[_RANKING], names)
        parents = rankings.parents  # each candidate's decision: its columns repeat per candidate
        columns = {column.name: pa.array(decision[column.name], column.arrow).take(parents)
                   for column in _DECISION}
        entries = rankings.entries
        chosen_pk = pa.array(by_column[_ROUTED_REPLICA], pa.int64()).take(parents)
        columns.update(
            candidate_rank=entries["rank"], replica_id=entries["replica_id"],
            node_id=names.replica_info("node_id", rankings.replica_pks),
            availability_zone=names.replica_info("availability_zone", rankings.replica_pks),
            queue_len=entries["queue_len"], queue_len_age_s=entries["queue_len_age_s"],
            stats_age_s=entries["stats_age_s"], stats_age_source=entries["stats_age_source"], stats=entries["stats"],
            chosen=pc.fill_null(pc.equal(chosen_pk, rankings.replica_pks), False))
        if len(parents):
            yield _record_batch("candidates", columns)


def _routed_batches(conn: Connection, f: Filters, sc: Scope, names: _Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    r, c = routed.c, completed.c
    where = in_window(routed, f.since, f.until) + [r.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(r.replica_pk.in_(sc.replica_pks))
    if f.request_id:
        where.append(or_(r.request_id == f.request_id, r.internal_request_id == f.request_id))
    if f.model_id:
        where.append(r.model_id == f.model_id)
    query = (select(id_bytes(routed), r.ts, r.router_pk, r.source_pk, type_coerce(r.request_id, LargeBinary),
                    type_coerce(r.internal_request_id, LargeBinary), r.model_id, r.replica_pk,
                    type_coerce(r.decision_id, LargeBinary), r.rank, r.own_ranking, r.attempts, r.queue_wait_ms,
                    c.latency_ms, c.ok)
             .select_from(routed.outerjoin(completed, c.routed_id == r.id)).where(*where)
             .order_by(id_bytes(routed)))
    last_id = None
    for rows in _in_background(_partitions(conn, query)):
        rows, last_id = _first_of_each(rows, last_id)
        if not rows:
            continue
        (routed_ids, ts, router_pks, source_pks, request_ids, internal_ids, model_ids, replica_pks, decision_ids,
         ranks, own, attempts, waits, latencies, oks) = zip(*rows)
        yield _record_batch("routed", {
            "routed_id": _uuids(routed_ids), "time": _times(ts), **names.router_columns(router_pks, source_pks),
            "request_id": _request_ids(request_ids), "internal_request_id": _request_ids(internal_ids),
            "model_id": model_ids, "replica_id": names.replica_ids(replica_pks), "decision_id": _uuids(decision_ids),
            "rank": ranks, "own_ranking": own, "attempts": attempts, "queue_wait_ms": waits,
            "latency_ms": latencies, "ok": oks})


def _completed_batches(conn: Connection, f: Filters, sc: Scope, names: _Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    c = completed.c
    where = in_window(completed, f.since, f.until) + [c.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(c.replica_pk.in_(sc.replica_pks))
    if f.request_id:
        where.append(c.internal_request_id == f.request_id)
    query = (select(id_bytes(completed), c.ts, c.router_pk, c.source_pk,
                    type_coerce(c.internal_request_id, LargeBinary), c.replica_pk,
                    type_coerce(c.routed_id, LargeBinary), c.latency_ms, c.ok, c.rejected)
             .where(*where).order_by(id_bytes(completed)))
    for rows in _in_background(_partitions(conn, query)):
        (completed_ids, ts, router_pks, source_pks, internal_ids, replica_pks, routed_ids, latencies, oks,
         rejected) = zip(*rows)
        yield _record_batch("completed", {
            "completed_id": _uuids(completed_ids), "time": _times(ts), **names.router_columns(router_pks, source_pks),
            "internal_request_id": _request_ids(internal_ids), "replica_id": names.replica_ids(replica_pks),
            "routed_id": _uuids(routed_ids), "latency_ms": latencies, "ok": oks, "rejected": rejected})
