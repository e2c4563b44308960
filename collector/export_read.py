"""Query results as Arrow columns, for the export.

An export reads millions of rows: turning each into Python objects (a
tuple, its values) would cost more than the database spends finding them.
On a SQLite file, results are read by the ADBC SQLite driver straight into
Arrow arrays, in C and without the GIL, so that a thread can read the next
chunk while another converts the last. Other databases (PostgreSQL, SQLite
in memory) are read through the export's SQLAlchemy connection, rows
transposed into the same columns: the same results, more slowly. (For
now SQLite files are read that way too: see `_ADBC_ON_SQLITE_FILES`.)

ADBC is used through its low-level API, not its DB-API module, which
imports pyarrow.dataset (some 6 MB resident, and pandas with it when
installed): nothing here uses it.
"""

from __future__ import annotations

import os
from typing import Optional

import adbc_driver_manager
import adbc_driver_sqlite
import pyarrow as pa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

# ADBC's SQLite driver guesses each column's type from the first batch of a
# result (a NULL-only column becomes int64) and fails on a later batch that
# disagrees. Each query the export makes reads one chunk of rows: read as
# one batch, the guess covers every row, and `read` casts it to the type meant.
_BATCH_ROWS = 1 << 30

# Off: ADBC's driver links its own copy of SQLite, and two copies of SQLite
# must never open one file in one process (sqlite.org/howtocorrupt.html,
# 2.2.1). POSIX locks belong to the process: when ADBC's copy closed its
# connection it saw no other, checkpointed and deleted the -wal and -shm
# files under the collector's own connections. Every batch stored after an
# export through the API then went to an unlinked WAL: invisible to other
# processes and to later exports, and lost when the collector was killed.
# Until ADBC reads from a process of its own, SQLite files take the
# SQLAlchemy path too (tests/reliability/test_bad_input.py).
_ADBC_ON_SQLITE_FILES = False


class ArrowReader:
    """Runs the export's SELECTs and returns their rows as one record batch."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._database: Optional[adbc_driver_manager.AdbcDatabase] = None
        self._adbc: Optional[adbc_driver_manager.AdbcConnection] = None
        url = conn.engine.url
        if (_ADBC_ON_SQLITE_FILES and url.get_backend_name() == "sqlite" and url.database
                and os.path.isfile(url.database)):
            # Its own connection to the file: one read transaction, so every chunk sees the same snapshot.
            self._database = adbc_driver_sqlite.connect(url.database)
            self._adbc = adbc_driver_manager.AdbcConnection(self._database)
            self._adbc.set_autocommit(False)

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
        params = [compiled.params[name] for name in compiled.positiontup]
        with adbc_driver_manager.AdbcStatement(self._adbc) as statement:
            statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: str(_BATCH_ROWS)})
            statement.set_sql_query(compiled.string)
            if params:  # one row of parameters, one column each
                statement.bind(pa.record_batch([[param] for param in params], names=list(map(str, range(len(params))))))
            stream, _ = statement.execute_query()
            # The rows are read in read_all, which releases the GIL.
            table = pa.RecordBatchReader.from_stream(stream).read_all()
        return pa.record_batch([_as(column, field.type) for column, field in zip(table.columns, schema)],
                               schema=schema)

    def close(self) -> None:
        if self._adbc is not None:
            self._adbc.close()
            self._database.close()
            self._adbc = self._database = None


def _as(column: pa.ChunkedArray, type_: pa.DataType) -> pa.Array:
    if column.null_count == len(column):  # typed int64 by the driver's guess, which casts to few types
        return pa.nulls(len(column), type_)
    return pa.concat_arrays(column.chunks).cast(type_)
