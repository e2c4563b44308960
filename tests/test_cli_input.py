"""Bad input to every `routelens` command: a database URL that names no file,
a port out of range, numbers that are not limits, a file that is not a
database, a revision that does not exist. Each is one line on stderr (after
argparse's usage, for an option's value) and a non-zero exit, with nothing
created or changed. The demo's options are
checked by its parser alone: running it would start Ray."""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request

import pytest

from routelens.collector.cli.commands import build_parser
from routelens.collector.store.db import check_schema, make_engine

SERVERS = ["up", "collector"]


def routelens(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelens.collector.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def one_line(stderr: str) -> bool:
    return stderr.count("\n") == 1 and "Traceback" not in stderr


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert one_line(result.stderr) and message in result.stderr, result.stderr


def bad_argument(stderr: str, command: str, option: str) -> None:
    """argparse's usage, then one line naming the option."""
    assert "Traceback" not in stderr, stderr
    usage, error = stderr.rstrip("\n").rsplit("\n", 1)
    assert usage.startswith(f"usage: routelens {command}")
    assert error.startswith(f"routelens {command}: error: argument {option}: "), error


@pytest.fixture
def db(tmp_path) -> str:
    path = tmp_path / "routelens.db"
    engine = make_engine(str(path))
    check_schema(engine, str(path))
    engine.dispose()
    return str(path)


IN_MEMORY_URLS = ["sqlite://", "sqlite:///", "sqlite:///:memory:"]
DATABASE_COMMANDS = [["up", "--port", "0"], ["collector", "--port", "0"], ["db", "upgrade"], ["db", "current"],
                     ["export", "-o", "out.csv"], ["import", "events.jsonl"],
                     ["replay", "--router", "my_routers:MyRouter"]]


# Every command, and every URL twice: one check refuses them all (each run starts a Python, about 2 s).
@pytest.mark.parametrize("command, url", list(zip(DATABASE_COMMANDS, itertools.cycle(IN_MEMORY_URLS))))
def test_a_sqlite_url_without_a_file_is_one_line(command, url, tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    result = routelens(*command, "--db", url, cwd=tmp_path)
    refused(result, "names no file")
    assert os.listdir(tmp_path) == ["events.jsonl"]


@pytest.mark.parametrize("command", SERVERS)
@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_one_line(command, port, tmp_path):
    result = routelens(command, "--db", str(tmp_path / "x.db"), "--port", port)
    assert result.returncode == 2
    bad_argument(result.stderr, command, "--port")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", SERVERS)
@pytest.mark.parametrize("option, value", [("--max-body-mb", "nan"), ("--max-body-mb", "inf"), ("--max-body-mb", "-1"),
                                           ("--max-events", "0"), ("--max-events", "-5"), ("--workers", "0"),
                                           ("--retention", "9" * 400 + "d")])
def test_a_limit_that_is_no_limit_is_one_line(command, option, value, tmp_path):
    result = routelens(command, "--db", str(tmp_path / "x.db"), "--port", "0", option, value)
    assert result.returncode == 2
    bad_argument(result.stderr, command, option)
    assert os.listdir(tmp_path) == []


def test_import_refuses_a_batch_limit_that_is_no_limit(db, tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    result = routelens("import", str(tmp_path / "events.jsonl"), "--db", db, "--max-events", "-3")
    assert result.returncode == 2
    bad_argument(result.stderr, "import", "--max-events")


@pytest.mark.parametrize("value", ["11m", "0", "0s", "soon"])
def test_a_tail_bound_past_what_is_kept_is_one_line(value, capsys):
    """--tail-max-behind: a positive duration, at most the 10 minutes `stored_batches` keeps."""
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["collector", "--tail-max-behind", value])
    assert exit.value.code == 2
    bad_argument(capsys.readouterr().err, "collector", "--tail-max-behind")
    assert build_parser().parse_args(["collector", "--tail-max-behind", "10m"]).tail_max_behind == 600


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "0"], ["--serve-port", "-1"], ["--rate", "inf"],
                                  ["--duration", "inf"], ["--duration", "1e400"]])
def test_the_demo_refuses_bad_numbers_before_it_starts(args, capsys):
    """Parsed only: a demo that accepted them would start Ray."""
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["demo", *args])
    assert exit.value.code == 2
    bad_argument(capsys.readouterr().err, "demo", args[0])


def test_upgrading_a_file_that_is_not_a_database_is_one_line_and_leaves_it(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not SQLite" * 100)
    result = routelens("db", "upgrade", "--db", str(path))
    assert result.returncode == 1
    refused(result, "cannot open the database")
    assert path.read_bytes() == b"this is not SQLite" * 100


def test_an_unknown_revision_to_upgrade_to_is_one_line_and_creates_nothing(tmp_path):
    result = routelens("db", "upgrade", "--db", str(tmp_path / "new.db"), "--revision", "bogus")
    assert result.returncode == 2
    refused(result, "bogus")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [["up", "--port", "0"], ["collector", "--port", "0"], ["db", "upgrade"],
                                     ["export", "-o", "out.csv"], ["import", "events.jsonl"],
                                     ["replay", "--router", "ray.serve.request_router:RequestRouter"]])
def test_a_database_of_a_later_routelens_is_one_line_and_left_as_it_is(command, db, tmp_path):
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    before = open(db, "rb").read()
    (tmp_path / "events.jsonl").write_text("")
    result = routelens(*command, "--db", db, cwd=tmp_path)
    assert result.returncode == 1
    refused(result, "(9999) is newer than this routelens")
    assert open(db, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "routelens.db"]


@pytest.mark.parametrize("command", SERVERS)
def test_port_0_announces_the_port_it_got(command, db):
    server = subprocess.Popen([sys.executable, "-m", "routelens.collector.cli", command, "--db", db, "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        banner = server.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", banner).group(1))
        assert port != 0, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            assert response.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        server.stderr.close()

