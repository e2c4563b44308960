"""The export's SQLite reader process: queries sent ahead, answered in order."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa
import pytest
from sqlalchemy import func, literal, select

from routelens.collector.export.arrow_reader import ArrowReader
from routelens.collector.store.db import DatabaseError, check_schema, make_engine

NUMBER = pa.schema([("n", pa.int64())])
BLOB = pa.schema([("b", pa.binary())])


@pytest.fixture
def connection(tmp_path):
    url = f"sqlite:///{tmp_path / 'routelens.db'}"
    engine = make_engine(url)
    check_schema(engine, url)  # a SQLite file: read by the reader's process
    with engine.connect() as connection:
        yield connection
    engine.dispose()


def number(n: int):
    return select(literal(n).label("n"))


def test_answers_go_to_their_own_queries_whatever_the_order_they_are_asked_for(connection):
    reader = ArrowReader(connection)
    try:
        assert reader._process is not None
        pending = [reader.submit(number(n), NUMBER) for n in range(5)]
        for n in (3, 0, 4, 1, 2):
            assert pending[n]().column("n").to_pylist() == [n]
        assert reader.read(number(7), NUMBER).column("n").to_pylist() == [7]
    finally:
        reader.close()


def test_an_error_is_the_answer_of_its_own_query(connection):
    reader = ArrowReader(connection)
    try:
        first, failing, last = (reader.submit(number(1), NUMBER), reader.submit(select(func.no_such_function(1)),
                                                                                NUMBER),
                                reader.submit(number(3), NUMBER))
        assert last().column("n").to_pylist() == [3]
        with pytest.raises(DatabaseError, match="no such function"):
            failing()
        assert first().column("n").to_pylist() == [1]
    finally:
        reader.close()


def test_closing_with_answers_unread_ends_the_process_at_once_and_quietly(connection, capfd):
    """Answers larger than a pipe holds, sent ahead and never read: the process
    is blocked writing when the reader closes."""
    reader = ArrowReader(connection)
    process = reader._process
    for _ in range(3):
        reader.submit(select(func.zeroblob(1 << 20).label("b")), BLOB)
    time.sleep(0.5)  # the process answers the first and blocks on the pipe
    started = time.monotonic()
    reader.close()
    assert time.monotonic() - started < 5
    assert process.returncode == 0
    assert capfd.readouterr().err == ""


def test_parameters_of_every_kind_are_bound_as_they_are(connection):
    values = {"i": (-(1 << 40), pa.int64()), "f": (0.25, pa.float64()), "b": (b"\x00\xff", pa.binary()),
              "s": ("é", pa.string()), "t": (True, pa.bool_())}
    schema = pa.schema([(name, type_) for name, (_, type_) in values.items()])
    reader = ArrowReader(connection)
    try:
        rows = reader.read(select(*(literal(value).label(name) for name, (value, _) in values.items())), schema)
    finally:
        reader.close()
    assert rows.to_pylist() == [{name: value for name, (value, _) in values.items()}]


def test_the_reader_process_imports_no_pyarrow_nor_numpy():
    """Its memory counts in the export's: pyarrow's libraries are some 40 MB resident."""
    check = "import sys, routelens.collector.export.sqlite_reader; print(sorted({'pyarrow', 'numpy', 'pandas'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
