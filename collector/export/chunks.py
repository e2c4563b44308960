"""Reading a table in chunks of CHUNK_ROWS rows, each a query of its own,
and a thread that works ahead of the chunks' consumer."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from queue import Full, Queue
from typing import Callable, Dict, Iterator, Tuple, TypeVar

import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.sql import ColumnElement, Select

from .arrow_reader import ArrowReader

# Rows read, converted and written at a time: what bounds memory. Every chunk costs some time of its own in
# both processes (its queries, the ranking walk's steps, a row group's column writers). Bench, 10 million
# decisions, one run each: 10,000 rows 222k rows/s; 15,000 255k, peak 280 MB; 20,000 244k, 312 MB.
CHUNK_ROWS = 15_000
BLOB = pa.binary()  # the Arrow type of an id (or request id, ranking) read as its stored bytes

T = TypeVar("T")


@dataclass(frozen=True)
class Reading:
    """Columns of one table to read, by name: what is selected, and its Arrow type as read."""
    columns: Dict[str, Tuple[ColumnElement, pa.DataType]]

    def query(self, *where: ColumnElement) -> Select:
        return select(*(selected for selected, _ in self.columns.values())).where(*where)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(name, type_) for name, (_, type_) in self.columns.items()])


def chunks(reader: ArrowReader, reading: Reading, where: list) -> Iterator[pa.RecordBatch]:
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


def in_background(chunks: Iterator[T], depth: int = 2) -> Iterator[T]:
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
