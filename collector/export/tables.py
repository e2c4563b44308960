"""Decision logs out of the database, as CSV, JSON Lines or Parquet.

One code path serves `routelens export`, `GET /v1/export` and the
dashboard's download buttons: `export()` yields the file's bytes chunk by
chunk, reading the database through a streaming cursor, so that memory
stays flat however many rows go out. Tables (`what`), schema version
`EXPORT_SCHEMA_VERSION`, documented in docs/export.md:

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
  (see `collector.export.wire_batches`).

Rows are read CHUNK_ROWS at a time as Arrow columns (`collector.export.arrow_reader`),
each table by a range scan of its own (a decision's outcome is matched to it
by id in Arrow, not joined by the database), converted to the export's
columns (vectorized where Arrow can do the work), and encoded by the
format's writer (`collector.export.formats`).
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from contextlib import closing
from dataclasses import dataclass, replace
from itertools import chain, count
from queue import Full, Queue
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import false, or_, select, type_coerce
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement, Select
from sqlalchemy.types import LargeBinary

from ..query.explore import (
    REQUEST_HORIZON_S,
    decision_conditions,
    id_bytes,
    in_window,
)
from ..query.figures import Scope, scope
from ..query.filters import Filters
from ..store.columns import AGE_SOURCE_NAMES, request_id_bytes, request_id_text
from ..store.models import Source, completed, decisions, routed
from .arrow_reader import ArrowReader
from .formats import FORMATS, WRITERS
from .rankings import ranking_columns
from .wire_batches import wire_batches


class _Hidden:
    """An import finder that finds none of the packages it is given.

    pyarrow's first conversion of Python values imports pandas, when
    installed, to recognise pandas objects among them: some 40-50 MB
    resident in a process that never hands it any (pandas is no dependency
    of routelens). pyarrow takes the failed import for "no pandas"."""

    def __init__(self, *packages: str):
        self._packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self._packages:
            raise ModuleNotFoundError(f"{name} is hidden from pyarrow here: see collector.export.tables")
        return None


# The first time pyarrow converts Python values (this module's constants, just below), it imports pandas
# (see `_Hidden`). That first look is made with pandas hidden; pyarrow remembers the answer and still
# imports pandas when asked for pandas (to_pandas, from_pandas), after which it also recognises pandas
# objects again. A process that imported pandas already keeps pyarrow's ordinary behaviour.
if "pandas" not in sys.modules:
    _hiding = _Hidden("pandas")
    sys.meta_path.insert(0, _hiding)
    try:
        pa.array([None])
    finally:
        sys.meta_path.remove(_hiding)
        del _hiding

EXPORT_SCHEMA_VERSION = 1
TABLES = ("decisions", "candidates", "routed", "completed", "events")
# Rows read, converted and written at a time: what bounds memory. Every chunk costs some time of its own in
# both processes (its queries, the ranking walk's steps, a row group's column writers). Bench, 10 million
# decisions, one run each: 10,000 rows 222k rows/s; 15,000 255k, peak 280 MB; 20,000 244k, 312 MB.
CHUNK_ROWS = 15_000

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
    reader = ArrowReader(conn)
    give_back_freed_memory = _freed_memory_given_back()
    try:
        # Batches are converted by a thread of their own while this one writes the last (Parquet's
        # writer works without the GIL). Closed before the reader: the threads that use it stop first.
        with closing(_in_background(chunks(conn, reader, f, sc, names))) as batches:
            for batch in batches:
                data = writer.write(batch)
                give_back_freed_memory()
                if on_rows:
                    on_rows(batch.num_rows)
                if data:
                    yield data
        # The reader's process ends before the Parquet footer is built, the export's largest allocation
        # (the metadata of every row group, some 30 MB for 10 million decisions): not both at once.
        reader.close()
        yield writer.close()
    finally:
        reader.close()


def _freed_memory_given_back() -> Callable[[], None]:
    """Arrow's default allocator (mimalloc) keeps what it frees for reuse, per
    thread, and an export frees every chunk in three threads: Arrow allocates
    through the C library's malloc instead (process-wide, the same for every
    export; jemalloc was slower, and held more: see git history). glibc's
    malloc keeps freed memory in its arenas too, between chunks still in use:
    the function returned, called once a chunk is written, gives it back to
    the system (malloc_trim) every _TRIM_EVERY chunks. Over the bench's 10
    million decisions, the export's processes peak at 285 MB instead of 302
    (mimalloc: 306). Trimming after every chunk held 278 MB, but the pages
    given back are faulted in again: 1 us/row of system time against 0.2."""
    pa.set_memory_pool(pa.system_memory_pool())
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries: nothing to call
    written = count(1)

    def chunk_written() -> None:
        if trim and next(written) % _TRIM_EVERY == 0:
            trim(0)

    return chunk_written


_TRIM_EVERY = 8


def arrow_schema(what: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow) for c in COLUMNS[what]],
                     metadata={"routelens.export": what, "routelens.export_schema_version": str(EXPORT_SCHEMA_VERSION)})


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

    def router_columns(self, router_pks: pa.Array, source_pks: pa.Array) -> Dict[str, pa.Array]:
        out = {name: _lookup(self._router[name], router_pks) for name in ("app", "deployment", "router_class")}
        out["source_id"] = _lookup(self._sources, source_pks)
        out["labels"] = _lookup(self._router["labels"], router_pks)
        return out

    def replica_ids(self, replica_pks: pa.Array) -> pa.Array:
        return _lookup(self._replica_ids, replica_pks)

    def replica_info(self, name: str, replica_pks: pa.Array) -> pa.Array:
        return _lookup(self._replica_info[name], replica_pks)


def _lookup(by_key: pa.Array, keys: pa.Array) -> pa.Array:
    # A key newer than the export's start (a replica that just joined) has no name here: null, not an error.
    keys = keys.cast(pa.int64())
    return by_key.take(pc.if_else(pc.less(keys, len(by_key)), keys, pa.scalar(None, pa.int64())))


def _times(ts: pa.Array) -> pa.Array:
    return pc.round(pc.multiply(ts, 1e6)).cast(pa.int64()).cast(_TIME)


_NO_ID = pa.scalar(bytes(16), pa.binary())
_NO_BYTES = pa.scalar(None, pa.binary())
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
# Where a UUID's 32 hex digits go in its 36 characters (the others are dashes).
_DIGIT_PLACES = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def _uuids(stored: pa.Array) -> pa.Array:
    """UUIDs stored as their 16 bytes (or null) as canonical text, all of a
    chunk's at once: numpy writes each byte's two hex digits into a block of
    36-character rows, which becomes the Arrow string array as it is."""
    n = len(stored)
    raw = pc.fill_null(stored, _NO_ID).cast(pa.binary(16))  # fails on a value that is not 16 bytes
    values = np.frombuffer(raw.buffers()[1], np.uint8, count=16 * n, offset=16 * raw.offset).reshape(n, 16)
    text = np.full((n, 36), ord("-"), np.uint8)
    text[:, _DIGIT_PLACES[0::2]] = _HEX_DIGITS[values >> 4]
    text[:, _DIGIT_PLACES[1::2]] = _HEX_DIGITS[values & 15]
    offsets = np.arange(0, 36 * n + 1, 36, dtype=np.int32)
    uuids = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
    return pc.if_else(stored.is_valid(), uuids, pa.scalar(None, pa.string())) if stored.null_count else uuids


def _request_ids(stored: pa.Array) -> pa.Array:
    # Ray's request ids are UUIDs, stored as their 16 bytes; other ids (and the
    # UUIDs that begin with 0xFF, one in 256) are stored as text, 0xFF first.
    # Text ids are few (Ray makes UUIDs): decoded in Python, which pyarrow's
    # binary_slice cannot do for them (it fails on a value shorter than the cut).
    as_text = pc.fill_null(pc.equal(pc.binary_slice(stored, 0, 1), pa.scalar(b"\xff", pa.binary())), False)
    if not pc.any(as_text).as_py():
        return _uuids(stored)
    texts = pa.array([request_id_text(v) for v in stored.filter(as_text).to_pylist()], pa.string())
    return pc.replace_with_mask(_uuids(pc.if_else(as_text, _NO_BYTES, stored)), as_text, texts)


def _record_batch(what: str, columns: Dict[str, pa.Array]) -> pa.RecordBatch:
    schema = arrow_schema(what)
    return pa.record_batch([columns[name] for name in schema.names], schema=schema)


@dataclass(frozen=True)
class _Reading:
    """Columns of one table to read, by name: what is selected, and its Arrow type as read."""
    columns: Dict[str, Tuple[ColumnElement, pa.DataType]]

    def query(self, *where: ColumnElement) -> Select:
        return select(*(selected for selected, _ in self.columns.values())).where(*where)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(name, type_) for name, (_, type_) in self.columns.items()])


def _key(column: ColumnElement) -> ColumnElement:
    """An id column as the bytes it is stored as (comparisons and order are those of the bytes)."""
    return type_coerce(column, LargeBinary)


def _chunks(reader: ArrowReader, reading: _Reading, where: list) -> Iterator[pa.RecordBatch]:
    """The rows of `reading` (its first column: the table's id) that match
    `where`, in id order, CHUNK_ROWS at a time. Each chunk is a query of its
    own, for the rows after the last one's id: memory stays flat, and no
    cursor stays open between chunks. The next chunk's query is sent before
    a chunk is handed on: the reader works on it meanwhile."""
    key = next(iter(reading.columns.values()))[0]

    def after(*bound: ColumnElement) -> Callable[[], pa.RecordBatch]:
        # The chunk's bound first: SQLite seeks to the first lower bound of the key it is given, and
        # scanning from the window's start (a bound in `where`) would make each chunk slower than the last.
        return reader.submit(reading.query(*bound, *where).order_by(key).limit(CHUNK_ROWS), reading.schema)

    pending = after()
    while True:
        chunk = pending()
        full = chunk.num_rows == CHUNK_ROWS
        if full:
            pending = after(key > chunk.column(0)[-1].as_py())
        if chunk.num_rows:
            yield chunk
        if not full:
            return


def _first_match(keys: pa.Array, rows: pa.RecordBatch, column: str) -> pa.RecordBatch:
    """For each key, the first of `rows` whose `column` equals it (rows of nulls where none does):
    a left join, in the keys' order, that keeps one match as the joins it replaces did."""
    return rows.take(pc.index_in(keys, value_set=rows.column(column)))


def _in_background(chunks: Iterator[T], depth: int = 2) -> Iterator[T]:
    """The chunks of a generator, made by a thread `depth` chunks ahead: the
    database is read (without the GIL) while the consumer converts the chunk
    before, and batches are converted while the consumer writes the last.
    All of the generator's use of the connection and the reader happens in
    that thread, one statement at a time."""
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


_BLOB = pa.binary()
d, r, c = decisions.c, routed.c, completed.c
_DECISIONS = _Reading({
    "id": (_key(d.id), _BLOB), "ts": (d.ts, pa.float64()), "router_pk": (d.router_pk, pa.int64()),
    "source_pk": (d.source_pk, pa.int64()), "request_id": (_key(d.request_id), _BLOB),
    "internal_request_id": (_key(d.internal_request_id), _BLOB), "model_id": (d.model_id, pa.string()),
    "attempt": (d.attempt, pa.int32()), "duration_us": (d.duration_us, pa.int64()),
    "n_candidates": (d.n_candidates, pa.int32()), "ranking": (_key(d.ranking), _BLOB),
})
_ROUTINGS = _Reading({  # the outcome columns of a decision's routed event
    "decision_id": (_key(r.decision_id), _BLOB), "routed_id": (_key(r.id), _BLOB),
    "replica_pk": (r.replica_pk, pa.int64()), "rank": (r.rank, pa.int32()), "own_ranking": (r.own_ranking, pa.bool_()),
    "queue_wait_ms": (r.queue_wait_ms, pa.float64()),
})
_COMPLETIONS = _Reading({  # those of a routing's completion
    "routed_id": (_key(c.routed_id), _BLOB), "latency_ms": (c.latency_ms, pa.float64()), "ok": (c.ok, pa.bool_()),
})
_ROUTED = _Reading({
    "id": (_key(r.id), _BLOB), "ts": (r.ts, pa.float64()), "router_pk": (r.router_pk, pa.int64()),
    "source_pk": (r.source_pk, pa.int64()), "request_id": (_key(r.request_id), _BLOB),
    "internal_request_id": (_key(r.internal_request_id), _BLOB), "model_id": (r.model_id, pa.string()),
    "replica_pk": (r.replica_pk, pa.int64()), "decision_id": (_key(r.decision_id), _BLOB),
    "rank": (r.rank, pa.int32()), "own_ranking": (r.own_ranking, pa.bool_()), "attempts": (r.attempts, pa.int32()),
    "queue_wait_ms": (r.queue_wait_ms, pa.float64()),
})
_COMPLETED = _Reading({
    "id": (_key(c.id), _BLOB), "ts": (c.ts, pa.float64()), "router_pk": (c.router_pk, pa.int64()),
    "source_pk": (c.source_pk, pa.int64()), "internal_request_id": (_key(c.internal_request_id), _BLOB),
    "replica_pk": (c.replica_pk, pa.int64()), "routed_id": (_key(c.routed_id), _BLOB),
    "latency_ms": (c.latency_ms, pa.float64()), "ok": (c.ok, pa.bool_()), "rejected": (c.rejected, pa.bool_()),
})
del d, r, c


def _completions(reader: ArrowReader, routed_ids: pa.Array) -> Callable[[], pa.RecordBatch]:
    """The completion of each routing (nulls: none), from one range scan of
    `completed`'s routed_id index over the routings' ids: the query is sent,
    the function returned waits for its rows."""
    key = _key(completed.c.routed_id)
    low, high = pc.min(routed_ids).as_py(), pc.max(routed_ids).as_py()
    found = reader.submit(_COMPLETIONS.query(key >= low, key <= high).order_by(key, _key(completed.c.id))
                          if low is not None else _COMPLETIONS.query(false()), _COMPLETIONS.schema)
    return lambda: _first_match(routed_ids, found(), "routed_id")


@dataclass
class _Decisions:
    """A chunk of decisions and, row by row, their outcome (rows of nulls where there is none)."""
    rows: pa.RecordBatch  # _DECISIONS
    routing: pa.RecordBatch  # _ROUTINGS: the routed event that names the decision
    completion: pa.RecordBatch  # _COMPLETIONS: that routing's completion
    refusal: Optional[pa.RecordBatch]  # _REFUSALS: the rejection that followed an unrouted decision


def _decision_chunks(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                     with_rejections: bool = True) -> Iterator[_Decisions]:
    """Decisions with their outcome, oldest first, a chunk at a time. Each
    table is read by a range scan (no join, whose per-row index lookups cost
    most of the reading) and the rows are matched by id in Arrow."""
    if not sc.routers:
        return
    key = _key(routed.c.decision_id)
    for rows in _chunks(reader, _DECISIONS, decision_conditions(f, sc)):
        ids = rows.column("id")
        # The routed events naming these decisions: a range of routed's decision_id index, in its order.
        routings = reader.read(_ROUTINGS.query(key >= ids[0].as_py(), key <= ids[-1].as_py())
                               .order_by(key, _key(routed.c.id)), _ROUTINGS.schema)
        routing = _first_match(ids, routings, "decision_id")
        completion = _completions(reader, routing.column("routed_id"))  # read while the refusals are found
        refusal = _refusals(conn, rows, routing) if with_rejections else None
        yield _Decisions(rows, routing, completion(), refusal)


_REFUSALS = pa.schema([("replica_pk", pa.int64()), ("latency_ms", pa.float64()), ("ok", pa.bool_())])


def _refusals(conn: Connection, rows: pa.RecordBatch, routing: pa.RecordBatch) -> pa.RecordBatch:
    """Row by row, the rejection (replica_pk, latency_ms, ok) that followed
    an unrouted decision: the first rejected completion of its request after
    it, with no other decision of the request in between (Ray decides again
    after a rejection). Few decisions go unrouted: this reads little."""
    unrouted = rows.filter(routing.column("replica_pk").is_null())
    requests = {request for request in unrouted.column("internal_request_id").to_pylist() if request is not None}
    found: Dict[bytes, tuple] = {}
    if requests:
        since, until = pc.min(unrouted.column("ts")).as_py(), pc.max(unrouted.column("ts")).as_py()
        found = _rejections(conn, rows, requests, set(unrouted.column("id").to_pylist()), since,
                            until + REQUEST_HORIZON_S)
    refused = pa.RecordBatch.from_arrays([pa.array(column, field.type) for column, field in
                                          zip(list(zip(*found.values())) or [()] * 3, _REFUSALS)], schema=_REFUSALS)
    return refused.take(pc.index_in(rows.column("id"), value_set=pa.array(list(found), pa.binary())))


def _rejections(conn: Connection, rows: pa.RecordBatch, requests: set, wanted: set, since: float,
                until: float) -> Dict[bytes, tuple]:
    """Decision id -> (replica_pk, latency_ms, ok), for the `wanted` decisions
    of the chunk `rows` (of `requests`) that a rejection followed."""
    request_key = _key(completed.c.internal_request_id)
    # A rejection is a completion without a routing (docs/design.md): found through routed_id's index, whose
    # nulls come first in id order, rather than by scanning every completion of the window.
    rejections = conn.execute(
        select(completed.c.ts, request_key, completed.c.replica_pk, completed.c.latency_ms, completed.c.ok)
        .where(completed.c.routed_id.is_(None), *in_window(completed, since, until), completed.c.rejected.is_(True),
               request_key.in_(requests))
        .order_by(id_bytes(completed))).all()
    if not rejections:
        return {}
    # The requests' decisions that came before each rejection: the chunk's, then any after the chunk
    # up to the last rejection (its ts included).
    in_chunk = rows.filter(pc.is_in(rows.column("internal_request_id"), value_set=pa.array(list(requests), _BLOB)))
    decided = zip(in_chunk.column("ts").to_pylist(), in_chunk.column("internal_request_id").to_pylist(),
                  in_chunk.column("id").to_pylist())
    until = math.nextafter(max(rejection[0] for rejection in rejections), math.inf)
    decision_request = _key(decisions.c.internal_request_id)
    later = conn.execute(
        select(decisions.c.ts, decision_request, id_bytes(decisions))
        .where(id_bytes(decisions) > rows.column("id")[-1].as_py(), *in_window(decisions, since, until),
               decision_request.in_(requests))
        .order_by(id_bytes(decisions)))
    by_request: Dict[bytes, List[Tuple[float, bytes]]] = {}
    for ts, request, decision_id in chain(decided, later):
        by_request.setdefault(request, []).append((ts, decision_id))
    found: Dict[bytes, tuple] = {}
    for ts, request, replica_pk, latency_ms, ok in rejections:
        before = [decision_id for decision_ts, decision_id in by_request.get(request, ()) if decision_ts <= ts]
        if before and before[-1] in wanted and before[-1] not in found:
            found[before[-1]] = (replica_pk, latency_ms, ok)
    return found


def _decision_columns(rows: pa.RecordBatch, names: _Names) -> Dict[str, pa.Array]:
    """The decision's own columns."""
    column = rows.column
    return {"decision_id": _uuids(column("id")), "time": _times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "request_id": _request_ids(column("request_id")),
            "internal_request_id": _request_ids(column("internal_request_id")),
            **{name: column(name) for name in ("model_id", "attempt", "duration_us", "n_candidates")}}


class _Rankings:
    """The rankings of a chunk of decisions, flattened: one entry per ranked
    replica, in order, and the offsets that nest them per rank and per
    decision (decoded by `collector.export.rankings`, indexed by Arrow)."""

    def __init__(self, stored: pa.Array, names: _Names):
        flat = ranking_columns(stored)
        self.replica_pks = flat.replica_pk
        self.replica_ids = names.replica_ids(self.replica_pks)
        self._rank_ends = _offsets(flat.entries_per_rank)  # per rank, where its entries end
        self._decision_ranks = _offsets(flat.ranks_per_decision)  # per decision, where its ranks end
        self._decision_entries = self._rank_ends.take(self._decision_ranks)
        by_rank = pa.ListArray.from_arrays(self._rank_ends, self.replica_ids)
        # Each entry's rank within its decision: its rank's number, less its decision's first rank's.
        n_ranks = len(flat.entries_per_rank)
        rank_decision = pa.ListArray.from_arrays(self._decision_ranks, pa.nulls(n_ranks)).value_parent_indices()
        rank_in_decision = pc.subtract(pa.array(np.arange(n_ranks)),
                                       self._decision_ranks.take(rank_decision).cast(pa.int64()))
        self.parents = pa.ListArray.from_arrays(self._decision_entries, self.replica_pks).value_parent_indices()
        self.entries = {
            "replica_id": self.replica_ids,
            "rank": rank_in_decision.take(by_rank.value_parent_indices()).cast(pa.int32()),
            "queue_len": flat.queue_len,
            "queue_len_age_s": pc.divide(flat.queue_len_age_us.cast(pa.float64()), 1e6),
            "stats_age_s": pc.divide(flat.stats_age_us.cast(pa.float64()), 1e6),
            "stats_age_source": _AGE_SOURCE_NAMES.take(flat.age_source),
            "stats": flat.stats,
        }

    def ranks(self) -> pa.Array:
        """Per decision: the replica ids of each rank."""
        return pa.ListArray.from_arrays(self._decision_ranks, pa.ListArray.from_arrays(self._rank_ends,
                                                                                        self.replica_ids))

    def candidates(self) -> pa.Array:
        """Per decision: each ranked replica's inputs."""
        return pa.ListArray.from_arrays(self._decision_entries, pa.StructArray.from_arrays(
            [self.entries[field.name] for field in _CANDIDATE], fields=list(_CANDIDATE)))


def _offsets(sizes: np.ndarray) -> pa.Array:
    """List offsets (int32) from list sizes: 0, then where each list ends."""
    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return pa.array(offsets)


_AGE_SOURCE_NAMES = pa.array([AGE_SOURCE_NAMES.get(i) for i in range(3)], pa.string())  # by stored code
_TRUE, _FALSE, _UNKNOWN = pa.scalar(True), pa.scalar(False), pa.scalar(None, pa.bool_())


def _decision_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                      names: _Names) -> Iterator[pa.RecordBatch]:
    for chunk in _in_background(_decision_chunks(conn, reader, f, sc)):
        columns = _decision_columns(chunk.rows, names)
        rankings = _Rankings(chunk.rows.column("ranking"), names)
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
                       rejected=pc.if_else(refusal("replica_pk").is_valid(), _TRUE,
                                           pc.if_else(accepted, _FALSE, _UNKNOWN)))
        yield _record_batch("decisions", columns)


def _candidate_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                       names: _Names) -> Iterator[pa.RecordBatch]:
    for chunk in _in_background(_decision_chunks(conn, reader, f, sc, with_rejections=False)):
        decision = _decision_columns(chunk.rows, names)
        rankings = _Rankings(chunk.rows.column("ranking"), names)
        parents = rankings.parents  # each candidate's decision: its columns repeat per candidate
        columns = {column.name: decision[column.name].take(parents) for column in _DECISION}
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
            yield _record_batch("candidates", columns)


def _routed_chunks(reader: ArrowReader, where: list) -> Iterator[Tuple[pa.RecordBatch, pa.RecordBatch]]:
    for rows in _chunks(reader, _ROUTED, where):
        yield rows, _completions(reader, rows.column("id"))()


def _routed_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                    names: _Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    r = routed.c
    where = in_window(routed, f.since, f.until) + [r.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(r.replica_pk.in_(sc.replica_pks))
    if f.request_id:
        stored = request_id_bytes(f.request_id)
        where.append(or_(_key(r.request_id) == stored, _key(r.internal_request_id) == stored))
    if f.model_id:
        where.append(r.model_id == f.model_id)
    for rows, completion in _in_background(_routed_chunks(reader, where)):
        column = rows.column
        yield _record_batch("routed", {
            "routed_id": _uuids(column("id")), "time": _times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "request_id": _request_ids(column("request_id")),
            "internal_request_id": _request_ids(column("internal_request_id")), "model_id": column("model_id"),
            "replica_id": names.replica_ids(column("replica_pk")), "decision_id": _uuids(column("decision_id")),
            "rank": column("rank"), "own_ranking": column("own_ranking"), "attempts": column("attempts"),
            "queue_wait_ms": column("queue_wait_ms"), "latency_ms": completion.column("latency_ms"),
            "ok": completion.column("ok")})


def _completed_batches(conn: Connection, reader: ArrowReader, f: Filters, sc: Scope,
                       names: _Names) -> Iterator[pa.RecordBatch]:
    if not sc.routers:
        return
    c = completed.c
    where = in_window(completed, f.since, f.until) + [c.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(c.replica_pk.in_(sc.replica_pks))
    if f.request_id:
        where.append(_key(c.internal_request_id) == request_id_bytes(f.request_id))
    for rows in _in_background(_chunks(reader, _COMPLETED, where)):
        column = rows.column
        yield _record_batch("completed", {
            "completed_id": _uuids(column("id")), "time": _times(column("ts")),
            **names.router_columns(column("router_pk"), column("source_pk")),
            "internal_request_id": _request_ids(column("internal_request_id")),
            "replica_id": names.replica_ids(column("replica_pk")), "routed_id": _uuids(column("routed_id")),
            **{name: column(name) for name in ("latency_ms", "ok", "rejected")}})
