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

The parent (`collector.export.arrow_reader`) starts `python -m routelens.collector.export.sqlite_reader
PATH` and talks to it over its stdin and stdout, one query at a time:

- request: 4-byte big-endian length, then a MessagePack array [sql, params]
  (SQLite's `?` placeholders, positional parameters);
- answer: 1 byte, `A` (rows: an Arrow IPC stream) or `E` (an error: UTF-8
  text), an 8-byte big-endian length, then the payload.

Every query runs in one read transaction, begun by the first: every chunk of
an export sees the same snapshot. EOF on stdin (the parent closed it, or
died) ends the process. Only ADBC, nanoarrow and msgspec are imported here:
the answers are written by nanoarrow (a few MB), not pyarrow (some 40 MB of
libraries resident in a process that only passes rows on).
"""

from __future__ import annotations

import io
import struct
import sys
from typing import BinaryIO, List, Optional

import adbc_driver_manager
import adbc_driver_sqlite
import msgspec
import nanoarrow as na
from nanoarrow.ipc import StreamWriter

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


def _query(connection: adbc_driver_manager.AdbcConnection, sql: str, params: List[object]) -> bytes:
    answer = io.BytesIO()
    with adbc_driver_manager.AdbcStatement(connection) as statement:
        statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: str(_BATCH_ROWS)})
        statement.set_sql_query(sql)
        if params:  # one row of parameters, one column each
            types = [_PARAM_TYPES[type(param)] for param in params]
            statement.bind(na.c_array_from_buffers(
                na.struct({str(i): type_ for i, type_ in enumerate(types)}), length=1, buffers=[None],
                children=[na.c_array([param], type_) for param, type_ in zip(params, types)]))
        stream, _ = statement.execute_query()
        StreamWriter.from_writable(answer).serialize_stream(stream)
    return answer.getvalue()


# The Arrow type a parameter is bound as, by its Python type (as MessagePack decodes it).
_PARAM_TYPES = {int: na.int64(), float: na.float64(), bytes: na.binary(), str: na.string(), bool: na.bool_()}


def main(argv: Optional[List[str]] = None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    try:
        serve(path, sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the parent went away mid-answer, or stopped reading (a query sent ahead)
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
