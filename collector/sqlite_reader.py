"""A SQLite file's query results as Arrow, read in a process of its own.

The export reads millions of rows. The ADBC SQLite driver reads them
straight into Arrow columns, in C: several times faster than building a
Python object per value. But the driver links its own copy of SQLite, and
two copies of SQLite must never open one file in one process
(sqlite.org/howtocorrupt.html, 2.2.1: POSIX locks belong to the process,
so each copy is blind to the other's; when ADBC's copy closed its
connection it checkpointed and deleted the WAL under the collector's own
connections). Here ADBC's copy is the only one in its process, and other
processes' locks are seen as they must be.

The parent (`collector.export_read`) starts `python -m collector.sqlite_reader
PATH` and talks to it over its stdin and stdout, one query at a time:

- request: 4-byte big-endian length, then a MessagePack array [sql, params]
  (SQLite's `?` placeholders, positional parameters);
- answer: 1 byte, `A` (rows: an Arrow IPC stream) or `E` (an error: UTF-8
  text), an 8-byte big-endian length, then the payload.

Every query runs in one read transaction, begun by the first: every chunk of
an export sees the same snapshot. EOF on stdin (the parent closed it, or
died) ends the process. Only pyarrow, ADBC and msgspec are imported here.
"""

from __future__ import annotations

import struct
import sys
from typing import BinaryIO, List, Optional


class Hidden:
    """An import finder that finds none of the packages it is given.

    pyarrow's first conversion of Python values imports pandas, when
    installed, to recognise pandas objects among them: some 40-50 MB
    resident in a process that never hands it any (pandas is no dependency
    of routelens). pyarrow takes the failed import for "no pandas". Nor does
    it need numpy for what this process does (ADBC, IPC): some 13 MB."""

    def __init__(self, *packages: str):
        self._packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self._packages:
            raise ModuleNotFoundError(f"{name} is hidden from pyarrow here: see collector.sqlite_reader")
        return None


if __name__ == "__main__":  # the reader's own process (the parameters it binds are converted by pyarrow)
    sys.meta_path.insert(0, Hidden("pandas", "numpy"))

import adbc_driver_manager  # noqa: E402
import adbc_driver_sqlite  # noqa: E402
import msgspec  # noqa: E402
import pyarrow as pa  # noqa: E402

REQUEST_HEADER = struct.Struct(">I")
ANSWER_HEADER = struct.Struct(">cQ")
ROWS, ERROR = b"A", b"E"

# The driver guesses each column's type from the first batch of a result (a
# NULL-only column becomes int64) and fails on a later batch that disagrees.
# Each query the export makes reads one chunk of rows: read as one batch, the
# guess covers every row, and the parent casts it to the type meant.
_BATCH_ROWS = 1 << 30


def serve(path: str, requests: BinaryIO, answers: BinaryIO) -> None:
    """Answers each request on `requests` until EOF."""
    database = adbc_driver_sqlite.connect(path)
    connection = adbc_driver_manager.AdbcConnection(database)
    connection.set_autocommit(False)  # one read transaction: one snapshot
    decode = msgspec.msgpack.Decoder().decode
    try:
        while True:
            header = requests.read(REQUEST_HEADER.size)
            if len(header) < REQUEST_HEADER.size:
                return
            (size,) = REQUEST_HEADER.unpack(header)
            sql, params = decode(requests.read(size))
            try:
                kind, payload = ROWS, _query(connection, sql, params)
            except adbc_driver_manager.Error as exc:
                kind, payload = ERROR, str(exc).encode()
            answers.write(ANSWER_HEADER.pack(kind, len(payload)))
            answers.write(payload)
            answers.flush()
    finally:
        connection.close()
        database.close()


def _query(connection: adbc_driver_manager.AdbcConnection, sql: str, params: List[object]) -> pa.Buffer:
    with adbc_driver_manager.AdbcStatement(connection) as statement:
        statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: str(_BATCH_ROWS)})
        statement.set_sql_query(sql)
        if params:  # one row of parameters, one column each
            statement.bind(pa.record_batch([[param] for param in params], names=list(map(str, range(len(params))))))
        stream, _ = statement.execute_query()
        table = pa.RecordBatchReader.from_stream(stream).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def main(argv: Optional[List[str]] = None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    try:
        serve(path, sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the parent went away mid-answer, or stopped reading (a query sent ahead)
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
