"""The PostgreSQL fixture itself: without PostgreSQL, its tests are skipped on
a laptop but fail in CI (CI set), so that CI never passes without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from sqlalchemy import text

from routelens.collector.store.db import make_engine

ROOT = Path(__file__).resolve().parent.parent
A_POSTGRES_TEST = "tests/test_migrations.py::test_models_and_migrations_agree[postgres]"


@pytest.fixture(scope="module")
def without_postgres() -> Dict[str, subprocess.CompletedProcess]:
    """A PostgreSQL test run by pytest where PostgreSQL is missing, on a laptop
    ("") and in CI ("true"): both runs at once, each in a process of its own."""
    runs = {}
    for ci in ("", "true"):
        env = {**os.environ, "ROUTELENS_PG_BINDIR": "/nonexistent/postgresql/bin"}
        env.pop("CI", None)
        if ci:
            env["CI"] = ci
        runs[ci] = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", A_POSTGRES_TEST],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = {}
        for ci, run in runs.items():
            stdout, stderr = run.communicate(timeout=120)
            results[ci] = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
        return results
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()


def test_without_postgresql_tests_are_skipped_on_a_laptop(without_postgres):
    result = without_postgres[""]
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    assert "PostgreSQL binaries missing in /nonexistent/postgresql/bin" in result.stdout


def test_without_postgresql_tests_fail_in_ci(without_postgres):
    result = without_postgres["true"]
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert "CI must test against PostgreSQL: PostgreSQL binaries missing" in result.stdout


def test_the_cluster_runs_postgresql_15_or_later(postgres):
    url = postgres.new_database()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SHOW server_version_num")).scalar()
            fsync = connection.execute(text("SHOW fsync")).scalar()
    finally:
        engine.dispose()
        postgres.drop(url)
    assert int(version) >= 150000
    assert fsync == "off"
