"""A database that cannot take ingest: another application's, with an
`alembic_version` that looks like ours, or a read-only one. The commands
refuse one that is not routelens' in one line and leave it as it was;
/healthz answers 503 saying why, while ingest cannot succeed; the pruner logs
one line per kind of failure, not a traceback every round."""

from __future__ import annotations

import itertools
import logging
import os
import stat
import subprocess
import sys

import pytest

from routelens.collector.api.app import create_app
from routelens.collector.settings import Settings
from routelens.collector.store.db import DatabaseError, head_revision, make_engine, script_revisions
from routelens.collector.store.retention import Retention
from tests.support.collector_app import Collector
from tests.support.system_deps import require
from tests.support.wire_source import WireSource


def routelens(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelens.collector.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _foreign(url: str, revision: str) -> None:
    """Another application's tables, and an alembic_version row that says `revision`."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total NUMERIC)")
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.exec_driver_sql(f"INSERT INTO alembic_version VALUES ('{revision}')")
    engine.dispose()


@pytest.mark.parametrize("revision", sorted(script_revisions()))
def test_the_app_refuses_another_applications_database(empty_db_url, revision):
    _foreign(empty_db_url, revision)
    with pytest.raises(DatabaseError, match="is not routelens'"):
        create_app(Settings(db_url=empty_db_url))


# Every command, each with one of the revisions in turn (the app's test above takes each revision): one
# check refuses them all, and each run starts a Python (about 2 s).
@pytest.mark.parametrize("command, revision", list(zip(
    [["up", "--port", "0"], ["collector", "--port", "0"], ["db", "upgrade"], ["export", "-o", "out.csv"],
     ["import", "events.jsonl"]], itertools.cycle(sorted(script_revisions())))))
def test_the_commands_refuse_another_applications_database_in_one_line(command, revision, tmp_path):
    db = tmp_path / "invoices.db"
    _foreign(str(db), revision)
    before = db.read_bytes()
    (tmp_path / "events.jsonl").write_text("")
    result = routelens(*command, "--db", str(db), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is not routelens'" in result.stderr and "no table" in result.stderr, result.stderr
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "invoices.db"]


@pytest.fixture
def read_only_sqlite(tmp_path):
    """A routelens SQLite file this process cannot write: without write
    permission, or, as root (whom permissions do not stop), immutable."""
    url = f"sqlite:///{tmp_path / 'routelens.db'}"
    Collector(url).close()  # creates it at head
    path = tmp_path / "routelens.db"
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield url
        path.chmod(0o644)
        return

    def make_immutable():
        result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if result.returncode:
            raise OSError(result.stderr.strip() or f"chattr exited {result.returncode}")

    require(make_immutable, OSError, "cannot make a file immutable", "chattr +i as root")
    yield url
    subprocess.run(["chattr", "-i", str(path)], check=False)


def _batch():
    source = WireSource("s1")
    return source.batch([source.decision(1.8e9, [["r1"]])])


def test_health_is_503_while_a_sqlite_file_is_read_only(read_only_sqlite):
    collector = Collector(read_only_sqlite)
    try:
        assert collector.send(_batch()).status_code == 503  # ingest cannot succeed
        health = collector.http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable" and "read-only" in health.json()["detail"]
        assert collector.get("/v1/summary", window="1h")  # reads still work
    finally:
        collector.close()


def test_health_is_503_while_postgres_is_read_only(postgres):
    url = postgres.new_database()
    try:
        postgres.cluster._admin(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" SET default_transaction_read_only = on')
        collector = Collector(url)
        try:
            assert collector.send(_batch()).status_code == 503
            health = collector.http.get("/healthz")
            assert health.status_code == 503 and "read-only" in health.json()["detail"], health.text
        finally:
            collector.close()
    finally:
        postgres.drop(url)


def test_health_is_ok_on_a_database_that_takes_ingest(db_url):
    collector = Collector(db_url)
    try:
        assert collector.store(_batch())["stored"] == 1
        assert collector.get("/healthz")["status"] == "ok"
        assert collector.get("/healthz")["schema"] == head_revision()
    finally:
        collector.close()


def test_the_pruner_logs_one_line_per_kind_of_failure(read_only_sqlite, caplog):
    engine = make_engine(read_only_sqlite)
    try:
        retention = Retention(engine, raw_s=60, minute_rollups_s=60)
        with caplog.at_level(logging.INFO, logger="routelens.collector.store.retention"):
            for _ in range(3):
                retention.prune_round()
    finally:
        engine.dispose()
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    record = caplog.records[0]
    assert not record.exc_info and "readonly database" in record.getMessage()
    assert stat.S_ISREG(os.stat(read_only_sqlite[len("sqlite:///"):]).st_mode)

