"""Ingest (POST /v1/events) through the real app, on SQLite and on PostgreSQL.

What is stored is read back from the database and through the read API;
refused batches must leave every table as it was.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import tracemalloc
import uuid
import zlib

import pytest
from sqlalchemy import select

from routelens.collector.ingest.importer import import_files
from routelens.collector.ingest.writer import Ingestor
from routelens.collector.store.models import Replica, completed, decisions, memberships, routed, stats_changes
from tests.support.collector_app import Collector

WINDOW = {"window": "1h"}  # the read API's window: events here are stamped "now"


def _now() -> float:
    return time.time() - 30  # events a little in the past, inside any window ending now


def _traffic(src, ts, n, replicas=("r1", "r2", "r3")):
    """n requests (decision, routed, completed each); request i goes to replicas[i % len(replicas)]."""
    events = []
    for i in range(n):
        t = ts + i * 0.01
        replica = replicas[i % len(replicas)]
        d = src.decision(t, [[replica], [r for r in replicas if r != replica]], request_id=f"req-{i}",
                         internal_request_id=f"int-{t}-{i}",
                         candidates={replica: {"queue_len": 1, "stats_age_s": 0.2, "stats_age_source": "stamped"}})
        r = src.routed(t + 0.001, replica, d)
        events += [d, r, src.completed(t + 0.002, replica, r)]
    return events


def _stored_ids(collector, table) -> set:
    with collector.engine.connect() as connection:
        return {row.id for row in connection.execute(select(table.c.id))}


# --- storing and idempotence ---

@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_batch_is_stored_and_counted(collector, make_source, compress):
    src = make_source("s1")
    ts = _now()
    events = [src.replicas(ts, ["r1", "r2", "r3"]), src.stats(ts, "r1", {"qps": 3.0}, collected_at=ts - 0.1),
              *_traffic(src, ts, 4)]
    answer = collector.store(src.batch(events), compress=compress)
    assert answer == {"stored": len(events), "duplicates": 0}
    for table, kind in ((decisions, "decision"), (routed, "routed"), (completed, "completed"),
                        (stats_changes, "stats"), (memberships, "replicas")):
        assert _stored_ids(collector, table) == {e["id"] for e in events if e["type"] == kind}
    summary = collector.get("/v1/summary", **WINDOW)
    assert (summary["decisions"], summary["routed"], summary["completions"]) == (4, 4, 4)


def test_resent_batch_stores_nothing_twice(collector, make_source):
    src = make_source("s1")
    batch = src.batch([src.replicas(_now(), ["r1", "r2", "r3"]), *_traffic(src, _now(), 9)])
    first = collector.store(batch)
    counts, rollup_rows = collector.table_counts(), collector.rollup_rows()
    window = {"since": time.time() - 3600, "until": time.time() + 60}
    paths = ("/v1/summary", "/v1/distribution", "/v1/rank-hits", "/v1/staleness", "/v1/timeseries")
    panels = {path: collector.get(path, **window) for path in paths}
    again = collector.store(batch)
    assert first == {"stored": 28, "duplicates": 0}
    assert again == {"stored": 0, "duplicates": 28}
    assert collector.table_counts() == counts
    assert collector.rollup_rows() == rollup_rows
    assert {path: collector.get(path, **window) for path in paths} == panels
    assert panels["/v1/summary"]["routed"] == 9


@pytest.fixture
def reference_collector(request, tmp_path):
    """A second collector, on a fresh database of the same backend: what storing each event once gives."""
    if "postgres" in request.node.callspec.id:
        server = request.getfixturevalue("postgres")
        url = server.new_database()
    else:
        url = f"sqlite:///{tmp_path / 'reference.db'}"
    made = Collector(url)
    yield made
    made.close()
    if url.startswith("postgresql"):
        server.drop(url)


def _hostile_batches(src):
    """One source's traffic, sent as batches that repeat events within
    themselves and across batches; and the events, each once."""
    ts = _now()
    events = [src.replicas(ts, ["r1", "r2", "r3"]), *_traffic(src, ts, 12)]
    repeated = [events[0], *events[1:19], *events[10:19], events[5], *events[19:], *events[19:25], events[-1]]
    return [src.batch(repeated[:30]), src.batch(repeated[20:]), src.batch(events[30:])], events


@pytest.mark.parametrize("through", ["POST /v1/events", "routelens import"])
def test_repeated_events_are_stored_and_counted_once(collector, reference_collector, make_source, tmp_path, through):
    """Rollups equal what the raw rows say, whatever a client repeats: the
    answer's counts are the rows written, and every rollup row, field by
    field, is what storing each event once gives."""
    src = make_source("s1")
    batches, events = _hostile_batches(src)
    if through == "POST /v1/events":
        answers = [collector.store(batch) for batch in batches]
        assert sum(a["stored"] for a in answers) == len(events)
        assert [a["stored"] + a["duplicates"] for a in answers] == [len(b["events"]) for b in batches]
    else:
        path = tmp_path / "batches.jsonl"
        path.write_text("".join(json.dumps(batch) + "\n" for batch in batches))
        report = import_files(Ingestor(collector.engine), [str(path)], 20_000)
        assert (report.stored, report.duplicates) == (len(events), sum(len(b["events"]) for b in batches) - len(events))
    reference_collector.store(src.batch(events))
    assert collector.table_counts()["decisions"] == sum(e["type"] == "decision" for e in events)
    assert collector.rollup_rows() == reference_collector.rollup_rows()
    summary = collector.get("/v1/summary", **WINDOW)
    assert (summary["decisions"], summary["routed"], summary["completions"]) == (12, 12, 12)


def test_concurrent_resends_of_a_repeating_batch_count_it_once(collector, reference_collector, make_source):
    src = make_source("s1")
    batches, events = _hostile_batches(src)
    threads = [threading.Thread(target=collector.store, args=(batch,)) for batch in batches * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reference_collector.store(src.batch(events))
    assert collector.rollup_rows() == reference_collector.rollup_rows()
    assert collector.table_counts()["routed"] == 12


def test_overlapping_batch_stores_only_new_events(collector, make_source):
    src = make_source("s1")
    events = _traffic(src, _now(), 10)  # 30 events
    assert collector.store(src.batch(events[:18])) == {"stored": 18, "duplicates": 0}
    rollups_after_first = collector.rollup_rows()
    assert collector.store(src.batch(events[9:])) == {"stored": 12, "duplicates": 9}
    assert _stored_ids(collector, decisions) == {e["id"] for e in events if e["type"] == "decision"}
    summary = collector.get("/v1/summary", **WINDOW)
    assert (summary["decisions"], summary["routed"], summary["completions"]) == (10, 10, 10)
    assert collector.rollup_rows() != rollups_after_first


def test_counters_only_batch_updates_the_source(collector, make_source):
    src = make_source("s1")
    collector.store(src.batch(_traffic(src, _now(), 2), dropped={"queue_full": 1}, produced=7))
    answer = collector.store(src.batch([], dropped={"queue_full": 4, "spool_full": 2}, produced=12))
    assert answer == {"stored": 0, "duplicates": 0}
    (source,) = collector.get("/v1/sources", **WINDOW)["sources"]
    assert source["dropped"] == {"queue_full": 4, "spool_full": 2}
    assert source["produced"] == 12
    assert source["batches"] == 2 and source["batch_gaps"] == 0


def test_unknown_fields_are_accepted_and_kept(collector, make_source):
    src = make_source("s1")
    ts = _now()
    d = src.decision(ts, [["r1"]], request_id="req-1", internal_request_id="int-1")
    d["hint"] = {"why": "newer tracer", "score": 0.5}
    r = src.routed(ts + 0.001, "r1", d)
    r["affinity"] = "sticky"
    plain = src.completed(ts + 0.002, "r1", r)
    batch = src.batch([d, r, plain])
    batch["source"]["cluster"] = "east"  # unknown source and batch fields are ignored, not refused
    batch["compression_hint"] = "zstd"
    assert collector.store(batch) == {"stored": 3, "duplicates": 0}
    with collector.engine.connect() as connection:
        extra = {table.name: dict(connection.execute(select(table.c.id, table.c.extra)).all())
                 for table in (decisions, routed, completed)}
    assert json.loads(extra["decisions"][d["id"]]) == {"hint": {"why": "newer tracer", "score": 0.5}}
    assert json.loads(extra["routed"][r["id"]]) == {"affinity": "sticky", "attribution": "exact"}
    assert extra["completed"][plain["id"]] is None
    detail = collector.get(f"/v1/decisions/{d['id']}")
    assert detail["extra"] == {"hint": {"why": "newer tracer", "score": 0.5}}


# --- refused batches: status, a message naming the problem, nothing stored ---

def _refused(collector, response, status, *fragments):
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


@pytest.fixture
def refusing(collector, make_source):
    """A collector holding one stored batch, and a check that a refused batch
    changed no table."""
    src = make_source("s1")
    collector.store(src.batch(_traffic(src, _now(), 3)))
    counts = collector.table_counts()
    yield collector
    assert collector.table_counts() == counts


def test_malformed_json_is_400(refusing, make_source):
    src = make_source("s2")
    body = json.dumps(src.batch(_traffic(src, _now(), 3))).encode()
    _refused(refusing, refusing.send(body[:-5]), 400, "malformed JSON")
    _refused(refusing, refusing.send(b"\xff\xfe not json"), 400, "malformed JSON")


def test_bad_gzip_is_400(refusing, make_source):
    src = make_source("s2")
    headers = {"content-encoding": "gzip"}
    body = json.dumps(src.batch(_traffic(src, _now(), 3))).encode()
    _refused(refusing, refusing.send(body, headers=headers), 400, "not valid gzip")
    truncated = gzip.compress(body)[:-30]
    _refused(refusing, refusing.send(truncated, headers=headers), 400, "truncated")
    _refused(refusing, refusing.send(b"", headers=headers), 400, "truncated")
    trailing_garbage = gzip.compress(body) + b"garbage"
    _refused(refusing, refusing.send(trailing_garbage, headers=headers), 400, "not valid gzip")


def test_gzip_of_several_members_is_read_whole(collector, make_source):
    """RFC 1952 allows members one after another (as `cat a.gz b.gz` makes)."""
    src = make_source("s1")
    body = json.dumps(src.batch(_traffic(src, _now(), 3))).encode()
    members = gzip.compress(body[:100]) + gzip.compress(body[100:200]) + gzip.compress(body[200:])
    assert collector.store(members, headers={"content-encoding": "gzip"}) == {"stored": 9, "duplicates": 0}


def test_body_over_the_limit_is_413(make_collector, make_source):
    collector = make_collector(max_body_bytes=4096)
    src = make_source("s1")
    counts = collector.table_counts()
    big = src.batch(_traffic(src, _now(), 30))
    assert len(json.dumps(big)) > 4096
    _refused(collector, collector.send(big), 413, "over the limit of 4096")
    # Compressed it fits on the wire, but not once inflated.
    assert len(gzip.compress(json.dumps(big).encode())) < 4096
    _refused(collector, collector.send(big, compress=True), 413, "more than 4096")
    # Streamed without a Content-Length: counted while reading.
    body = json.dumps(big).encode()
    streamed = collector.http.post("/v1/events", content=(body[i:i + 1000] for i in range(0, len(body), 1000)),
                                   headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    _refused(collector, streamed, 413, "over the limit of 4096")
    assert collector.table_counts() == counts


def _gzip_of_zeros(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"0" * (1 << 20)
    parts = [deflate.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + deflate.flush()


def test_gzip_bomb_is_refused_without_inflating_it(make_collector):
    limit = 256 << 10
    collector = make_collector(max_body_bytes=limit)
    bomb = _gzip_of_zeros(64 << 20)  # 64 MiB inflated, about 64 KiB sent
    assert len(bomb) < limit
    counts = collector.table_counts()
    tracemalloc.start()
    try:
        response = collector.send(bomb, headers={"content-encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _refused(collector, response, 413, "inflates to more than")
    # Inflating it all would take 64 MiB; refusing it takes about the limit.
    assert peak < 16 * limit, peak
    assert collector.table_counts() == counts


def test_too_many_events_is_413(make_collector, make_source):
    collector = make_collector(max_events_per_batch=5)
    src = make_source("s1")
    assert collector.store(src.batch(_traffic(src, _now(), 1) + [src.stats(_now(), "r1", {})])) == \
        {"stored": 4, "duplicates": 0}
    counts = collector.table_counts()
    _refused(collector, collector.send(src.batch(_traffic(src, _now(), 2))), 413, "6 events", "limit of 5")
    assert collector.table_counts() == counts


@pytest.mark.parametrize("headers, fragment", [
    ({"content-type": "text/plain"}, "Content-Type"),
    ({"content-type": ""}, "Content-Type"),
    ({"content-type": "application/x-www-form-urlencoded"}, "Content-Type"),
    ({"content-encoding": "br"}, "Content-Encoding 'br'"),
    ({"content-encoding": "deflate"}, "Content-Encoding 'deflate'"),
])
def test_wrong_content_type_or_encoding_is_415(refusing, make_source, headers, fragment):
    src = make_source("s2")
    _refused(refusing, refusing.send(src.batch(_traffic(src, _now(), 1)), headers=headers), 415, fragment)


def test_content_type_with_charset_is_accepted(collector, make_source):
    src = make_source("s1")
    response = collector.send(src.batch(_traffic(src, _now(), 1)),
                              headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200 and response.json()["stored"] == 3


_MISSING = object()


def _break(batch, index, field, value):
    if value is _MISSING:
        del batch["events"][index][field]
    else:
        batch["events"][index][field] = value
    return batch


@pytest.mark.parametrize("index, field, value, expected", [
    (3, "attempt", "first", "$.events[3].attempt"),
    (4, "replica_id", _MISSING, "`replica_id` - at `$.events[4]`"),
    (5, "rejected", "no", "$.events[5].rejected"),
    (4, "rank", -1, "$.events[4].rank"),
    (3, "ranks", [["r1", 7]], "$.events[3].ranks[0][1]"),
    (3, "ts", -5, "$.events[3].ts"),
    (4, "type", "rerouted", "$.events[4]"),
    # A decision's explanation (v3), beyond the bounds the tracer keeps.
    (3, "reason", "r" * 65, "$.events[3].reason"),
    (3, "reason", "", "$.events[3].reason"),
    (3, "scores", {f"s{i}": 1 for i in range(9)}, "$.events[3].scores"),
    (3, "scores", {"n" * 33: 1}, "$.events[3].scores"),
    (3, "scores", {"rate": "high"}, "$.events[3].scores[...]"),
])
def test_schema_violation_is_422_naming_event_and_field(refusing, make_source, index, field, value, expected):
    src = make_source("s2")
    batch = _break(src.batch(_traffic(src, _now(), 2)), index, field, value)
    _refused(refusing, refusing.send(batch), 422, expected)


def test_schema_violation_next_to_unknown_fields_is_named_too(refusing, make_source):
    """A batch with unknown fields takes another decoding path; errors still name the place."""
    src = make_source("s2")
    batch = src.batch(_traffic(src, _now(), 2))
    batch["events"][0]["from_the_future"] = True
    batch["events"][3]["attempt"] = "first"
    _refused(refusing, refusing.send(batch), 422, "$.events[3].attempt")


def test_wrong_schema_version_is_422(refusing, make_source):
    src = make_source("s2")
    for version in (4, 0, "1", 1.5):
        batch = src.batch(_traffic(src, _now(), 1))
        batch["schema_version"] = version
        detail = _refused(refusing, refusing.send(batch), 422, "$.schema_version", "expected 1 or 2 or 3")
        assert ("upgrade the collector first" in detail) == (version == 4), detail


@pytest.mark.parametrize("index, field, value, expected", [
    (1, "reported_queue_len", -1, "$.events[1].reported_queue_len"),
    (1, "believed_queue_len", 2 ** 31, "$.events[1].believed_queue_len"),  # beyond the 32-bit column
    (1, "shortest_queue_len", 5, "$.events[1].shortest_queue_len: 5 is above believed_queue_len 4"),
    (2, "shortest_queue_len", 2, "$.events[2].shortest_queue_len: 2 is above believed_queue_len 1"),  # a refusal
    # A completion of an accepted request is no answer: its routed event is.
    (3, "reported_queue_len", 1, "$.events[3].reported_queue_len: only a refusal (rejected: true) has it"),
    (3, "decision_id", "decision", "$.events[3].decision_id: only a refusal"),
])
def test_answer_fields_out_of_range_or_place_are_422(refusing, make_source, index, field, value, expected):
    src = make_source("s2")
    ts = _now()
    d = src.decision(ts, [["r1"]])
    routed_event = src.routed(ts, "r1", d, quality=(4, 1, 3))
    batch = src.batch([d, routed_event, src.completed(ts, "r2", rejected=True, decision=d, quality=(1, 0, 1)),
                       src.completed(ts, "r1", routed_event)])
    batch["events"][index][field] = d["id"] if value == "decision" else value
    _refused(refusing, refusing.send(batch), 422, expected)


def test_answers_keep_their_queue_lengths_and_v1_ones_have_none(collector, make_source):
    """v2 answers (routed, refusals) store the three queue lengths; a batch of
    v1, whose answers have none, is stored as before, its figures unknown."""
    ts = _now()
    old, new = make_source("v1"), make_source("v2")
    collector.store(old.batch(_traffic(old, ts, 3), schema_version=1))
    assert collector.get("/v1/rank-hits", **WINDOW)["decision_quality"] == {
        "regret": {"samples": 0, "mean": None, "p95": None, "max": None, "positive_share": None},
        "belief_error": {"samples": 0, "mean": None, "mean_abs": None, "p95_abs": None, "max_abs": None}}
    d = new.decision(ts, [["r1"]])
    routed_event = new.routed(ts + 0.001, "r1", d, quality=(2, 0, 3))
    refusal = new.completed(ts + 0.002, "r2", rejected=True, internal_request_id="int-x", decision=d,
                            quality=(3, 1, 5))
    collector.store(new.batch([d, routed_event, refusal]))
    with collector.engine.connect() as connection:
        columns = ("decision_id", "believed_queue_len", "shortest_queue_len", "reported_queue_len")
        stored = {row.id: tuple(row[1:]) for row in connection.execute(
            select(routed.c.id, *(routed.c[c] for c in columns)))}
        stored.update({row.id: tuple(row[1:]) for row in connection.execute(
            select(completed.c.id, *(completed.c[c] for c in columns)).where(completed.c.rejected.is_(True)))})
    # Both answers name the decision: the refusal as the routed event always did.
    assert stored[routed_event["id"]] == (d["id"], 2, 0, 3) and stored[refusal["id"]] == (d["id"], 3, 1, 5)
    assert {v[1:] for k, v in stored.items() if k not in (routed_event["id"], refusal["id"])} == {
        (None, None, None)}
    # By hand: regrets 2 - 0 and 3 - 1; belief errors 2 - (3 - 1) (it accepted, counting this request) and 3 - 5.
    quality = collector.get("/v1/rank-hits", **WINDOW)["decision_quality"]
    assert quality == {
        "regret": {"samples": 2, "mean": 2.0, "p95": 2.0, "max": 2.0, "positive_share": 1.0},
        "belief_error": {"samples": 2, "mean": -1.0, "mean_abs": 1.0, "p95_abs": 2.0, "max_abs": 2.0}}


def test_event_id_must_be_a_uuid7_of_its_time(refusing, make_source):
    src = make_source("s2")
    batch = src.batch(_traffic(src, _now(), 2))
    batch["events"][2]["id"] = str(uuid.uuid4())
    _refused(refusing, refusing.send(batch), 422, "$.events[2].id", "UUIDv7")
    batch = src.batch(_traffic(src, _now(), 2))
    batch["events"][1]["ts"] -= 3600  # the id says an hour later
    _refused(refusing, refusing.send(batch), 422, "$.events[1].id")
    batch = src.batch(_traffic(src, _now(), 2))
    batch["events"][0]["id"] = "not-a-uuid"
    _refused(refusing, refusing.send(batch), 422, "$.events[0].id")


@pytest.mark.parametrize("where, value, expected", [
    ("source_id", "s" * 129, "$.source.source_id"),
    ("app", "a" * 257, "$.source.app"),
    ("hostname", "h" * 257, "$.source.hostname"),
    ("tracer_version", "v" * 65, "$.source.tracer_version"),
    ("pid", 2 ** 40, "$.source.pid"),
    ("labels", {f"key{i}": "v" * 100 for i in range(12)}, "$.source.labels"),
])
def test_source_values_the_database_cannot_hold_are_422(refusing, make_source, where, value, expected):
    """Both backends refuse them alike (SQLite would store them, PostgreSQL would fail)."""
    src = make_source("s2")
    src.info[where] = value
    _refused(refusing, refusing.send(src.batch(_traffic(src, _now(), 1))), 422, expected)


def test_event_values_the_database_cannot_hold_are_422(refusing, make_source):
    src = make_source("s2")
    ts = _now()
    batch = src.batch([src.replicas(ts, ["r1"])])
    batch["events"][0]["replicas"][0]["max_ongoing_requests"] = 2 ** 40
    _refused(refusing, refusing.send(batch), 422, "$.events[0].replicas[0].max_ongoing_requests")
    batch = src.batch([src.replicas(ts, ["r1"])])
    batch["events"][0]["replicas"][0]["availability_zone"] = "z" * 129
    _refused(refusing, refusing.send(batch), 422, "$.events[0].replicas[0].availability_zone")
    batch = src.batch(_traffic(src, ts, 2))
    batch["events"][4]["request_id"] = "nul\u0000byte"
    _refused(refusing, refusing.send(batch), 422, "$.events[4].request_id", "NUL")


def test_token_is_required_when_configured(make_collector, make_source):
    collector = make_collector(token="s3cret")
    src = make_source("s1")
    batch = src.batch(_traffic(src, _now(), 2))
    counts = collector.table_counts()
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                    {"authorization": "Basic s3cret"}):
        response = collector.send(batch, headers=headers)
        _refused(collector, response, 401, "token")
        assert response.headers["www-authenticate"] == "Bearer"
    assert collector.http.get("/v1/summary").status_code == 401
    assert collector.table_counts() == counts
    assert collector.send(batch, headers={"authorization": "Bearer s3cret"}).json() == {"stored": 6, "duplicates": 0}
    assert collector.http.get("/v1/summary", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_odd_bodies_get_a_4xx_never_a_5xx(collector, make_source):
    """Odd but possible bodies get a 4xx, never a 5xx."""
    src = make_source("s1")
    ts = _now()
    good = src.batch(_traffic(src, ts, 1))
    unknown_then_odd_type = src.batch(_traffic(src, ts, 1))
    unknown_then_odd_type["events"][0]["new_field"] = 1
    unknown_then_odd_type["events"].append({"type": ["decision"], "id": good["events"][0]["id"]})
    bodies = [
        b"", b"null", b"[]", b"1", b'"batch"', b"{}", b'{"schema_version": 1}',
        json.dumps({**good, "events": None}).encode(),
        json.dumps({**good, "events": [None, 1, "x", []]}).encode(),
        json.dumps({**good, "events": [{"type": None}]}).encode(),
        json.dumps({**good, "source": []}).encode(),
        json.dumps({**good, "seq": 2 ** 70}).encode(),
        json.dumps({**good, "seq": -1}).encode(),
        json.dumps({**good, "dropped": {"queue_full": -3}}).encode(),
        json.dumps(unknown_then_odd_type).encode(),
        json.dumps({**good, "events": [{**good["events"][0], "ts": 1e300}]}).encode(),
        json.dumps({**good, "events": [{**good["events"][1], "rank": 2 ** 70}]}).encode(),
        b'{"schema_version": 1, "events": [' + b"[" * 10000 + b"]" * 10000 + b"]}",
        b'{"schema_version": 1e999}',
    ]
    answers = [collector.send(body) for body in bodies]
    assert [(i, a.status_code, a.text) for i, a in enumerate(answers) if not 400 <= a.status_code < 500] == []


# --- per source: seen, labels, batch gaps, drop counters ---

def test_source_first_and_last_seen_and_labels(collector, make_source):
    src = make_source("s1", labels={"router_version": "b", "zone": "eu"})
    before = time.time()
    collector.store(src.batch(_traffic(src, _now(), 1)))
    after_first = time.time()
    collector.store(src.batch(_traffic(src, _now(), 1)))
    after_second = time.time()
    (source,) = collector.get("/v1/sources", **WINDOW)["sources"]
    assert before <= source["first_seen"] <= after_first <= source["last_seen"] <= after_second
    assert (source["source_id"], source["hostname"], source["pid"]) == ("s1", "host-1", 4242)
    catalogue = collector.get("/v1/deployments", **WINDOW)
    assert catalogue["apps"] == ["shop"]
    assert catalogue["labels"] == {"router_version": ["b"], "zone": ["eu"]}
    (deployment,) = catalogue["deployments"]
    (router,) = deployment["routers"]
    assert router["labels"] == {"router_version": "b", "zone": "eu"}
    assert [s["source_id"] for s in router["sources"]] == ["s1"]


def test_seq_gaps_count_lost_batches_not_late_ones(collector, make_source):
    src = make_source("s1")

    def gaps():
        return collector.get("/v1/sources", **WINDOW)["sources"][0]["batch_gaps"]

    for seq in (2, 1):  # out of order: no gap once both are in
        collector.store(src.batch(_traffic(src, _now(), 1), seq=seq))
    assert gaps() == 0
    for seq in (4, 6):
        collector.store(src.batch(_traffic(src, _now(), 1), seq=seq))
    assert gaps() == 2  # 3 and 5 are missing
    collector.store(src.batch(_traffic(src, _now(), 1), seq=5))  # 5 was late, not lost
    assert gaps() == 1
    batch_6 = src.batch(_traffic(src, _now(), 1), seq=6)
    collector.store(batch_6)  # a re-sent batch number is not a new batch
    assert gaps() == 1
    assert collector.get("/v1/summary", **WINDOW)["batch_gaps"] == 1
    metrics = collector.http.get("/metrics").text  # 1, 3, 5 skipped over; 1 and 5 late: 1 lost
    assert 'routelens_source_batches_skipped_total{app="shop",deployment="Checkout",source_id="s1"} 3.0' in metrics
    assert 'routelens_source_batches_late_total{app="shop",deployment="Checkout",source_id="s1"} 2.0' in metrics


def test_dropped_counters_of_the_highest_seq_win(collector, make_source):
    src = make_source("s1")
    collector.store(src.batch([], seq=3, dropped={"queue_full": 5, "sampled_out": 9}))
    collector.store(src.batch([], seq=2, dropped={"queue_full": 3}))  # older news, arriving late
    (source,) = collector.get("/v1/sources", **WINDOW)["sources"]
    assert source["dropped"] == {"queue_full": 5, "sampled_out": 9}
    collector.store(src.batch([], seq=4, dropped={"queue_full": 7, "sampled_out": 9, "spool_full": 1}))
    (source,) = collector.get("/v1/sources", **WINDOW)["sources"]
    assert source["dropped"] == {"queue_full": 7, "sampled_out": 9, "spool_full": 1}
    assert collector.get("/v1/summary", **WINDOW)["dropped_events"] == 17
    metrics = collector.http.get("/metrics").text
    assert 'routelens_source_events_dropped_total{app="shop",deployment="Checkout",reason="queue_full",' \
        'source_id="s1"} 7.0' in metrics


def test_metrics_count_ingested_duplicate_and_rejected(collector, make_source):
    src = make_source("s1")
    batch = src.batch(_traffic(src, _now(), 2))
    collector.store(batch)
    collector.store(batch)
    collector.send(b"{")
    collector.send(batch, headers={"content-type": "text/plain"})
    metrics = collector.http.get("/metrics").text
    for line in ('routelens_events_ingested_total{type="decision"} 2.0',
                 'routelens_events_ingested_total{type="routed"} 2.0',
                 "routelens_events_duplicate_total 6.0",
                 'routelens_batches_rejected_total{reason="malformed"} 1.0',
                 'routelens_batches_rejected_total{reason="content_type"} 1.0',
                 "routelens_ingest_seconds_count 2.0"):
        assert line in metrics, line


# --- membership ---

def _members(collector):
    with collector.engine.connect() as connection:
        return {row.replica_id: (row.added_at, row.removed_at) for row in connection.execute(select(Replica))}


def test_replicas_events_add_and_remove_members(collector, make_source):
    src = make_source("s1")
    t0 = _now() - 20
    collector.store(src.batch([src.replicas(t0, ["r1", "r2", "r3"])]))
    collector.store(src.batch([src.replicas(t0 + 5, ["r2", "r3", "r4"])]))
    members = _members(collector)
    assert members == {"r1": (t0, t0 + 5), "r2": (t0, None), "r3": (t0, None), "r4": (t0 + 5, None)}
    # Traffic to r2 only: the distribution still lists every member of the window.
    collector.store(src.batch(_traffic(src, t0 + 10, 4, replicas=("r2",))))
    dist = collector.get("/v1/distribution", **WINDOW)
    by_id = {r["replica_id"]: r for r in dist["replicas"]}
    assert {k: (v["routed"], v["member"]) for k, v in by_id.items()} == {
        "r1": (0, True), "r2": (4, True), "r3": (0, True), "r4": (0, True)}
    assert by_id["r3"]["node_id"] == "node-r3"
    (deployment,) = dist["deployments"]
    assert deployment["fair_share"] == 1.0
    assert deployment["imbalance"]["max_over_mean"] == pytest.approx(4.0)
    assert deployment["imbalance"]["jain"] == pytest.approx(0.25)
    # A window after r1 left: r1 is no longer a member, so no longer listed.
    after = {"since": t0 + 6, "until": time.time() + 60}
    assert "r1" not in {r["replica_id"] for r in collector.get("/v1/distribution", **after)["replicas"]}


def test_membership_follows_event_time_when_batches_arrive_out_of_order(collector, make_source):
    """A spooled batch replayed late must not undo a newer membership."""
    src = make_source("s1")
    t0 = _now() - 20
    first = src.batch([src.replicas(t0, ["r1", "r2", "r3"])])
    second = src.batch([src.replicas(t0 + 5, ["r2", "r3", "r4"])])
    collector.store(second)
    collector.store(first)
    assert _members(collector) == {"r1": (t0, t0 + 5), "r2": (t0, None), "r3": (t0, None), "r4": (t0 + 5, None)}


def _described(collector):
    with collector.engine.connect() as connection:
        return {row.replica_id: row.node_id for row in connection.execute(select(Replica))}


def test_membership_of_big_events_in_and_out_of_order(collector, make_source):
    """Events of thousands of members (more than one statement binds ids at
    once), late ones among them, give each replica exactly the membership
    and description the rules above give it one at a time."""
    src = make_source("s1")
    ids = [f"replica-{i:05d}" for i in range(13_500)]
    t0 = _now() - 60
    collector.store(src.batch([src.replicas(t0, ids[:12_000])]))
    collector.store(src.batch([src.replicas(t0 + 5, ids[1_000:13_000])]))
    # Late: a spooled batch from before both, naming replicas never seen since, described otherwise.
    late = src.replicas(t0 - 5, ids[:500] + ids[13_000:])
    for member in late["replicas"]:
        member["node_id"] = "late-node"
    collector.store(src.batch([late]))
    collector.store(src.batch([src.replicas(t0 + 10, ["new-one", ids[1_000]])]))
    expected = {}
    for replica_id in ids[:500]:
        expected[replica_id] = (t0 - 5, t0 + 5)
    for replica_id in ids[500:1_000]:
        expected[replica_id] = (t0, t0 + 5)
    expected[ids[1_000]] = (t0, None)
    for replica_id in ids[1_001:12_000]:
        expected[replica_id] = (t0, t0 + 10)
    for replica_id in ids[12_000:13_000]:
        expected[replica_id] = (t0 + 5, t0 + 10)
    for replica_id in ids[13_000:]:
        expected[replica_id] = (t0 - 5, t0 + 5)
    expected["new-one"] = (t0 + 10, None)
    assert _members(collector) == expected
    nodes = _described(collector)
    assert all(nodes[r] == f"node-{r}" for r in ids[:500])  # newer events described them: kept
    assert {nodes[r] for r in ids[13_000:]} == {"late-node"}  # known from the late event only


def test_two_collectors_storing_the_same_batches_at_once(make_collector, make_source):
    """The scale-out path: collectors on one database, each batch sent to both."""
    collectors = [make_collector(), make_collector()]
    sources = [make_source(f"s{i}") for i in range(3)]
    batches = [src.batch(_traffic(src, _now() + n, 20)) for n in range(4) for src in sources]
    answers = []

    def send_all(collector):
        answers.extend(collector.store(batch)["stored"] for batch in batches)

    threads = [threading.Thread(target=send_all, args=(c,)) for c in collectors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(answers) == 12 * 60 and len(answers) == 24
    summary = collectors[0].get("/v1/summary", **WINDOW)
    assert (summary["decisions"], summary["routed"], summary["completions"]) == (240, 240, 240)
    assert len(_stored_ids(collectors[1], decisions)) == 240


def test_produced_counter_past_32_bits(collector, make_source):
    """A busy source passes 2**31 events produced within days."""
    src = make_source("s1")
    answer = collector.send(src.batch([], produced=2**31 + 5, dropped={"sampled_out": 2**31 + 1}))
    assert answer.status_code == 200, answer.text
    (source,) = collector.get("/v1/sources", **WINDOW)["sources"]
    assert (source["produced"], source["dropped"]) == (2**31 + 5, {"sampled_out": 2**31 + 1})


def test_source_reusing_its_id_for_another_deployment_is_refused(collector, make_source):
    """A source is one router instance: its deployment cannot change under the same id."""
    collector.store(make_source("s1", deployment="Checkout").batch(
        _traffic(make_source("s1"), _now(), 1)))
    def summary():
        return {k: v for k, v in collector.get("/v1/summary", **WINDOW).items() if k != "window"}

    before = summary()
    moved = make_source("s1", deployment="Search")
    response = collector.send(moved.batch(_traffic(moved, _now(), 1), seq=2))
    assert response.status_code == 409, response.text
    assert "'s1'" in response.json()["detail"] and "Checkout" in response.json()["detail"]
    assert summary() == before
    assert [d["deployment"] for d in collector.get("/v1/deployments", **WINDOW)["deployments"]] == ["Checkout"]
