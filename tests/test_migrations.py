"""The database schema: Alembic migrations on SQLite and PostgreSQL, the
schema check at start, `routelens db`, and migrations shipped in the wheel."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

from routelens.collector.api.app import create_app
from routelens.collector.settings import Settings
from routelens.collector.store.db import DatabaseError, current_revision, downgrade, head_revision, make_engine, upgrade
from routelens.collector.store.models import Base, prefix_rollups, routed
from tests.support.collector_app import Collector
from tests.support.python_child import run_python
from tests.support.wire_source import WireSource

ROOT = Path(__file__).resolve().parent.parent
MODEL_TABLES = set(Base.metadata.tables)


def _state(url):
    """(revision, tables) of the database."""
    engine = make_engine(url)
    try:
        return current_revision(engine), set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _stores_a_batch(url):
    collector = Collector(url)
    try:
        src = WireSource("s1")
        d = src.decision(1.8e9, [["r1"]])
        assert collector.store(src.batch([d, src.routed(1.8e9, "r1", d)])) == {"stored": 2, "duplicates": 0}
    finally:
        collector.close()


def test_empty_to_head_to_base_to_head(empty_db_url):
    assert _state(empty_db_url)[0] is None
    upgrade(empty_db_url)
    assert _state(empty_db_url) == (head_revision(), MODEL_TABLES | {"alembic_version"})
    downgrade(empty_db_url, "base")
    revision, tables = _state(empty_db_url)
    assert revision is None and tables <= {"alembic_version"}
    upgrade(empty_db_url)
    assert _state(empty_db_url) == (head_revision(), MODEL_TABLES | {"alembic_version"})
    _stores_a_batch(empty_db_url)


def test_the_expected_head_is_alembics_head():
    """`collector.store.db` reads the scripts' revisions without Alembic: they, and the head it finds, must be Alembic's."""
    from alembic.script import ScriptDirectory

    from routelens.collector.store.db import alembic_config, script_revisions

    scripts = ScriptDirectory.from_config(alembic_config("sqlite:///unused.db"))
    assert head_revision() == scripts.get_current_head()
    assert script_revisions() == {
        script.revision: tuple(down) if isinstance(down := script.down_revision, (tuple, list)) else (down,)
        for script in scripts.walk_revisions()}


def test_the_version_is_read_as_alembic_reads_it(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert current_revision(engine) == MigrationContext.configure(connection).get_current_revision()
            assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_checking_a_version_imports_no_alembic(db_url):
    """An export's memory: checking the schema leaves Alembic (some 11 MB) unimported."""
    script = textwrap.dedent(f"""
        import sys
        from routelens.collector.store.db import check_schema, make_engine
        check_schema(make_engine({db_url!r}), {db_url!r})
        print("alembic" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


def test_models_and_migrations_agree(db_url):
    """Autogenerate, run against a database the migrations made, finds nothing to do."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_a_new_sqlite_file_is_created_at_head(tmp_path):
    for url in (f"sqlite:///{tmp_path / 'by-url.db'}", str(tmp_path / "by-path.db")):
        _stores_a_batch(url)
        assert _state(url) == (head_revision(), MODEL_TABLES | {"alembic_version"})


def test_the_app_refuses_a_database_without_the_schema(empty_db_url):
    if empty_db_url.startswith("sqlite"):
        # A SQLite file that holds something else (a new, empty one is created at head).
        with sqlite3.connect(empty_db_url[len("sqlite:///"):]) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
    else:
        engine = make_engine(empty_db_url)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE notes (text TEXT)")
        engine.dispose()
    with pytest.raises(DatabaseError) as refused:
        create_app(Settings(db_url=empty_db_url))
    assert f"run `routelens db upgrade --db {empty_db_url}`" in str(refused.value)
    assert _state(empty_db_url) == (None, {"notes"})  # left as it was


def test_the_app_refuses_a_database_it_cannot_open(tmp_path):
    garbage = tmp_path / "not-a-database.db"
    garbage.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(DatabaseError, match="cannot open the database"):
        create_app(Settings(db_url=str(garbage)))
    with pytest.raises(DatabaseError, match="cannot open the database"):
        create_app(Settings(db_url="postgresql://nobody@127.0.0.1:1/routelens"))


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelens.collector.cli", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=120)


def _next_migration(down_revision: str) -> str:
    """A later version's migration, following this version's head."""
    return textwrap.dedent(f'''
        """A later version's migration (test).

        Revision ID: 9999
        Revises: {down_revision}
        """
        from alembic import op
        import sqlalchemy as sa

        revision = "9999"
        down_revision = "{down_revision}"
        branch_labels = None
        depends_on = None


        def upgrade():
            op.create_table("later_feature", sa.Column("pk", sa.Integer(), primary_key=True))


        def downgrade():
            op.drop_table("later_feature")
    ''')


def test_a_database_behind_head_is_refused_until_upgraded(db_url, tmp_path):
    """A later routelens (this code plus a migration) on this version's database."""
    head = head_revision()
    later = tmp_path / "later" / "routelens"
    for package in ("collector", "migrations", "routers"):
        shutil.copytree(ROOT / package, later / package, ignore=shutil.ignore_patterns("__pycache__"))
    (later / "migrations" / "versions" / "9999_later_feature.py").write_text(_next_migration(head))
    result = run_python(f"""
        from routelens import migrations
        assert migrations.__file__.startswith({str(later)!r}), migrations.__file__
        from routelens.collector.api.app import create_app
        from routelens.collector.cli import main
        from routelens.collector.store.db import DatabaseError
        from routelens.collector.settings import Settings
        try:
            create_app(Settings(db_url={db_url!r}))
        except DatabaseError as exc:
            print("refused:", exc)
        main(["db", "upgrade", "--db", {db_url!r}])
        create_app(Settings(db_url={db_url!r}))
        print("started")
    """, cwd=later.parent, pythonpath=later.parent)
    assert result.returncode == 0, result.stderr
    refused, upgraded, started = result.stdout.splitlines()
    assert refused == (f"refused: the database schema ({head}) is behind this routelens (9999): "
                       f"run `routelens db upgrade --db {db_url}`")
    assert upgraded == "database at 9999 (head: 9999)"
    assert started == "started"
    # This version now finds the database ahead of it.
    with pytest.raises(DatabaseError, match=rf"\(9999\) is newer than this routelens \({head}\): upgrade routelens"):
        create_app(Settings(db_url=db_url))


def test_example_routers_stored_under_their_old_module_take_the_new_one(empty_db_url):
    """Databases written before routelens had one namespace name its example routers
    `routers.examples.X`; after the upgrade they are the routers today's tracer sends."""
    upgrade(empty_db_url, "0001")
    engine = make_engine(empty_db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO deployments (pk, app, deployment) VALUES (1, 'shop', 'Checkout')")
        for pk, router_class in ((1, "routers.examples.TracedPowerOfTwoChoicesRequestRouter"),
                                 (2, "routers.examples_of_mine.TracedPowerOfTwoChoicesRequestRouter")):
            connection.exec_driver_sql(
                "INSERT INTO routers (pk, deployment_pk, router_class, labels, labels_key) "
                f"VALUES ({pk}, 1, '{router_class}', '{{}}', '{{}}')")
    engine.dispose()
    upgrade(empty_db_url)
    collector = Collector(empty_db_url)
    try:
        source = WireSource("s1", router_class="routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter")
        decision = source.decision(1.8e9, [["r1"]])
        collector.store(source.batch([decision]))
        with collector.engine.connect() as connection:
            stored = connection.exec_driver_sql("SELECT pk, router_class FROM routers ORDER BY pk").all()
    finally:
        collector.close()
    # The batch joined the renamed router; a user's own module of a similar name kept its name.
    assert [tuple(row) for row in stored] == [
        (1, "routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter"),
        (2, "routers.examples_of_mine.TracedPowerOfTwoChoicesRequestRouter")]
    downgrade(empty_db_url, "0001")
    engine = make_engine(empty_db_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT router_class FROM routers WHERE pk = 1").scalar() == (
            "routers.examples.TracedPowerOfTwoChoicesRequestRouter")
    engine.dispose()


def _routed_at(url: str, revision: str) -> int:
    """A database at `revision` holding 7 routed requests of shop/Checkout in its rollups and one routed
    row, written as that revision wrote them; returns the minute they are in."""
    upgrade(url, revision)
    minute = (int(time.time()) - 600) // 60 * 60
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in (
                "INSERT INTO deployments (pk, app, deployment) VALUES (1, 'shop', 'Checkout')",
                "INSERT INTO routers (pk, deployment_pk, router_class, labels, labels_key) "
                "VALUES (1, 1, 'R', '{}', '{}')",
                "INSERT INTO replicas (pk, deployment_pk, replica_id, first_seen) VALUES (1, 1, 'r1', 0)",
                f"INSERT INTO rollups (grain, start, router_pk, replica_pk, routed) VALUES (60, {minute}, 1, 0, 7), "
                f"(60, {minute}, 1, 1, 7), (3600, {minute // 3600 * 3600}, 1, 0, 7), "
                f"(3600, {minute // 3600 * 3600}, 1, 1, 7)"):
            connection.exec_driver_sql(statement)
        connection.execute(routed.insert().values(id=uuid.uuid4().bytes, ts=minute, router_pk=1, source_pk=1,
                                                  replica_pk=1))
    engine.dispose()
    return minute


def _downgraded(url: str, revision: str):
    """Downgrade to `revision`: the columns of routed, completed and rollups then, and the routed rows kept."""
    downgrade(url, revision)
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        columns = {table: {column["name"] for column in inspector.get_columns(table)}
                   for table in ("routed", "completed", "rollups")}
        with engine.connect() as connection:
            return columns, connection.exec_driver_sql("SELECT count(*) FROM routed").scalar()
    finally:
        engine.dispose()


def test_0006_adds_decision_quality_and_rows_before_it_read_as_unknown(empty_db_url):
    """Rows written at 0005 (answers without queue lengths, rollups without
    their figures) stay as they were, their decision quality unknown; answers
    stored after it have theirs; the downgrade takes the new columns away and
    keeps every row."""
    minute = _routed_at(empty_db_url, "0005")
    upgrade(empty_db_url)
    window = {"since": minute - 60, "until": minute + 120}
    collector = Collector(empty_db_url)
    try:
        with collector.engine.connect() as connection:
            assert connection.execute(select(routed.c.believed_queue_len, routed.c.shortest_queue_len,
                                             routed.c.reported_queue_len)).all() == [(None, None, None)]
        before = collector.get("/v1/rank-hits", **window)
        assert before["routed"] == 7 and before["decision_quality"]["regret"]["samples"] == 0
        assert before["decision_quality"]["regret"]["mean"] is None
        source = WireSource("s1", router_class="R", app="shop", deployment="Checkout")
        d = source.decision(minute + 1, [["r1"]])
        collector.store(source.batch([d, source.routed(minute + 2, "r1", d, quality=(3, 1, 2))]))
        after = collector.get("/v1/rank-hits", **window)["decision_quality"]
        assert (after["regret"]["samples"], after["regret"]["mean"], after["belief_error"]["mean"]) == (1, 2.0, 2.0)
    finally:
        collector.close()
    columns, routed_rows = _downgraded(empty_db_url, "0005")
    assert not columns["routed"] & {"reported_queue_len", "believed_queue_len"}
    assert "decision_id" not in columns["completed"]
    assert not columns["rollups"] & {"regret_0", "regret_sum"}
    assert routed_rows == 2


def test_0008_adds_send_to_routed_and_rows_before_it_read_as_unknown(empty_db_url):
    """Routed rows and rollups written at 0007 have no send_to_routed_ms:
    unknown (no samples, no figure), never 0; routed events stored after it
    have theirs; the downgrade takes the columns away and keeps every row."""
    minute = _routed_at(empty_db_url, "0007")
    upgrade(empty_db_url)
    window = {"since": minute - 60, "until": minute + 120}
    collector = Collector(empty_db_url)
    try:
        with collector.engine.connect() as connection:
            assert connection.execute(select(routed.c.send_to_routed_ms)).all() == [(None,)]
        before = collector.get("/v1/rank-hits", **window)
        assert before["routed"] == 7 and before["send_to_routed_ms"] == {
            "samples": 0, "p50": None, "p99": None, "max": None, "mean": None}
        source = WireSource("s1", router_class="R", app="shop", deployment="Checkout")
        d = source.decision(minute + 1, [["r1"]])
        collector.store(source.batch([d, source.routed(minute + 2, "r1", d, send_to_routed_ms=3.0)]))
        after = collector.get("/v1/rank-hits", **window)["send_to_routed_ms"]
        assert (after["samples"], after["mean"], after["max"]) == (1, 3.0, 3.0)
    finally:
        collector.close()
    columns, routed_rows = _downgraded(empty_db_url, "0007")
    assert "send_to_routed_ms" not in columns["routed"]
    assert not columns["rollups"] & {"send_to_routed_ms_0", "send_to_routed_ms_sum", "send_to_routed_ms_max"}
    assert routed_rows == 2


def _assert_same_prefix_rows(backfilled, made_by_ingest):
    """The same `prefix_rollups` rows: keys and counts exactly, sums added in another order to the last digits."""
    assert [tuple(row[:6]) + (row.match_rates,) for row in backfilled] == [
        tuple(row[:6]) + (row.match_rates,) for row in made_by_ingest]
    sums = [[value for row in rows for value in (row.match_rate_sum, row.prompt_chars_sum)]
            for rows in (backfilled, made_by_ingest)]
    assert sums[0] == pytest.approx(sums[1])


def test_0009_fills_prefix_rollups_from_the_rows_stored_as_ingest_does(empty_db_url):
    """Prefix rollups made by the upgrade from the raw rows stored are those
    ingest made of them, and Prefix affinity reads the same from either; the
    downgrade drops the table and keeps every raw row."""
    upgrade(empty_db_url)
    hour = (int(time.time()) - 7200) // 3600 * 3600
    source = WireSource("s1", router_class="R", app="llm", deployment="FakeLLM")
    events = []
    for n in range(40):
        ts = hour + 3000 + n * 37.3  # over two hours
        d = source.decision(ts, [["r1", "r2"]], request_id=f"q{n}", reason="prefix_match",
                            scores={"match_rate": n / 40} if n % 3 else None)
        if n % 5:
            d["attributes"] = {"prefix_group": f"g{n % 4}", "prompt_chars": 100 + n}
        events += [d, source.routed(ts + 0.01, ("r1", "r2")[n % 2], d, own_ranking=n % 9 != 0)]
    window = {"since": hour, "until": hour + 7200}
    collector = Collector(empty_db_url)
    try:
        collector.store(source.batch(events))
        ingested = collector.get("/v1/prefix-affinity", **window)
        with collector.engine.connect() as connection:
            made_by_ingest = connection.execute(select(prefix_rollups).order_by(*prefix_rollups.c)).all()
    finally:
        collector.close()
    assert made_by_ingest and ingested["total"]["requests"] == sum(1 for n in range(40) if n % 5 and n % 9)
    downgrade(empty_db_url, "0008")
    assert "prefix_rollups" not in _state(empty_db_url)[1]
    upgrade(empty_db_url)
    collector = Collector(empty_db_url)
    try:
        with collector.engine.connect() as connection:
            backfilled = connection.execute(select(prefix_rollups).order_by(*prefix_rollups.c)).all()
            assert connection.execute(select(func.count()).select_from(routed)).scalar() == 40
        assert collector.get("/v1/prefix-affinity", **window) == ingested
    finally:
        collector.close()
    _assert_same_prefix_rows(backfilled, made_by_ingest)


def _indexes_named(url, name):
    """Whether the database holds an index of that name (SQLAlchemy does not reflect SQLite's on expressions)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            catalog = ("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = :name"
                       if engine.dialect.name == "sqlite" else
                       "SELECT count(*) FROM pg_indexes WHERE indexname = :name")
            return connection.execute(text(catalog), {"name": name}).scalar()
    finally:
        engine.dispose()


def test_0010_adds_quarter_days_from_the_hourly_rows_as_ingest_does(empty_db_url):
    """Quarter-day prefix rollups made by the upgrade from the hourly rows are those ingest made, with the
    index the week's view reads; the downgrade takes both away and keeps the hourly rows."""
    upgrade(empty_db_url)
    quarter = (int(time.time()) - 3 * 86400) // 21600 * 21600
    source = WireSource("s1", router_class="R", app="llm", deployment="FakeLLM")
    events = []
    for n in range(60):
        ts = quarter + 1000 + n * 1811.7  # over 30 hours: six quarter days
        d = source.decision(ts, [["r1", "r2", "r3"]], request_id=f"q{n}", reason="prefix_match",
                            scores={"match_rate": n / 60} if n % 4 else None)
        d["attributes"] = {"prefix_group": f"g{n % 3}", "prompt_chars": 100 + n}
        events += [d, source.routed(ts + 0.01, ("r1", "r2", "r3")[n % 5 % 3], d)]
    week = {"since": quarter - 3 * 86400 - 21599.5, "until": quarter + 4 * 86400}  # whole quarter days inside
    quarter_days = select(prefix_rollups).where(prefix_rollups.c.grain == 21600).order_by(*prefix_rollups.c)
    collector = Collector(empty_db_url)
    try:
        collector.store(source.batch(events))
        ingested = collector.get("/v1/prefix-affinity", **week)
        with collector.engine.connect() as connection:
            made_by_ingest = connection.execute(quarter_days).all()
    finally:
        collector.close()
    assert ingested["step_s"] == 21600 and ingested["total"]["requests"] == 60
    assert len({row.start for row in made_by_ingest}) >= 5
    assert _indexes_named(empty_db_url, "ix_prefix_rollups_by_block") == 1
    downgrade(empty_db_url, "0009")
    assert _indexes_named(empty_db_url, "ix_prefix_rollups_by_block") == 0
    engine = make_engine(empty_db_url)  # not a collector: it would refuse a database below head
    try:
        with engine.connect() as connection:
            assert connection.execute(quarter_days).all() == []
            assert connection.execute(select(func.sum(prefix_rollups.c.routed)).where(
                prefix_rollups.c.grain == 3600)).scalar() == 60
    finally:
        engine.dispose()
    upgrade(empty_db_url)
    collector = Collector(empty_db_url)
    try:
        with collector.engine.connect() as connection:
            backfilled = connection.execute(quarter_days).all()
        assert collector.get("/v1/prefix-affinity", **week) == ingested
    finally:
        collector.close()
    assert _indexes_named(empty_db_url, "ix_prefix_rollups_by_block") == 1
    _assert_same_prefix_rows(backfilled, made_by_ingest)


def test_cli_db_upgrade_and_current(empty_db_url):
    before = _cli("db", "current", "--db", empty_db_url)
    assert before.returncode == 0, before.stderr
    assert before.stdout.split() == ["current:", "(none)", "head:", head_revision(), "(empty)"]
    if empty_db_url.startswith("sqlite:///"):
        assert not os.path.exists(empty_db_url[len("sqlite:///"):])  # asking created no file
    upgraded = _cli("db", "upgrade", "--db", empty_db_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == f"database at {head_revision()} (head: {head_revision()})"
    after = _cli("db", "current", "--db", empty_db_url)
    assert after.stdout.split() == ["current:", head_revision(), "head:", head_revision(), "(at", "head)"]
    assert _state(empty_db_url) == (head_revision(), MODEL_TABLES | {"alembic_version"})


def test_cli_db_reports_an_unreachable_database():
    result = _cli("db", "upgrade", "--db", "postgresql://nobody@127.0.0.1:1/routelens")
    assert result.returncode == 1
    assert result.stderr.startswith("routelens db: cannot open the database")
    assert "Traceback" not in result.stderr
