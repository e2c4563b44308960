"""Query results as Arrow columns, for the export.

An export reads millions of rows: turning each into Python objects (a
tuple, its values) would cost more than the database spends finding them.
A SQLite file is read by the ADBC SQLite driver straight into Arrow arrays,
in a process of its own (`collector.export.sqlite_reader`, which says why): the
export converts one chunk while that process reads the next, on another
core. Other databases (PostgreSQL, SQLite in memory) are read through the
export's SQLAlchemy connection, rows transposed into the same columns: the
same results, more slowly.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import Callable, Dict, Optional, Tuple

import msgspec
import pyarrow as pa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

from ..store.db import DatabaseError
from .sqlite_reader import ANSWER_HEADER, REQUEST_HEADER, ROWS


class ArrowReader:
    """Runs the export's SELECTs and returns their rows as one record batch.

    `submit` sends a query and returns a function that waits for its rows:
    the SQLite reader's process answers queries in the order they came, and
    works on those sent ahead while this process converts the last answer
    (a chunk's next query can be sent once its previous answer is in)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._process: Optional[subprocess.Popen] = None
        self._sent = self._received = 0  # queries sent to the process, answers read from it
        self._answers: Dict[int, Tuple[bytes, bytes]] = {}  # read, not yet asked for: (kind, payload) by number
        url = conn.engine.url
        if url.get_backend_name() == "sqlite" and url.database and os.path.isfile(url.database):
            # stderr is the parent's: what the process says before it can answer (an import error) is seen.
            self._process = subprocess.Popen([sys.executable, "-m", "routelens.collector.export.sqlite_reader", url.database],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             env={**os.environ, **_READER_MALLOC})
            self._encode = msgspec.msgpack.Encoder().encode

    def read(self, query: Select, schema: pa.Schema) -> pa.RecordBatch:
        """The query's rows with the columns `schema` names and types, in its order."""
        return self.submit(query, schema)()

    def submit(self, query: Select, schema: pa.Schema) -> Callable[[], pa.RecordBatch]:
        """Sends the query; the function returned waits for its rows (see `read`)."""
        if self._process is None:
            rows = self._conn.execute(query).all()
            columns = list(zip(*rows)) or [()] * len(schema)
            batch = pa.record_batch([pa.array(column, field.type) for column, field in zip(columns, schema)],
                                    schema=schema)
            return lambda: batch
        compiled = query.compile(dialect=self._conn.dialect, compile_kwargs={"render_postcompile": True})
        for bind in compiled.binds.values():
            # Parameters go to SQLite as they are: a type that converts them (say, a request id
            # to its stored bytes) would go unheard. Export queries compare stored forms.
            if isinstance(bind.type, TypeDecorator):
                raise TypeError(f"export query binds {bind.key} through {type(bind.type).__name__}")
        request = self._encode([compiled.string, [compiled.params[name] for name in compiled.positiontup]])
        try:
            self._process.stdin.write(REQUEST_HEADER.pack(len(request)) + request)
            self._process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise self._stopped() from exc
        number = self._sent
        self._sent += 1
        return lambda: self._rows(number, schema)

    def _rows(self, number: int, schema: pa.Schema) -> pa.RecordBatch:
        while self._received <= number:  # the answers before this one are kept for their own callers
            self._answers[self._received] = self._answer()
            self._received += 1
        kind, payload = self._answers.pop(number)
        if kind != ROWS:
            raise DatabaseError(f"reading {self._conn.engine.url.database}: {payload.decode(errors='replace')}")
        table = pa.ipc.open_stream(payload).read_all()
        return pa.record_batch([_as(column, field.type) for column, field in zip(table.columns, schema)],
                               schema=schema)

    def _answer(self) -> Tuple[bytes, bytes]:
        try:
            header = self._process.stdout.read(ANSWER_HEADER.size)
            kind, size = ANSWER_HEADER.unpack(header)
            payload = self._process.stdout.read(size)
            if len(payload) != size:
                raise EOFError("answer cut short")
        except (OSError, ValueError, EOFError, struct.error) as exc:  # the process died (its stderr is ours)
            raise self._stopped() from exc
        return kind, payload

    def _stopped(self) -> DatabaseError:
        return DatabaseError(f"the export's SQLite reader stopped (exit status {self._process.poll()})")

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()  # EOF: the reader ends its transaction and exits ...
            self._process.stdout.close()  # ... or fails to write an answer no one will read (a query sent ahead)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


# glibc's malloc gave each answer's buffers (a few MB, taken and freed once per query) back to the system
# and took them again page by page at the next query: page faults, some 6% of the reader's time. Kept
# instead: the process holds about its largest answer. Two days of the bench: 251k -> 270k rows/s, +3 MB.
_READER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def _as(column: pa.ChunkedArray, type_: pa.DataType) -> pa.Array:
    if column.null_count == len(column):  # typed int64 by the driver's guess, which casts to few types
        return pa.nulls(len(column), type_)
    # One chunk (a query's rows are read as one batch: see collector.export.sqlite_reader) is used as it is.
    return (column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)).cast(type_)
