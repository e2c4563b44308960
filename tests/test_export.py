"""Export (`GET /v1/export`, `routelens export`) and import (`routelens import`),
on SQLite and PostgreSQL, read back with pyarrow, pandas and DuckDB as users do."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import anyio
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routelens.collector.api.app import _export_stream
from routelens.collector.cli import main as routelens
from routelens.collector.cli.files import _output
from routelens.collector.export.schema import COLUMNS, EXPORT_SCHEMA_VERSION
from routelens.collector.export.stream import export as export_log
from routelens.collector.ingest.importer import import_files
from routelens.collector.ingest.writer import Ingestor
from routelens.collector.query.filters import Filters
from routelens.collector.store.db import make_engine
from tests.support.collector_app import Collector

PANELS = ("/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits", "/v1/timeseries")


class Log:
    """A small decision log with every case an export must get right."""

    def __init__(self, collector, make_source):
        self.t0 = t0 = time.time() - 120
        self.window = {"since": t0 - 60, "until": time.time() + 600}
        shop = make_source("shop-1", app="shop", labels={"router_version": "a"})
        search = make_source("search-1", app="search", deployment="Search", labels={"router_version": "b"})
        self.decisions, self.routed, self.completed = {}, [], []
        events = [shop.replicas(t0, ["r1", "r2", "r3"]), shop.stats(t0 + 0.1, "r1", {"throughput": 5})]
        for i in range(12):
            t = t0 + 1 + i
            replica = ["r1", "r2", "r3"][i % 3]
            # What the router said: a reason with a score, one without scores, nothing (wire format v3).
            explanation = [{"reason": "prefix match", "scores": {"match_rate": i / 16}},
                           {"reason": "pow-2 fallback"}, {}][i % 3]
            d = shop.decision(t, [[replica], [r for r in ("r1", "r2", "r3") if r != replica]],
                              request_id=f"req-{i}", internal_request_id=f"int-{i}", model_id=f"m{i % 2}",
                              **explanation,
                              candidates={replica: {"queue_len": i, "queue_len_age_s": 0.25, "stats": {"q": i},
                                                    "stats_age_s": 1.5, "stats_age_source": "stamped"}})
            # Every other answer with its queue lengths (wire format v2): believed i, as the decision saw it.
            r = shop.routed(t + 0.01, replica, d, queue_wait_ms=2.0,
                            quality=(i, i % 4, i + 1 + i % 3) if i % 2 == 0 else None)
            c = shop.completed(t + 0.05, replica, r, latency_ms=40.0 + i)
            events += [d, r, c]
            self.decisions[d["id"]] = d
            self.routed.append(r)
            self.completed.append(c)
        # A rejection: r1 refuses the first attempt, the second goes to r2.
        t = t0 + 20
        self.refused = shop.decision(t, [["r1"], ["r2"]], request_id="req-x", internal_request_id="int-x")
        rejection = shop.completed(t + 0.01, "r1", rejected=True, internal_request_id="int-x", quality=(3, 1, 5))
        self.retried = shop.decision(t + 0.02, [["r2"]], request_id="req-x", internal_request_id="int-x", attempt=1)
        retried_routed = shop.routed(t + 0.03, "r2", self.retried, attempts=2)
        # A FIFO hand-off: the ranking made for req-y served req-z.
        self.handed = shop.decision(t + 1, [["r3"]], request_id="req-y", internal_request_id="int-y")
        handoff = shop.routed(t + 1.01, "r3", self.handed, own_ranking=False, request_id="req-z",
                              internal_request_id="int-z")
        # A refusal that names its decision (wire format v2), made for req-p and handed to req-q, whose request
        # has no decision of its own: only the name tells whose it is.
        self.handed_refused = shop.decision(t + 2, [["r2"]], request_id="req-p", internal_request_id="int-p",
                                            candidates={"r2": {"queue_len": 2}})
        named_rejection = shop.completed(t + 2.01, "r2", rejected=True, internal_request_id="int-q",
                                         decision=self.handed_refused, quality=(2, 0, 2))
        events += [self.refused, rejection, self.retried, retried_routed, self.handed, handoff,
                   self.handed_refused, named_rejection]
        for d in (self.refused, self.retried, self.handed, self.handed_refused):
            self.decisions[d["id"]] = d
        self.routed += [retried_routed, handoff]
        self.completed += [rejection, named_rejection]
        collector.store(shop.batch(events[:20]))
        # A lost batch (seq 2) and drop counters, which a round trip must keep.
        collector.store(shop.batch(events[20:], seq=3, dropped={"queue_full": 4}, produced=len(events) + 4))
        s = search.decision(t0 + 5, [["s1"]], request_id="req-s", internal_request_id="int-s")
        sr = search.routed(t0 + 5.01, "s1", s)
        collector.store(search.batch([search.replicas(t0, ["s1"]), s, sr]))
        self.decisions[s["id"]] = s
        self.routed.append(sr)


@pytest.fixture
def log(collector, make_source) -> Log:
    return Log(collector, make_source)


def export(collector, **params) -> bytes:
    response = collector.http.get("/v1/export", params=params)
    assert response.status_code == 200, response.text
    return response.content


def parquet(collector, log, **params) -> pa.Table:
    return pq.read_table(io.BytesIO(export(collector, format="parquet", **log.window, **params)))


def test_decisions_parquet_one_row_per_decision_with_its_outcome(collector, log):
    table = parquet(collector, log)
    assert table.schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert isinstance(table.schema.field("labels").type, pa.MapType)
    assert table.schema.metadata[b"routelens.export_schema_version"] == b"1"
    rows = {row["decision_id"]: row for row in table.to_pylist()}
    assert set(rows) == set(log.decisions)
    for decision_id, sent in log.decisions.items():
        row = rows[decision_id]
        assert row["time"].timestamp() == pytest.approx(sent["ts"], abs=1e-6)
        assert row["ranks"] == sent["ranks"]
        assert (row["request_id"], row["internal_request_id"], row["model_id"], row["attempt"]) == (
            sent["request_id"], sent["internal_request_id"], sent["model_id"], sent["attempt"])
        assert [c["replica_id"] for c in row["candidates"]] == [r for rank in sent["ranks"] for r in rank]
        assert (row["reason"], None if row["scores"] is None else dict(row["scores"])) == (
            sent.get("reason"), sent.get("scores"))
    assert {row["reason"] for row in rows.values()} == {"prefix match", "pow-2 fallback", None}
    first = next(d for d in log.decisions.values() if d["request_id"] == "req-0")
    row = rows[first["id"]]
    assert (row["app"], row["deployment"], row["source_id"], dict(row["labels"])) == (
        "shop", "Checkout", "shop-1", {"router_version": "a"})
    assert (row["chosen_replica"], row["rank"], row["own_ranking"], row["queue_wait_ms"], row["latency_ms"],
            row["ok"], row["rejected"]) == ("r1", 0, True, 2.0, 40.0, True, False)
    assert row["candidates"][0] == {"replica_id": "r1", "rank": 0, "queue_len": 0, "queue_len_age_s": 0.25,
                                    "stats_age_s": 1.5, "stats_age_source": "stamped", "stats": '{"q":0}'}
    assert row["candidates"][1]["queue_len"] is None  # ranked, without inputs
    refused = rows[log.refused["id"]]
    assert (refused["chosen_replica"], refused["rejected"], refused["rank"]) == ("r1", True, None)
    retried = rows[log.retried["id"]]
    assert (retried["chosen_replica"], retried["rejected"], retried["attempt"]) == ("r2", False, 1)
    assert rows[log.handed["id"]]["own_ranking"] is False


def test_decisions_carry_their_answers_decision_quality(collector, log):
    """Regret and belief error of each decision's answer, by the definitions
    (design.md): the accepted ones' replica counted the request it accepted."""
    rows = {row["decision_id"]: row for row in parquet(collector, log).to_pylist()}
    for i in range(12):
        row = next(r for r in rows.values() if r["request_id"] == f"req-{i}")
        assert [row[name] for name in ANSWER] == answer_columns(i), i
    refused = rows[log.refused["id"]]  # refused: believed 3, shortest 1, the replica reported 5
    assert [refused[name] for name in ANSWER] == [3, 1, 2, 5, -2]
    assert [rows[log.retried["id"]][name] for name in ANSWER] == [None] * 5
    # A refusal that names its decision is that decision's outcome, whichever request it refused.
    named = rows[log.handed_refused["id"]]
    assert (named["chosen_replica"], named["rejected"]) == ("r2", True)
    assert [named[name] for name in ANSWER] == [2, 0, 2, 2, 0]


def test_routed_and_completed_rows_carry_their_answers_decision_quality(collector, log):
    """The same figures per routed event and per rejection, which is what the
    Rank hits view counts on each replica; a rejection names its decision."""
    routed = {row["request_id"]: row for row in parquet(collector, log, what="routed").to_pylist()}
    for i in range(12):
        assert [routed[f"req-{i}"][name] for name in ANSWER] == answer_columns(i), i
    completed = parquet(collector, log, what="completed").to_pylist()
    rejections = {row["internal_request_id"]: row for row in completed if row["rejected"]}
    assert {request: [row["decision_id"]] + [row[name] for name in ANSWER] for request, row in rejections.items()} \
        == {"int-x": [None, 3, 1, 2, 5, -2], "int-q": [log.handed_refused["id"], 2, 0, 2, 2, 0]}
    # A completion of a routed request is no answer: its routing's row has the figures.
    assert all(row[name] is None for row in completed if not row["rejected"] for name in ("decision_id", *ANSWER))


ANSWER = ("believed_queue_len", "shortest_queue_len", "regret", "reported_queue_len", "belief_error")


def answer_columns(i: int) -> list:
    """ANSWER of request req-i's routing: every other one without queue lengths (as in wire format v1), the
    others believed i, shortest i % 4, reported i + 1 + i % 3, which counts the request (belief error -(i % 3))."""
    return [None] * 5 if i % 2 else [i, i % 4, i - i % 4, i + 1 + i % 3, -(i % 3)]


def test_parquet_opens_in_duckdb_with_the_right_types(collector, log, tmp_path):
    path = tmp_path / "decisions.parquet"
    path.write_bytes(export(collector, format="parquet", **log.window))
    types = {row[0]: row[1] for row in duckdb.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()}
    assert types["time"] == "TIMESTAMP WITH TIME ZONE"
    assert types["labels"] == "MAP(VARCHAR, VARCHAR)"
    assert types["rejected"] == "BOOLEAN" and types["latency_ms"] == "DOUBLE" and types["attempt"] == "INTEGER"
    assert types["candidates"].startswith("STRUCT(replica_id VARCHAR, ") and types["candidates"].endswith("[]")
    # The rank-hit panel's figure, computed from the export.
    [(rank0, routed)] = duckdb.sql(f"SELECT count(*) FILTER (rank = 0), count(chosen_replica) FILTER (NOT rejected) "
                                   f"FROM '{path}' WHERE app = 'shop'").fetchall()
    hits = collector.get("/v1/rank-hits", app="shop", **log.window)
    assert routed == hits["routed"]
    assert rank0 == next(r["routed"] for r in hits["ranks"] if r["rank"] == "0")


def test_csv_opens_in_pandas(collector, log):
    frame = pd.read_csv(io.BytesIO(export(collector, format="csv", **log.window)))
    assert len(frame) == len(log.decisions)
    assert set(frame["decision_id"]) == set(log.decisions)
    times = pd.to_datetime(frame["time"], utc=True)
    assert times.min().timestamp() == pytest.approx(min(d["ts"] for d in log.decisions.values()), abs=1e-6)
    assert frame["own_ranking"].dropna().map(type).eq(bool).all()
    row = frame.set_index("decision_id").loc[log.refused["id"]]
    assert json.loads(row["ranks"]) == [["r1"], ["r2"]] and bool(row["rejected"])
    assert json.loads(row["labels"]) == {"router_version": "a"}
    assert [c["replica_id"] for c in json.loads(row["candidates"])] == ["r1", "r2"]
    explained = frame.set_index("decision_id").loc[next(d for d, e in log.decisions.items() if e["model_id"] == "m0"
                                                        and e.get("reason") == "prefix match")]
    sent = log.decisions[explained.name]
    assert (explained["reason"], json.loads(explained["scores"])) == (sent["reason"], sent["scores"])


def test_jsonl_rows_are_json_with_iso_times(collector, log):
    lines = export(collector, format="jsonl", **log.window).decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {row["decision_id"] for row in rows} == set(log.decisions)
    assert all(row["time"].endswith("Z") and "T" in row["time"] for row in rows)
    handed = next(row for row in rows if row["decision_id"] == log.handed["id"])
    assert handed["labels"] == {"router_version": "a"} and handed["candidates"][0]["replica_id"] == "r3"


@pytest.mark.parametrize("params, expected", [
    ({"app": "search"}, lambda log: {d for d, e in log.decisions.items() if e["request_id"] == "req-s"}),
    ({"label": "router_version=a"}, lambda log: {d for d, e in log.decisions.items() if e["request_id"] != "req-s"}),
    ({"request_id": "int-x"}, lambda log: {log.refused["id"], log.retried["id"]}),
    ({"model_id": "m1"}, lambda log: {d for d, e in log.decisions.items() if e["model_id"] == "m1"}),
    ({"reason": ["pow-2 fallback", "no such reason"]},
     lambda log: {d for d, e in log.decisions.items() if e.get("reason") == "pow-2 fallback"}),
    # A replica's decisions: those whose ranking sent a request to it.
    ({"replica": "r3"}, lambda log: {r["decision_id"] for r in log.routed if r["replica_id"] == "r3"}),
])
def test_filters_select_the_rows(collector, log, params, expected):
    table = parquet(collector, log, **params)
    assert set(table.column("decision_id").to_pylist()) == expected(log)


def test_a_window_selects_by_time(collector, log):
    since, until = log.t0 + 3, log.t0 + 6
    table = parquet(collector, log)
    inside = pq.read_table(io.BytesIO(export(collector, format="parquet", since=since, until=until)))
    assert set(inside.column("decision_id").to_pylist()) == {
        d for d, e in log.decisions.items() if since <= e["ts"] < until}
    assert inside.num_rows < table.num_rows


def test_normalized_tables(collector, log):
    candidates = parquet(collector, log, what="candidates").to_pylist()
    assert len(candidates) == sum(len(r) for d in log.decisions.values() for r in d["ranks"])
    chosen = {(c["decision_id"], c["replica_id"]) for c in candidates if c["chosen"]}
    assert chosen == {(r["decision_id"], r["replica_id"]) for r in log.routed}
    with_inputs = next(c for c in candidates if c["queue_len"] == 3)
    assert (with_inputs["node_id"], with_inputs["availability_zone"], with_inputs["stats"]) == (
        "node-r1", "az-1", '{"q":3}')
    routed = parquet(collector, log, what="routed").to_pylist()
    assert {r["routed_id"] for r in routed} == {r["id"] for r in log.routed}
    handoff = next(r for r in routed if r["request_id"] == "req-z")
    assert (handoff["own_ranking"], handoff["decision_id"], handoff["latency_ms"]) == (False, log.handed["id"], None)
    completed = parquet(collector, log, what="completed").to_pylist()
    assert {c["completed_id"] for c in completed} == {c["id"] for c in log.completed}
    assert [c["replica_id"] for c in completed if c["rejected"]] == ["r1", "r2"]


@pytest.mark.parametrize("params, message", [
    ({"what": "events", "format": "csv"}, "JSON Lines only"),
    ({"what": "events", "format": "jsonl", "replica": "r1"}, "whole sources"),
    ({"what": "completed", "model_id": "m1"}, "no model id"),
    ({"what": "routed", "reason": "prefix match"}, "reason is a decision's"),
    ({"format": "xml"}, "'csv', 'jsonl' or 'parquet'"),
    ({"what": "everything"}, "decisions"),
    ({"since": "yesterday"}, "not a time"),
])
def test_bad_export_requests_are_refused(collector, log, params, message):
    response = collector.http.get("/v1/export", params=params)
    assert response.status_code == 422
    assert message in response.text


def test_cli_writes_what_the_api_streams(collector, log, db_url, tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "decisions.csv"
    since, until = str(log.window["since"]), str(log.window["until"])
    assert routelens(["export", "--db", db_url, "-o", str(out), "--since", since, "--until", until]) == 0
    assert out.read_bytes() == export(collector, format="csv", since=since, until=until)
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left
    # No window given: everything recorded.
    everything = tmp_path / "all.parquet"
    assert routelens(["export", "--db", db_url, "-o", str(everything), "--app", "shop", "--what", "routed"]) == 0
    assert pq.read_metadata(everything).num_rows == sum(r["request_id"] != "req-s" for r in log.routed)


def test_cli_refuses_what_it_cannot_do(db_url, tmp_path, capsys):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    assert routelens(["export", "--db", db_url, "-o", str(tmp_path / "out.txt")]) == 2
    assert "give --format" in capsys.readouterr().err
    assert routelens(["export", "--db", db_url, "-o", "-", "--format", "csv", "--what", "events"]) == 2
    assert "JSON Lines only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_interrupted_export_leaves_no_file_under_the_final_name(tmp_path):
    out = tmp_path / "export.parquet"
    out.write_bytes(b"the previous export")
    with pytest.raises(KeyboardInterrupt):
        with _output(str(out)) as file:
            file.write(b"half of a new export")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"the previous export"
    assert list(tmp_path.iterdir()) == [out]


# --- import ---

def sink_file(path, batches) -> str:
    """A file as the tracer's JSON Lines sink writes it: one batch per line."""
    path.write_text("".join(json.dumps(batch) + "\n" for batch in batches))
    return str(path)


def test_import_loads_sink_files_and_reports_bad_lines(db_url, make_source, tmp_path, capsys):
    src = make_source("s1")
    t0 = time.time() - 60
    good = [src.batch([src.decision(t0 + i, [["r1"]], request_id=f"q{i}")]) for i in range(3)]
    bad = src.batch([src.decision(t0 + 9, [["r1"]])])
    bad["events"][0]["attempt"] = "first"  # a schema violation: nothing of this batch may be stored
    first = sink_file(tmp_path / "a.jsonl", good[:2] + [bad])
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps(good[2]) + "\n\n" + json.dumps(good[2])[:40] + "\n")  # a cut-off last line
    assert routelens(["import", first, str(second), "--db", db_url]) == 1
    err = capsys.readouterr().err
    assert f"{first}:3: " in err and "$.events[0].attempt" in err
    assert f"{second}:3: malformed JSON" in err
    assert "3 batches, 3 events stored, 0 already there, 2 bad lines" in err
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM decisions").scalar() == 3
        # Idempotent: importing again stores nothing twice.
        report = import_files(Ingestor(engine), [first, str(second)], 1000)
        assert (report.batches, report.stored, report.duplicates) == (3, 0, 3)
    finally:
        engine.dispose()


@pytest.mark.parametrize("events_per_batch", [1000, 2], ids=["one-page", "pages-of-2"])
def test_events_export_then_import_gives_the_same_panels(collector, log, tmp_path, make_collector, monkeypatch,
                                                         events_per_batch):
    """The lossless path: events out of one database, into an empty one; each
    table read a page of `events_per_batch` at a time (a key range each)."""
    monkeypatch.setattr("routelens.collector.export.wire_batches.EVENTS_PER_BATCH", events_per_batch)
    path = tmp_path / "events.jsonl"
    path.write_bytes(export(collector, what="events", format="jsonl", **log.window))
    target = Collector(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        report = import_files(Ingestor(target.engine), [str(path)], 20_000)
        assert not report.problems
        assert report.stored == sum(len(json.loads(line)["events"]) for line in path.read_text().splitlines())
        for panel in PANELS:
            for app in ("shop", "search"):
                original = collector.get(panel, app=app, **log.window)
                copied = target.get(panel, app=app, **log.window)
                assert copied == original, panel
        assert target.get("/v1/summary", **log.window)["batch_gaps"] == 1
        assert target.get("/v1/summary", **log.window)["dropped_events"] == 4
        original = parquet(collector, log)
        copied = pq.read_table(io.BytesIO(export(target, format="parquet", **log.window)))
        assert copied.equals(original)
    finally:
        target.close()


def test_docs_describe_every_column():
    """docs/export.md is the schema users read: it must be the one written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    assert f"# Export schema, version {EXPORT_SCHEMA_VERSION}" in text
    for what, columns in COLUMNS.items():
        section = text.split(f"### `{what}`")[1].split("###")[0]
        documented = re.findall(r"^\| `([a-z_]+)` \| `([^`]+)` \|", section, re.M)
        assert documented == [(column.name, str(column.arrow)) for column in columns], what


# --- streams that stop early, chunk edges, odd inputs ---

def test_a_consumer_that_stops_early_stops_the_reader(collector, log, monkeypatch):
    """The reader thread runs ahead; closing the export must not wait on it forever,
    and must hand the connection back."""
    monkeypatch.setattr("routelens.collector.export.chunks.CHUNK_ROWS", 2)
    window = Filters(since=log.window["since"], until=log.window["until"])
    for _ in range(3):
        with collector.engine.connect() as connection:
            chunks = export_log(connection, window, "decisions", "csv")
            next(chunks)
            closing = threading.Thread(target=chunks.close)
            closing.start()
            closing.join(10)
            assert not closing.is_alive(), "closing the export hung"


def test_the_http_stream_closes_the_export_when_the_client_leaves(collector, log):
    window = Filters(since=log.window["since"], until=log.window["until"])
    pool = collector.engine.pool

    async def first_chunk_then_leave():
        stream = _export_stream(collector.engine, window, "decisions", "jsonl")
        assert await stream.__anext__()
        await stream.aclose()

    anyio.run(first_chunk_then_leave)
    assert pool.checkedout() == 0


def test_a_chunk_of_only_a_repeated_row(collector, make_source, monkeypatch):
    """A routing with two completions repeats its row in the join; at a chunk's
    edge that chunk may hold nothing new."""
    monkeypatch.setattr("routelens.collector.export.chunks.CHUNK_ROWS", 1)
    src = make_source("s1")
    t = time.time() - 30
    d = src.decision(t, [["r1"]], request_id="q", internal_request_id="iq")
    r = src.routed(t + 0.01, "r1", d)
    collector.store(src.batch([d, r, src.completed(t + 0.02, "r1", r), src.completed(t + 0.03, "r1", r)]))
    window = {"since": t - 1, "until": t + 60}
    assert pq.read_table(io.BytesIO(export(collector, format="parquet", what="routed", **window))).num_rows == 1
    assert pq.read_table(io.BytesIO(export(collector, format="parquet", **window))).num_rows == 1


def test_a_replica_filter_keeps_every_ranked_replica_named(collector, log):
    rows = parquet(collector, log, replica="r3").to_pylist()
    assert rows and all(None not in rank for row in rows for rank in row["ranks"])
    assert {c["replica_id"] for row in rows for c in row["candidates"]} >= {"r1", "r2", "r3"}


def test_the_file_gets_the_usual_permissions(collector, log, db_url, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    previous = os.umask(0o022)
    try:
        assert routelens(["export", "--db", db_url, "-o", str(out / "d.csv")]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((out / "d.csv").stat().st_mode) == 0o644


def test_an_export_into_a_missing_directory_is_a_usage_error(db_url, tmp_path, capsys):
    assert routelens(["export", "--db", db_url, "-o", str(tmp_path / "nowhere" / "d.csv")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_cut_off_gzip_file_is_reported_not_a_crash(db_url, make_source, tmp_path, capsys):
    src = make_source("s1")
    t0 = time.time() - 60
    lines = "".join(json.dumps(src.batch([src.decision(t0 + i, [["r1"]])])) + "\n" for i in range(50)).encode()
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(gzip.compress(lines)[:-30])
    assert routelens(["import", str(path), "--db", db_url]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and "Traceback" not in err
