"""Decision logs out of the database, as CSV, JSON Lines or Parquet: `check()` and `export()`.

One code path serves `routelens export`, `GET /v1/export` and the
dashboard's download buttons: `export()` yields the file's bytes chunk by
chunk, reading the database a key range at a time, so that memory stays
flat however many rows go out. The tables and their columns:
`collector.export.schema` (docs/export.md).

Rows are read CHUNK_ROWS at a time as Arrow columns (`collector.export.chunks`,
`collector.export.arrow_reader`), each table by a range scan of its own (a
decision's outcome is matched to it by id in Arrow, not joined by the
database: `collector.export.outcomes`), converted to the export's columns
(`collector.export.tables`, `collector.export.convert`), and encoded by the
format's writer (`collector.export.formats`).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import replace
from typing import Callable, Iterator, Optional

from sqlalchemy.engine import Connection

from ..query.figures import scope
from ..query.filters import Filters
from .arrow_reader import ArrowReader
from .chunks import in_background
from .convert import Names
from .formats import WRITERS
from .memory import freed_memory_given_back
from .names import DECISION_TABLES, FORMATS, TABLES
from .schema import arrow_schema
from .tables import BATCHES
from .wire_batches import wire_batches


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why."""


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
    if what not in DECISION_TABLES and f.reasons:
        raise ExportError(f"what={what}: reason is a decision's (filter decisions or candidates instead)")


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
    names = Names(conn, scope(conn, replace(f, replicas=())) if f.replicas else sc)
    writer = WRITERS[fmt](arrow_schema(what))
    batches_of = BATCHES[what]
    reader = ArrowReader(conn)
    give_back_freed_memory = freed_memory_given_back()
    try:
        # Batches are converted by a thread of their own while this one writes the last (Parquet's
        # writer works without the GIL). Closed before the reader: the threads that use it stop first.
        with closing(in_background(batches_of(conn, reader, f, sc, names))) as batches:
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
