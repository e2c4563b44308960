"""Query results as Arrow columns, for the export.

An export reads millions of rows: turning each into Python objects (a
tuple, its values) would cost more than the database spends finding them.
On a SQLite file, results are read by the ADBC SQLite driver straight into
Arrow arrays, in C and without the GIL, so that a thread can read the next
chunk while another converts the last. Other databases (PostgreSQL, SQLite
in memory) are read through the export's SQLAlchemy connection, rows
transposed into the same columns: the same results, more slowly.
"""

from __future__ import annotations

import os
from typing import Optional

import adbc_driver_sqlite.dbapi as adbc_sqlite
import pyarrow as pa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

# ADBC's SQLite driver guesses each column's type from the first batch of a
# result (a NULL-only column becomes int64) and fails on a later batch that
# disagrees. Each query the export makes reads one chunk of rows: read as
# one batch, the guess covers every row, and `read` casts it to the type meant.
_BATCH_ROWS = 1 << 30


class ArrowReader:
    """Runs the export's SELECTs and returns their rows as one record batch."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._adbc: Optional[adbc_sqlite.Connection] = None
        url = conn.engine.url
        if url.get_backend_name() == "sqlite" and url.database and os.path.isfile(url.database):
            # Its own connection to the file: one read transaction, so every chunk sees the same snapshot.
            self._adbc = adbc_sqlite.connect(url.database)

    def read(self, query: Select, schema: pa.Schema) -> pa.RecordBatch:
        """The query's rows with the columns `schema` names and types, in its order."""
        if self._adbc is None:
            rows = self._conn.execute(query).all()
            columns = list(zip(*rows)) or [()] * len(schema)
            return pa.record_batch([pa.array(column, field.type) for column, field in zip(columns, schema)],
                                   schema=schema)
        compiled = query.compile(dialect=self._conn.dialect, compile_kwargs={"render_postcompile": True})
        for bind in compiled.binds.values():
            # Parameters go to ADBC as they are: a type that converts them (say, a request id
            # to its stored bytes) would go unheard. Export queries compare stored forms.
            if isinstance(bind.type, TypeDecorator):
                raise TypeError(f"export query binds {bind.key} through {type(bind.type).__name__}")
        with self._adbc.cursor() as cursor:
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(_BATCH_ROWS)})
            cursor.execute(compiled.string, tuple(compiled.params[name] for name in compiled.positiontup))
            table = cursor.fetch_arrow_table()
        return pa.record_batch([_as(column, field.type) for column, field in zip(table.columns, schema)],
                               schema=schema)

    def close(self) -> None:
        if self._adbc is not None:
            self._adbc.close()
            self._adbc = None


def _as(column: pa.ChunkedArray, type_: pa.DataType) -> pa.Array:
    if column.null_count == len(column):  # typed int64 by the driver's guess, which casts to few types
        return pa.nulls(len(column), type_)
    return pa.concat_arrays(column.chunks).cast(type_)
