"""Bad input of every kind, on SQLite and PostgreSQL: the collector answers a
clear 4xx, never a 500, and writes nothing unless it answers 200.

- ingest (POST /v1/events): arbitrary bodies and mutated valid batches
  (hypothesis); valid batches from a strategy are stored, idempotently;
- every endpoint of the OpenAPI spec, fuzzed in-process (schemathesis), but
  the event stream (GET /v1/tail), which never ends: its parameters are
  the other read endpoints' (the injections below reach it, live);
- oversized bodies and gzip bombs, against the real server in a subprocess
  whose peak memory is read from /proc;
- SQL injection and other odd strings in every query parameter of every read
  endpoint: never more rows than without the filter, the database unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select as io_select  # (sqlalchemy has the name select)
import socket
import subprocess
import sys
import time
import uuid
import zlib
from typing import Optional, Tuple
from urllib.parse import quote, urlencode

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select

from routelens.collector.query.filters import Filters
from routelens.collector.settings import Settings
from routelens.collector.store import replays
from routelens.collector.store.models import Base, decisions, stored_batches
from tests.support import sse
from tests.support.collector_server import CollectorServer
from tests.support.ports import free_port

# Every example runs against the test's one database (a function-scoped
# fixture): each asserts on what it changed, not on absolute contents.
FUZZ = settings(deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

# The answers bad input may get: 400 malformed, 409 a source id reused for another
# deployment, 413 too large, 422 breaks the wire format.
REFUSALS = {400, 409, 413, 422}


def _now() -> float:
    return time.time() - 60  # inside any read window ending now


# --- strategies: JSON of any shape, odd values, valid batches ---

# Text a database can hold (no NUL, which the validator refuses on purpose, no lone surrogates,
# which JSON cannot carry as UTF-8): names, ids, labels.
storable_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
                        max_size=40)

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15)

# Values that broke parsers and databases somewhere before: big and negative
# numbers, NaN, odd unicode, NUL, very long strings, deep nesting.
odd_values = st.sampled_from([
    None, True, False, 0, -1, -0.0, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, 1e308, -1e308, 5e-324,
    math.nan, math.inf, -math.inf, "", " ", "x" * 129, "x" * 257, "x" * 513, "y" * 100_000, "nul\x00byte",
    "\u202eevil", "🙂" * 300, "' OR 1=1 --", "1", "1.5", "true", "null", "decision", [], {}, [[]], {"": {}},
    "0196b8a2-7c4e-7000-8000-000000000000", str(uuid.uuid4()),
    json.loads("[" * 200 + "]" * 200),
])


@st.composite
def valid_batches(draw) -> dict:
    """A batch the wire format allows: unicode ids, unknown stats shapes, edge-case numbers."""
    from tests.support.wire_source import WireSource

    labels = draw(st.dictionaries(st.text(max_size=10).filter(lambda s: "\x00" not in s), storable_text,
                                  max_size=3))
    # Each batch its own app (unicode, then a unique part): reads filtered by it see this batch alone.
    source = WireSource(str(uuid.uuid4()), app=f"{draw(storable_text)}/{uuid.uuid4()}",
                        deployment=draw(storable_text), labels=labels)
    replicas = draw(st.lists(storable_text, min_size=1, max_size=4, unique=True))
    stats = st.dictionaries(st.text(max_size=8), json_values, max_size=3)
    non_negative = st.floats(min_value=0, max_value=1e308)
    ages = st.floats(min_value=-1e9, max_value=1e9)  # stored in microseconds: see collector.ingest.schema.Age
    events, ts = [], _now()
    for i in range(draw(st.integers(1, 4))):
        t = ts + i * 0.01
        chosen = draw(st.sampled_from(replicas))
        candidates = {chosen: {"queue_len": draw(st.none() | st.integers(-(2**63), 2**63 - 1)), "stats": draw(stats),
                               "queue_len_age_s": draw(st.none() | ages), "stats_age_s": draw(st.none() | ages),
                               "stats_age_source": draw(st.sampled_from([None, "stamped", "observed"]))}}
        decision = source.decision(t, [[chosen], [r for r in replicas if r != chosen]], candidates=candidates,
                                   request_id=draw(st.none() | storable_text),
                                   internal_request_id=draw(st.none() | storable_text),
                                   model_id=draw(st.none() | storable_text),
                                   attempt=draw(st.integers(0, 2**31 - 1)),
                                   duration_us=draw(st.integers(0, 2**31 - 1)))
        routed = source.routed(t + 0.001, chosen, decision, rank=draw(st.integers(0, 10_000)),
                               queue_wait_ms=draw(non_negative))
        completed = source.completed(t + 0.002, chosen, routed, latency_ms=draw(non_negative),
                                     ok=draw(st.booleans()), rejected=draw(st.booleans()))
        events += [decision, routed, completed]
    events.append(source.replicas(ts, replicas))
    events.append(source.stats(ts, replicas[0], draw(stats), collected_at=draw(st.none() | st.just(ts))))
    return source.batch(events, dropped=draw(st.dictionaries(st.text(max_size=10).filter(lambda s: "\x00" not in s),
                                                             st.integers(0, 2**63 - 1), max_size=2)))


def _paths(value, path=()):
    """Every place in a JSON value: (key or index, ...)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _json_path(path) -> str:
    """`$.events[3]` for ("events", 3): how the validator names a place."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


@st.composite
def mutated_batches(draw):
    """(a valid batch changed in one place, that place): a field dropped,
    retyped, oversized, wrapped in a list or an object, or given an odd value."""
    batch = draw(valid_batches())
    path = draw(st.sampled_from([p for p in _paths(batch) if p]))
    *parent_path, key = path
    parent = batch
    for step in parent_path:
        parent = parent[step]
    old = parent[key]
    how = draw(st.sampled_from(["drop", "retype", "oversize", "wrap", "odd"]))
    if how == "drop":
        del parent[key]
    elif how == "retype":
        parent[key] = draw(json_scalars.filter(lambda new: type(new) is not type(old)))
    elif how == "oversize":
        if isinstance(old, str):
            parent[key] = old * 300 or "x" * 300
        elif isinstance(old, list):
            parent[key] = old * 60 or [None] * 60
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = old * 2**64 + 2**64
        else:
            parent[key] = "z" * 100_000
    elif how == "wrap":
        parent[key] = draw(st.sampled_from([[old], {"value": old}]))
    else:
        parent[key] = draw(odd_values)
    return batch, path


def _body(value) -> bytes:
    # allow_nan: NaN and Infinity as JavaScript writes them, which JSON does not allow.
    return json.dumps(value, allow_nan=True).encode()


# --- ingest: arbitrary and mutated bodies ---

def _names_the_place(detail: str, path) -> bool:
    """Whether a 422's detail names the event (or the source) and the field
    changed at `path`: `$.events[3].attempt`, "missing required field
    `replica_id` - at `$.events[3]`", `$.source.app`, `$.seq`."""
    place = path[:2] if path[0] == "events" and len(path) > 1 else path[:1]
    named = (path[0] in detail) if len(place) == 1 else (_json_path(place) in detail)
    field = path[len(place)] if len(path) > len(place) else None
    # Another event type makes the event's other fields the problem, not `type` itself.
    if isinstance(field, str) and field != "type":
        # A value inside a free-form mapping (dropped, labels, stats) is named as the mapping's `[...]`.
        named = named and (field in detail or "[...]" in detail)
    return named


def _assert_refused_cleanly(response, counts_before: dict, collector) -> str:
    assert response.status_code in REFUSALS, (response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail, response.text[:500]
    assert collector.table_counts() == counts_before
    return detail


def test_arbitrary_json_bodies_are_refused_with_a_4xx_and_store_nothing(make_collector):
    collector = make_collector(max_events_per_batch=50)
    counts = collector.table_counts()
    nearly_batches = st.fixed_dictionaries({"schema_version": st.sampled_from([1, 1.0, "1", 2, None]),
                                            "source": json_values, "seq": json_values,
                                            "events": st.lists(json_values, max_size=4)})
    bodies = (json_values.map(_body) | odd_values.map(_body) | nearly_batches.map(_body)
              | st.binary(max_size=200) | st.text(max_size=200).map(str.encode))

    @settings(FUZZ, max_examples=150)
    @given(body=bodies)
    def check(body):
        note(body[:2000])
        _assert_refused_cleanly(collector.send(body), counts, collector)

    check()


def test_mutated_batches_get_200_or_a_4xx_naming_the_place_and_refused_ones_store_nothing(make_collector):
    collector = make_collector(max_events_per_batch=50)

    @settings(FUZZ, max_examples=150)
    @given(mutated=mutated_batches())
    def check(mutated):
        batch, path = mutated
        note(f"changed at {path}: {_body(batch)[:2000]!r}")
        counts = collector.table_counts()
        response = collector.send(_body(batch))
        if response.status_code == 200:
            # Still valid (an optional field dropped, say): stored once, and only once.
            again = collector.send(_body(batch))
            assert again.status_code == 200 and again.json()["stored"] == 0, again.text
            return
        detail = _assert_refused_cleanly(response, counts, collector)
        if response.status_code == 422:
            assert _names_the_place(detail, path), (path, detail)

    check()


def test_valid_batches_are_stored_readable_and_idempotent(collector):
    @settings(FUZZ, max_examples=30)
    @given(batch=valid_batches())
    def check(batch):
        note(_body(batch)[:4000])
        counts = collector.table_counts()
        answer = collector.store(batch)
        assert answer == {"stored": len(batch["events"]), "duplicates": 0}
        assert collector.table_counts() != counts
        stored, rollups = collector.table_counts(), collector.rollup_rows()
        assert collector.store(batch) == {"stored": 0, "duplicates": len(batch["events"])}
        assert collector.table_counts() == stored and collector.rollup_rows() == rollups
        # Whatever was stored, every view of it can be read.
        app = batch["source"]["app"]
        for path in ("/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits", "/v1/timeseries",
                     "/v1/decisions", "/v1/deployments", "/v1/sources"):
            collector.get(path, app=app)
        decision = batch["events"][0]["id"]
        assert collector.get(f"/v1/decisions/{decision}")["id"] == decision
        exported = collector.http.get("/v1/export", params={"app": app, "format": "jsonl"})
        assert exported.status_code == 200, exported.text[:500]
        # One line per decision; "\n" alone ends a line (a JSON string may hold U+2028 or U+0085 as they are).
        assert exported.text.count("\n") == sum(e["type"] == "decision" for e in batch["events"])

    check()


def test_batches_stored_after_an_export_are_seen_by_later_exports_and_other_processes(collector, make_source):
    """An export through the API once closed a second SQLite library's
    connection to the file (ADBC's), which deleted the WAL the collector was
    writing to: later batches were acknowledged, then invisible and lost."""
    for i in range(3):
        source = make_source(f"s{i}", app=f"app{i}")
        collector.store(source.batch([source.decision(_now(), [["r1"]])]))
        exported = collector.http.get("/v1/export", params={"format": "jsonl"})
        assert exported.text.count("\n") == i + 1
    # Another process (a second connection, as `routelens export` makes) sees them too.
    other = create_engine(collector.engine.url)
    try:
        with other.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(decisions)) == 3
    finally:
        other.dispose()


@pytest.mark.parametrize("field, value", [("stats_age_s", 1.8e302), ("queue_len_age_s", 9.1e9),
                                          ("stats_age_s", -1e10), ("queue_len", 2**63)])
def test_candidate_values_the_database_or_export_cannot_hold_are_422(collector, make_source, field, value):
    """Found by the properties above: an age past 10**9 s was a 500 at ingest (microseconds
    overflowing) or an export cut short (past 2**53 us); so was a queue length past 64 bits."""
    source = make_source("s1")
    counts = collector.table_counts()
    decision = source.decision(_now(), [["r1"]], candidates={"r1": {field: value}})
    response = collector.send(source.batch([decision]))
    assert _assert_refused_cleanly(response, counts, collector)
    assert response.status_code == 422 and f"$.events[0].replicas[...].{field}" in response.json()["detail"]


# --- every endpoint of the OpenAPI spec (schemathesis, in-process) ---

def test_no_endpoint_of_the_openapi_spec_answers_500(make_collector, make_source):
    """Parameters of every kind the spec allows, and some it does not (schemathesis'
    negative cases too): 4xx for what is wrong, never a 5xx."""
    collector = make_collector()
    source = make_source("s1")
    first = source.decision(_now(), [["r1"], ["r2"]], request_id="req-1", model_id="m1")
    collector.store(source.batch([first, source.routed(_now(), "r1", first)]))
    counts = collector.table_counts()
    schema = schemathesis.openapi.from_asgi("/openapi.json", collector.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/summary", "/v1/export", "/v1/decisions/{decision_id}", "/metrics"}
    # In process, an answer is read whole; the stream's never ends.
    operations = [op for op in operations if op.path not in _streams(collector.get("/openapi.json"))]
    for operation in operations:
        @settings(FUZZ, max_examples=8)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(session=None)
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:300])

        check()
    # GET endpoints change nothing; POSTs without a valid batch store nothing.
    assert collector.table_counts() == counts


# --- oversized bodies and gzip bombs, against the real server in a process of its own ---

def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def _gzip_of_zeros(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    return b"".join(deflate.compress(chunk) for _ in range(size // len(chunk))) + deflate.flush()


@pytest.fixture(scope="module")
def real_collector(tmp_path_factory):
    """`routelens collector` (uvicorn, default limits: 32 MB) in its own process: its memory is its own."""
    port = free_port()
    db = tmp_path_factory.mktemp("big") / "routelens.db"
    env = {k: v for k, v in os.environ.items() if k != "ROUTELENS_TOKEN"}
    command = [sys.executable, "-m", "routelens.collector.cli", "collector", "--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
            time.sleep(0.1)
        yield server, port
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post_streamed(port: int, chunks, headers: dict) -> bytes:
    """POST with Transfer-Encoding: chunked (no Content-Length) from a raw socket,
    stopping as soon as the server answers: a server that refuses early may close
    before the body ends, which a client sending it all would see as an error."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n{head}\r\n"
        sock.sendall(request.encode())
        for chunk in chunks:
            if io_select.select([sock], [], [], 0)[0]:
                break  # answered already
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_gzip_bomb_and_endless_body_are_413_without_the_server_growing(real_collector, make_source):
    server, port = real_collector
    url = f"http://127.0.0.1:{port}"
    source = make_source("s1")
    # Warm up first (imports, connections), so that the peak after is the bodies' doing.
    assert httpx.post(url + "/v1/events", json=source.batch([source.decision(_now(), [["r1"]])])).status_code == 200
    before = _peak_rss_mb(server.pid)

    bomb = _gzip_of_zeros(1 << 30)  # 1 GiB of zeros, about 1 MB on the wire
    assert len(bomb) < 2 << 20
    response = httpx.post(url + "/v1/events", content=bomb,
                          headers={"content-type": "application/json", "content-encoding": "gzip"}, timeout=60)
    assert response.status_code == 413 and "inflates to more than" in response.json()["detail"]

    # 1 GiB more, streamed in 1 MiB chunks without a Content-Length, plain and gzip.
    plain = (bytes(1 << 20) for _ in range(1024))
    answer = _post_streamed(port, plain, {"content-type": "application/json"})
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    bomb_chunks = (bomb[i:i + (64 << 10)] for i in range(0, len(bomb), 64 << 10))
    answer = _post_streamed(port, bomb_chunks, {"content-type": "application/json", "content-encoding": "gzip"})
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]

    # A body no bigger than the limit (32 MB) was ever held: not the GiB offered.
    grown = _peak_rss_mb(server.pid) - before
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MB"
    assert httpx.get(url + "/healthz").status_code == 200


# --- SQL injection and odd strings in every query parameter of every read endpoint ---

INJECTIONS = ["' OR 1=1 --", "x'); DROP TABLE decisions; --", "%' --", "\x00", "%", "_", "*", "a" * 20_000,
              "🙂' OR ''='", "app=' OR 1=1 --", "1; SELECT pg_sleep(5)", "$.events[0]"]
INJECTIONS_IN_OTHERS = ["' OR 1=1 --", "\x00", "a" * 20_000, "1; SELECT pg_sleep(5)"]
# Filters on names: an injected value is a name nothing has, and matches nothing. Routers are
# chosen by app, deployment, class and label, and sources by their router. /v1/deployments
# lists every router known whatever the filters (the dashboard's choices): only never more.
# The drill-downs (request_id, model_id) select raw decisions; the panels' figures come from
# rollups, which have no request ids: there too, only never more.
ROUTER_FILTERS = {"app", "deployment", "router_class", "label"}
EVENT_FILTERS = ROUTER_FILTERS | {"replica"}
DRILL_DOWNS = EVENT_FILTERS | {"request_id", "model_id"}
MATCHING_NOTHING = {"/v1/deployments": set(), "/v1/sources": ROUTER_FILTERS, "/v1/decisions": DRILL_DOWNS,
                    "/v1/export": DRILL_DOWNS}


def _rows(path: str, response) -> int:
    """How many rows an answer holds: what a filter may only reduce."""
    if path == "/v1/export":
        return response.text.count("\n")
    body = response.json()
    counts = {"/v1/summary": lambda: body["decisions"] + body["routed"] + body["completions"],
              "/v1/decisions": lambda: len(body["decisions"]),
              "/v1/deployments": lambda: len(body["deployments"]),
              "/v1/replays": lambda: len(body["replays"]),
              "/v1/sources": lambda: len(body["sources"])}
    # The others: every non-zero number counts or measures something filtered, but the window's,
    # the histogram's and the steps' fixed bounds (at any depth: rank-hits has figures over time).
    return counts[path]() if path in counts else _figures(body)


_FIXED = {"window", "bin_bounds_s", "step_s"}


def _streams(spec: dict) -> set:
    """The paths whose answer is an event stream, which never ends (GET /v1/tail)."""
    return {path for path, item in spec["paths"].items() for operation in item.values()
            if "text/event-stream" in operation["responses"].get("200", {}).get("content", {})}


def _streamed(url: str, path: str, params: dict, newest: int) -> Tuple[int, str, Optional[int]]:
    """A stream's status, and its records of what is stored: read from the start (Last-Event-ID 0)
    up to the newest batch, and no further."""
    with httpx.stream("GET", url + path, params=params, headers={"Last-Event-ID": "0"}, timeout=60) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode(), None
        return 200, "", len(sse.records_until(response.iter_lines(), newest))


def _figures(value) -> int:
    if isinstance(value, dict):
        return sum(_figures(item) for key, item in value.items() if key not in _FIXED)
    if isinstance(value, list):
        return sum(_figures(item) for item in value)
    return int(isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0)


def _checksum(collector) -> str:
    digest = hashlib.sha256()
    with collector.engine.connect() as connection:
        for name, table in sorted(Base.metadata.tables.items()):
            for row in connection.execute(select(table).order_by(*table.primary_key.columns)):
                digest.update(repr((name, tuple(row))).encode())
    return digest.hexdigest()


def test_injected_filters_match_nothing_and_change_nothing(db_url, collector, make_source):
    source = make_source("s1", app="shop", labels={"zone": "eu"})
    events, inputs = [], {"r1": {"queue_len": 1, "stats_age_s": 0.5, "stats_age_source": "stamped"}}
    for i in range(5):
        decision = source.decision(_now() + i, [["r1"], ["r2"]], request_id=f"req-{i}", model_id="m1",
                                   candidates=inputs, reason="prefix_match", scores={"match_rate": 0.5})
        # A prefix group, so that /v1/prefix-affinity has rows for the filters to remove.
        decision["attributes"] = {"prefix_group": "0123456789abcdef", "prompt_chars": 120}
        routed = source.routed(_now() + i, "r1", decision)
        events += [decision, routed, source.completed(_now() + i, "r1", routed)]
    collector.store(source.batch(events + [source.replicas(_now(), ["r1", "r2"])]))
    replay_id = replays.save(collector.engine, mode="decisions", router_class="m:Router", router_kwargs={}, seed=0,
                             runs=1, f=Filters(since=0.0, until=_now()), result={"deployments": []})
    counts, checksum = collector.table_counts(), _checksum(collector)
    with collector.engine.connect() as connection:
        newest = connection.scalar(select(func.max(stored_batches.c.seq)))

    spec = collector.get("/openapi.json")
    reads = {path: [p["name"] for p in spec["paths"][path]["get"].get("parameters", []) if p["in"] != "header"]
             for path in spec["paths"] if path.startswith("/v1/") and "get" in spec["paths"][path]}
    streams = _streams(spec)
    assert streams <= set(reads)
    known = {"{decision_id}": events[0]["id"], "{replay_id}": replay_id}  # each path parameter, a value that exists
    tried = 0
    # Streams, read live (in process an answer is read whole, and theirs never ends). The sweep
    # reads the batch stored above for a minute or more on a loaded machine: past the default
    # --tail-max-behind, a stream would skip it and send a `missed` notice, which is no filter's doing.
    live = CollectorServer(Settings(db_url=db_url, retention_s=None, minute_rollup_retention_s=None,
                                    tail_max_behind_s=600))

    def answer(path: str, query: dict) -> Tuple[int, str, Optional[int]]:
        """Status, text, and the rows of an answer 200."""
        if path in streams:
            return _streamed(live.url, path, query, newest)
        response = collector.http.get(path, params=query)
        return response.status_code, response.text, _rows(path, response) if response.status_code == 200 else None

    with live:
        for path, params in reads.items():
            named = next((name for name in known if name in path), None)
            if named is not None:
                for value in INJECTIONS:
                    response = collector.http.get(path.replace(named, quote(value, safe="")))
                    assert response.status_code in (404, 422), (path, value, response.text[:200])
                assert collector.get(path.replace(named, known[named]))["id"] == known[named]
                continue
            status, _text, unfiltered = answer(path, {"format": "jsonl"} if path == "/v1/export" else {})
            assert status == 200 and unfiltered > 0, path
            for name in params:
                # Every value into the filters that name things; a few into the others, which parse numbers,
                # durations, ids and formats and refuse anything else alike, and into the stream's, which
                # are the same filters, parsed and resolved to routers as the other endpoints' are.
                for value in INJECTIONS if name in DRILL_DOWNS and path not in streams else INJECTIONS_IN_OTHERS:
                    query = {name: value, **({"format": "jsonl"} if path == "/v1/export" and name != "format" else {})}
                    status, text, rows = answer(path, query)
                    tried += 1
                    assert status in (200, 422), (path, name, value[:40], text[:300])
                    if status != 200:
                        assert name in text or "query" in text, (path, name, text[:300])
                        continue
                    assert rows <= unfiltered, (path, name, value[:40])
                    if name in MATCHING_NOTHING.get(path, EVENT_FILTERS):
                        assert rows == 0, (path, name, value[:40], text[:300])
    assert tried > 300
    assert collector.table_counts() == counts and _checksum(collector) == checksum


# --- found by trying the product (issue 24): each a 500 before ---

def _with_unknown_field(source) -> bytes:
    """A batch from a newer tracer: an event field this version does not know."""
    decision = source.decision(_now(), [["r1"]])
    decision["from_a_newer_tracer"] = 1
    return json.dumps(source.batch([decision])).encode()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("spoil", [lambda body: body[:-5], lambda body: body + b"}garbage",
                                   lambda body: body.replace(b'"from_a_newer_tracer": 1',
                                                             b'"from_a_newer_tracer": NaN')],
                         ids=["truncated", "trailing-garbage", "nan"])
def test_malformed_json_after_an_unknown_field_is_400(collector, make_source, spoil, compress):
    """The unknown field sends the batch down the path that sets such fields
    aside, which decoded the body again unguarded: a 500."""
    counts = collector.table_counts()
    response = collector.send(spoil(_with_unknown_field(make_source("s1"))), compress=compress)
    assert _assert_refused_cleanly(response, counts, collector).startswith("malformed JSON")
    assert response.status_code == 400


def test_import_reports_a_malformed_line_after_an_unknown_field_and_goes_on(db_url, make_source, tmp_path, capsys):
    from routelens.collector.cli import main as routelens

    source = make_source("s1")
    good = [json.dumps(source.batch([source.decision(_now() + i, [["r1"]])])) for i in range(2)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([good[0].encode(), _with_unknown_field(source)[:-5], good[1].encode()]) + b"\n")
    assert routelens(["import", str(path), "--db", db_url]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON" in err and "Traceback" not in err, err
    assert "2 batches, 2 events stored, 0 already there, 1 bad lines" in err
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(decisions)) == 2
    finally:
        engine.dispose()


def _nested(levels: int) -> str:
    """JSON text of `levels` levels of objects and arrays in turn, the outermost an object, itself
    included (as text: json.dumps itself recurses once per level)."""
    opening = "".join("[" if level % 2 else '{"k":' for level in range(levels))
    closing = "".join("]" if level % 2 else "}" for level in reversed(range(levels)))
    return opening + "1" + closing


def _nested_in(where: str, source, levels: int) -> tuple:
    """(a batch holding a value nested `levels` deep in `where` (JSON bytes), its event's path and field)."""
    decision = source.decision(_now(), [["r1"]], candidates={"r1": {"queue_len": 1}})
    events = [decision]
    if where == "candidate stats":
        decision["replicas"]["r1"]["stats"] = "NESTED"
        place = "$.events[0]", "stats"
    elif where == "attributes":
        decision["attributes"] = "NESTED"
        place = "$.events[0]", "attributes"
    elif where == "stats event":
        events.append(source.stats(_now(), "r1", "NESTED"))
        place = "$.events[1]", "stats"
    else:
        decision["from_a_newer_tracer"] = "NESTED"
        place = "$.events[0]", "from_a_newer_tracer"
    return json.dumps(source.batch(events)).replace('"NESTED"', _nested(levels)).encode(), place


NESTED_PLACES = ["candidate stats", "attributes", "stats event", "unknown field"]


@pytest.mark.parametrize("levels", [33, 980, 100_000])
@pytest.mark.parametrize("where", NESTED_PLACES)
def test_values_nested_deeper_than_the_limit_are_422_naming_the_place(collector, make_source, where, levels):
    """980 levels made decoding or storing recurse past Python's limit: a 500,
    which the tracer retries forever, blocking its spool."""
    batch, (event, field) = _nested_in(where, make_source("s1"), levels)
    counts = collector.table_counts()
    for compress in (False, True):
        response = collector.send(batch, compress=compress)
        detail = _assert_refused_cleanly(response, counts, collector)
        assert response.status_code == 422 and "more than 32 levels" in detail, detail
        assert detail.startswith(event) and f".{field}" in detail.split(":")[0], detail
    if levels == 33:  # the place exactly, as other refusals name it
        place = {"candidate stats": "$.events[0].replicas[...].stats"}.get(where, f"{event}.{field}")
        assert detail == f"{place}: nested more than 32 levels deep (arrays and objects)"


@pytest.mark.parametrize("where", NESTED_PLACES)
def test_values_nested_to_the_limit_are_stored(collector, make_source, where):
    body, _ = _nested_in(where, make_source("s1"), 32)
    batch = json.loads(body)
    assert collector.store(body)["stored"] == len(batch["events"])
    decision = collector.get("/v1/decisions/" + batch["events"][0]["id"])
    assert decision["attributes" if where == "attributes" else "id"] == json.loads(body)["events"][0][
        "attributes" if where == "attributes" else "id"]


# Where the times routelens accepts end: 9999-12-31T23:59:59Z, about the last that Python's datetime holds.
# Events are before it; a window [since, until) ends there at the latest.
END = 253402300799.0


@pytest.mark.parametrize("field", ["ts", "collected_at"])
def test_times_after_year_9999_are_422_at_ingest(collector, make_source, field):
    source = make_source("s1")
    event = (source.stats(END - 1, "r1", {"load": 1}, collected_at=END) if field == "collected_at"
             else source.decision(END, [["r1"]]))
    counts = collector.table_counts()
    response = collector.send(source.batch([event]))
    assert response.status_code == 422 and f"$.events[0].{field}" in response.json()["detail"]
    assert collector.table_counts() == counts


READ_PATHS = ("/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits", "/v1/timeseries",
              "/v1/decisions", "/v1/deployments", "/v1/sources", "/v1/export")


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("value", ["253402300800", "281474976710.656", "10000-01-01T00:00:00Z"])
def test_read_windows_after_year_9999_are_422_naming_the_parameter(collector, name, value):
    params = {name: value, **({"since": "0"} if name == "until" else {"until": "253402300799"})}
    for path in READ_PATHS:
        response = collector.http.get(path, params=params)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{name}:"), \
            (path, response.text[:300])


def test_the_latest_times_accepted_are_stored_and_every_read_and_export_holds_them(collector, make_source):
    source = make_source("s1")
    last = END - 0.001
    decision = source.decision(last, [["r1"]], candidates={"r1": {"queue_len": 1}})
    routed = source.routed(last, "r1", decision)
    events = [decision, routed, source.completed(last, "r1", routed),
              source.stats(last, "r1", {"load": 1}, collected_at=last)]
    collector.store(source.batch(events))
    window = {"since": str(END - 3600), "until": str(END)}
    for path in READ_PATHS[:-1]:
        collector.get(path, **window)
    assert collector.get("/v1/summary", **window)["decisions"] == 1
    assert collector.get("/v1/decisions/" + decision["id"])["time"].startswith("9999-12-31T23:59:58.99")
    for what in ("decisions", "candidates", "routed", "completed"):
        for fmt in ("csv", "jsonl", "parquet"):
            exported = collector.http.get("/v1/export", params={**window, "what": what, "format": fmt})
            assert exported.status_code == 200 and exported.content, (what, fmt)
            if fmt == "jsonl":
                assert exported.text.count("\n") == 1, (what, exported.text[:300])


@pytest.mark.parametrize("option", [["--until", "281474976710.656"], ["--since", "253402300800"],
                                    ["--until", "10000-01-01"]])
def test_the_cli_refuses_times_after_year_9999_in_one_line(db_url, tmp_path, capsys, option):
    from routelens.collector.cli import main as routelens

    out = tmp_path / "out.csv"
    assert routelens(["export", "--db", db_url, "-o", str(out), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{option[0].lstrip('-')}: " in err, err
    assert not out.exists()


@pytest.mark.parametrize("step", ["99999999999999999999w", "1e300w", str(10**400) + "s"])
def test_a_timeseries_step_longer_than_any_window_is_422(collector, make_source, step):
    source = make_source("s1")
    collector.store(source.batch([source.decision(_now(), [["r1"]])]))
    for per_replica in ("false", "true"):
        response = collector.http.get("/v1/timeseries", params={"step": step, "per_replica": per_replica})
        assert response.status_code == 422 and response.json()["detail"].startswith("step:"), response.text[:300]


# --- the dashboard's callbacks (served by `routelens up`) ---

@pytest.fixture
def up(db_url, make_source):
    """`routelens up`'s app, in process, on a database with one router's traffic (labels to compare)."""
    from fastapi.testclient import TestClient

    from routelens.collector.settings import Settings
    from routelens.dashboard.up import create_up_app

    app = create_up_app(Settings(db_url=db_url, retention_s=None))
    source = make_source("s1", labels={"router_version": "a"})
    decision = source.decision(_now(), [["r1"], ["r2"]], request_id="req-1")
    routed = source.routed(_now(), "r1", decision)
    batch = source.batch([decision, routed, source.completed(_now(), "r1", routed),
                          source.replicas(_now(), ["r1", "r2"])])
    # A collector on loopback without a token serves its own host names only (tests/reliability/test_auth.py).
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert client.post("/v1/events", json=batch).status_code == 200
        yield client
    app.state.engine.dispose()


def _render(client, pathname: str, search: str):
    """The dashboard's render callback, as the page posts it for a URL."""
    body = {"output": "..view.children...nav.children...custom-window.children..",
            "outputs": [{"id": "view", "property": "children"}, {"id": "nav", "property": "children"},
                        {"id": "custom-window", "property": "children"}],
            "inputs": [{"id": "url", "property": "pathname", "value": pathname},
                       {"id": "url", "property": "search", "value": search},
                       {"id": "tick", "property": "n_intervals", "value": None}],
            "changedPropIds": ["url.pathname"]}
    return client.post("/_dash-update-component", json=body)


def _shown(response) -> str:
    assert response.status_code == 200, response.text[:500]
    return response.text


@pytest.mark.parametrize("until", ["253402300799.5", "253402300800", "281474976710.656"])
def test_a_dashboard_window_after_year_9999_shows_the_bad_filter_message(up, until):
    for view in ("/", "/explorer", "/compare", "/distribution"):
        shown = _shown(_render(up, view, f"?since=0&until={until}"))
        assert "until: " in shown and "out of range" in shown, shown[:500]


def test_a_dashboard_url_with_a_cursor_that_is_no_decision_id_shows_the_newest_page(up):
    shown = _shown(_render(up, "/explorer", "?cursor=garbage"))
    assert "explorer-table" in shown and "req-1" in shown


def test_a_dashboard_compare_url_without_key_value_labels_asks_for_a_choice(up):
    shown = _shown(_render(up, "/compare", "?compare_a=foo&compare_b=bar"))
    assert "compare-hint" in shown


# Values for the dashboard URL's parameters: the odd values above, injections, times and durations past any range.
url_values = (st.sampled_from(INJECTIONS + ["253402300800", "281474976710.656", "nan", "-1", "1e400", "10000-01-01",
                                            "99999999999999999999w", "0196b8a2-7c4e-7000-8000-000000000000", "a=",
                                            "=b", "router_version=a", "router_version=\x00"])
              | odd_values.map(lambda value: value if isinstance(value, str) else json.dumps(value, allow_nan=True))
              | st.text(max_size=30))
url_names = st.sampled_from(["window", "since", "until", "app", "deployment", "router_class", "label", "refresh",
                             "cursor", "decision", "compare_a", "compare_b", "compare_shift", "replica"])
hostile_searches = (st.lists(st.tuples(url_names, url_values), max_size=5).map(lambda pairs: "?" + urlencode(pairs))
                    | st.text(max_size=60))
hostile_paths = st.sampled_from(["/", "/explorer", "/compare", "/distribution", "/staleness", "/rank-hits",
                                 "/nowhere", "", "//", "/explorer/x"]) | st.text(max_size=20)


def _table_counts(engine) -> dict:
    with engine.connect() as connection:
        return {name: connection.scalar(select(func.count()).select_from(table))
                for name, table in Base.metadata.tables.items()}


def _no_server_error(response):
    assert response.status_code < 500 and "Traceback" not in response.text, (response.status_code,
                                                                              response.text[:500])


def test_the_dashboard_callbacks_never_answer_5xx_to_hostile_urls(up):
    """`POST /_dash-update-component`, as `routelens up` serves it: the render
    callback and the controls' callback, with hostile URLs. Reading stores nothing."""
    counts = _table_counts(up.app.state.engine)

    def sync_controls(pathname, search) -> dict:
        controls = ["window", "app", "deployment", "router_class", "label", "refresh"]
        outputs = [f"{c}.value" for c in controls] + ["url.search"] + [f"{c}.options" for c in controls[1:5]]
        return {"output": ".." + "...".join(outputs) + "..",
                "outputs": [{"id": c, "property": "value"} for c in controls] + [{"id": "url", "property": "search"}]
                + [{"id": c, "property": "options"} for c in controls[1:5]],
                "inputs": [{"id": "url", "property": "search", "value": search}]
                + [{"id": c, "property": "value", "value": None} for c in controls]
                + [{"id": "tick", "property": "n_intervals", "value": None}],
                "state": [{"id": "url", "property": "pathname", "value": pathname}], "changedPropIds": ["url.search"]}

    @settings(FUZZ, max_examples=60)
    @given(pathname=hostile_paths, search=hostile_searches)
    def check(pathname, search):
        note(f"{pathname}{search}")
        _no_server_error(_render(up, pathname, search))
        _no_server_error(up.post("/_dash-update-component", json=sync_controls(pathname, search)))

    check()
    assert _table_counts(up.app.state.engine) == counts


def test_the_dashboard_callback_route_never_answers_5xx_to_hostile_bodies(up):
    @settings(FUZZ, max_examples=20)
    @given(body=json_values.map(_body) | odd_values.map(_body) | st.binary(max_size=200))
    def check(body):
        note(body[:500])
        _no_server_error(up.post("/_dash-update-component", content=body,
                                 headers={"content-type": "application/json"}))

    check()
