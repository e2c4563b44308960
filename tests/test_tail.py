"""`routelens tail` and `GET /v1/tail` against a live collector (uvicorn, real
sockets): every stored decision once, in the order stored, with its outcome;
filters, those of a decision's own fields (request id, model id, reason)
applied to its later routing and outcome too, a window refused; the read
API's token; resuming after the last event id; a slow
reader told what it missed, while ingest goes on; the command imports no
server code. Through the workers of `--workers 2`: tests/test_collector_workers.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import List

import httpx
import pytest

from routelens.collector.query.filters import build_filters
from routelens.collector.query.tail import PAGE_BATCHES, Follower, newest
from routelens.collector.settings import Settings
from tests.support import sse
from tests.support.collector_server import CollectorServer
from tests.support.python_child import run_python
from tests.support.trace_checks import wait_for
from tests.support.wire_source import WireSource

TOKEN = "tail-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def serve(tmp_path, **settings) -> CollectorServer:
    return CollectorServer(Settings(db_url=f"sqlite:///{tmp_path / 'routelens.db'}", token=TOKEN, retention_s=None,
                                    minute_rollup_retention_s=None, **settings))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One collector for the module's tests: each follows from the moment it starts, with sources of its own."""
    with serve(tmp_path_factory.mktemp("tail")) as collector:
        with httpx.Client(base_url=collector.url, timeout=30, headers=AUTH) as api:
            collector.api = api
            yield collector


def readers(server) -> int:
    return sse.open_streams(server.url, AUTH)


def store(server, batch: dict) -> None:
    answer = server.api.post("/v1/events", json=batch)
    assert answer.status_code == 200, answer.text


def tail(server, *args: str) -> subprocess.Popen:
    before = readers(server)
    process = subprocess.Popen([sys.executable, "-m", "routelens.collector.cli", "tail", "--url", server.url, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "ROUTELENS_TOKEN": TOKEN})
    wait_for(lambda: readers(server) > before or process.poll() is not None, 30, "the tail to connect")
    assert process.poll() is None, process.communicate()
    return process


def requests(src: WireSource, t: float, n: int, prefix: str, complete: bool = True):
    """n requests: decision, routed and (unless not `complete`) completed events; the routed events."""
    events, routed_events = [], []
    for i in range(n):
        decision = src.decision(t + i * 0.01, [[f"r{i % 2}"], [f"r{(i + 1) % 2}"]], request_id=f"{prefix}{i}")
        routed = src.routed(t + i * 0.01 + 0.001, f"r{i % 2}", decision, rank=0)
        events += [decision, routed]
        if complete:
            events.append(src.completed(t + i * 0.01 + 0.002, f"r{i % 2}", routed, latency_ms=4.0))
        routed_events.append(routed)
    return events, routed_events


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    out, _err = process.communicate(timeout=30)
    return out


def test_every_stored_decision_appears_once_in_order_with_its_outcome(server):
    process = tail(server, "--json")
    a = WireSource("order-a", app="shop", deployment="Checkout")
    b = WireSource("order-b", app="shop", deployment="Search")
    t = time.time()
    sent = []
    pending = []
    for k in range(6):
        source = (a, b)[k % 2]
        events, routed = requests(source, t + k, 20, f"{source.info['source_id']}{k}-", complete=k % 3 != 2)
        if k % 3 == 2:
            pending.append((source, routed))  # their completions come in a later batch
        store(server, source.batch(events))
        sent += [e["id"] for e in events if e["type"] == "decision"]
    for source, routed in pending:
        # And a refusal (wire format v2), which names the decision that supplied the replica.
        refusal = source.completed(time.time(), "r1", rejected=True, decision={"id": routed[0]["decision_id"]})
        store(server, source.batch([refusal] + [source.completed(time.time(), r["replica_id"], r, ok=False,
                                                                 latency_ms=9.0) for r in routed]))
    later = sum(len(routed) + 1 for _source, routed in pending)
    lines = [json.loads(process.stdout.readline()) for _ in range(len(sent) + later)]
    stop(process)
    decisions = [line for line in lines if line["type"] == "decision"]
    assert [d["id"] for d in decisions] == sent  # each once, in the order stored
    assert all(d["replica"] in ("r0", "r1") and d["rank"] == 0 and d["app"] == "shop" for d in decisions)
    assert sum(d["outcome"] == {"ok": True, "latency_ms": 4.0, "rejected": False} for d in decisions) == 80
    completions = [line for line in lines if line["type"] == "completed"]
    assert len(completions) == later
    by_id = {d["id"] for d in decisions if d["outcome"] is None}
    assert {c["decision_id"] for c in completions} == by_id
    assert all(c["ok"] is False for c in completions if not c["rejected"])
    assert sorted(c["decision_id"] for c in completions if c["rejected"]) == \
        sorted(routed[0]["decision_id"] for _source, routed in pending)


def test_filters_and_the_text_lines(server):
    process = tail(server, "--deployment", "Search", "--replica", "r1")
    a = WireSource("filters-a", app="shop", deployment="Checkout")
    b = WireSource("filters-b", app="shop", deployment="Search")
    store(server, a.batch(requests(a, time.time(), 4, "a")[0]))
    store(server, b.batch(requests(b, time.time(), 4, "b")[0]))
    lines = [process.stdout.readline().rstrip("\n") for _ in range(2)]
    stop(process)
    assert all("shop/Search" in line and "-> r1 (rank 0)" in line and line.endswith("ok 4.0 ms") for line in lines)
    assert [line.split()[2] for line in lines] == ["b1", "b3"]  # request ids; Checkout's and r0's left out


def test_a_decisions_own_filters_apply_to_it_and_to_its_later_routing_and_outcome(collector):
    """--request-id, --model-id and --reason: a decision passes if its fields match; a routing or
    outcome stored later passes if its decision matched, even one stored before the reader started."""
    src = WireSource("own-fields", app="shop", deployment="Checkout")
    t = time.time()
    early = src.decision(t, [["r0"]], request_id="early", model_id="m1", reason="pow2_imbalanced")
    collector.store(src.batch([early]))  # before the reader starts: its routing and outcome come after
    with collector.engine.connect() as connection:
        after = newest(connection)
    first = [src.decision(t + 1 + i, [[f"r{i % 2}"]], request_id=f"q{i}", model_id=f"m{i % 2}",
                          reason=("pow2_imbalanced", "locality")[i // 2 % 2]) for i in range(4)]
    routings = [src.routed(t + 1 + i + 0.1, f"r{i % 2}", decision) for i, decision in enumerate(first)]
    # q0 and q1: routed and completed with their decision; q2, q3 and `early`: routed and completed later.
    collector.store(src.batch(first + routings[:2] + [src.completed(t + 1 + i + 0.2, f"r{i % 2}", routings[i],
                                                                    latency_ms=3.0) for i in range(2)]))
    early_routing = src.routed(t + 6, "r0", early)
    later = routings[2:] + [early_routing]
    collector.store(src.batch(later + [src.completed(t + 7 + k, r["replica_id"], r, latency_ms=5.0)
                                       for k, r in enumerate(later)]))
    # A refusal naming its decision (wire format v2): q3's.
    collector.store(src.batch([src.completed(t + 9, "r1", rejected=True, decision={"id": first[3]["id"]})]))

    def shown(**given) -> List[tuple]:
        follower = Follower(build_filters(**given), 60.0, after)
        with collector.engine.connect() as connection:
            records = follower.poll(connection)
        by_id = {e["id"]: e["request_id"] for e in [early, *first]}
        return [(r["type"], r["request_id"] if r["type"] == "decision" else by_id[r["decision_id"]])
                for r in records]

    everything = shown()
    assert len(everything) == 4 + 2 * 3 + 1  # the decisions; later routings and outcomes; the refusal
    assert shown(reason=["pow2_imbalanced"]) == [
        ("decision", "q0"), ("decision", "q1"), ("routed", "early"), ("completed", "early")]
    assert shown(reason=["locality"]) == [
        ("decision", "q2"), ("decision", "q3"), ("routed", "q2"), ("routed", "q3"),
        ("completed", "q2"), ("completed", "q3"), ("completed", "q3")]
    assert shown(model_id="m1") == [
        ("decision", "q1"), ("decision", "q3"), ("routed", "q3"), ("routed", "early"),
        ("completed", "q3"), ("completed", "early"), ("completed", "q3")]
    assert shown(request_id="q2") == [("decision", "q2"), ("routed", "q2"), ("completed", "q2")]
    assert shown(request_id="early", model_id="m1", reason=["pow2_imbalanced", "locality"]) == [
        ("routed", "early"), ("completed", "early")]
    assert shown(request_id="q2", model_id="m1") == []  # all must hold
    assert shown(reason=["pow2_imbalanced"], replica=["r0"]) == [
        ("decision", "q0"), ("routed", "early"), ("completed", "early")]


def test_the_command_passes_a_decisions_own_filters(server):
    process = tail(server, "--reason", "locality", "--reason", "least_loaded", "--model-id", "m1")
    src = WireSource("own-fields-cli", app="shop", deployment="Models")
    t = time.time()
    store(server, src.batch([src.decision(t + i * 0.01, [["r0"]], request_id=f"c{i}", model_id=f"m{i % 2}",
                                          reason=("locality", "pow2_imbalanced", "least_loaded")[i % 3])
                             for i in range(12)]))
    lines = [process.stdout.readline().split()[2] for _ in range(4)]
    store(server, src.batch([src.decision(time.time(), [["r0"]], request_id="id-only")]))
    request = tail(server, "--request-id", "id-only")
    store(server, src.batch([src.decision(time.time(), [["r0"]], request_id=name) for name in ("other", "id-only")]))
    only = request.stdout.readline().split()[2]
    stop(process)
    stop(request)
    assert lines == ["c3", "c5", "c9", "c11"]  # model m1 (i odd), reason locality or least_loaded (i % 3 != 1)
    assert only == "id-only"


def test_the_tail_refuses_a_window_rather_than_ignore_it(server):
    before = readers(server)
    for query, named in (("window=1h", "window"), ("since=0&until=10", "since, until")):
        with server.api.stream("GET", f"/v1/tail?app=shop&{query}") as answer:  # a stream would never end
            assert answer.status_code == 422
            assert json.loads(answer.read())["detail"].startswith(f"{named}: the tail has no window")
    assert readers(server) == before  # no stream was opened


def test_the_tail_wants_the_read_apis_token(server):
    assert httpx.get(server.url + "/v1/tail", timeout=10).status_code == 401
    denied = subprocess.run([sys.executable, "-m", "routelens.collector.cli", "tail", "--url", server.url,
                             "--token", "wrong"], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "ROUTELENS_TOKEN"})
    assert denied.returncode == 1 and "token" in denied.stderr and "Traceback" not in denied.stderr


def test_a_reader_resumes_after_its_last_event_id(server):
    src = WireSource("resume", app="shop", deployment="Resume")
    with httpx.stream("GET", server.url + "/v1/tail?deployment=Resume", headers=AUTH, timeout=30) as first:
        events = sse.events(first.iter_lines())
        assert next(events)[0] == "hello"
        store(server, src.batch([src.decision(time.time(), [["r1"]], request_id="seen")]))
        name, record, last_id = next(events)
        assert (name, record["request_id"]) == ("decision", "seen") and last_id
    store(server, src.batch([src.decision(time.time(), [["r1"]], request_id=f"while-away-{i}") for i in range(3)]))
    with httpx.stream("GET", server.url + "/v1/tail?deployment=Resume", timeout=30,
                      headers={**AUTH, "Last-Event-ID": last_id}) as again:
        events = sse.events(again.iter_lines())
        assert next(events)[1] == {"type": "hello", "after": int(last_id)}
        assert [next(events)[1]["request_id"] for _ in range(3)] == [f"while-away-{i}" for i in range(3)]
    refused = server.api.get("/v1/tail", headers={"Last-Event-ID": "12; DROP TABLE decisions"})
    assert refused.status_code == 422 and "Last-Event-ID" in refused.text


def test_a_slow_reader_is_told_what_it_missed_and_ingest_goes_on(tmp_path):
    """A reader that stops reading: ingest stores every batch meanwhile. Its
    stream reads at most two pages of batches after its client's socket is
    full (it waits to send before reading more), so batches are left unread;
    when the client reads again they are older than --tail-max-behind: the
    reader skips to the newest, told how many decisions it missed. It got the
    others in order, each once, and those and the missed add up to all."""
    max_behind_s = 0.5
    with serve(tmp_path, tail_max_behind_s=max_behind_s) as collector, \
            httpx.Client(base_url=collector.url, timeout=30, headers=AUTH) as api:
        collector.api = api
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", collector.port))
        # HTTP/1.0: the body comes as it is, not in chunks, until the server closes.
        reader.sendall(f"GET /v1/tail HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        wait_for(lambda: readers(collector) > 0, 30, "the reader to connect")
        src = WireSource("busy", app="shop", deployment="Checkout")
        t = time.time()
        sent: List[str] = []
        # A first batch of some 6 MB of records, more than the sockets (Linux lets a sending socket's buffer
        # grow to 4 MB) and the server's buffer hold; then more batches than two pages.
        for k, size in enumerate([12_000] + [10] * (2 * PAGE_BATCHES + 20)):
            events = [src.decision(t + k + i * 0.0001, [["r0"]], request_id=f"q{k}-{i}-" + "x" * 200)
                      for i in range(size)]
            store(collector, src.batch(events))  # a stalled reader holds nothing up
            sent += [e["id"] for e in events]
        stored_at = time.time()
        wait_for(lambda: time.time() - stored_at > max_behind_s, 10, "the batches to be older than the bound")
        reader.settimeout(30)
        head, body, received, missed = b"", None, [], 0
        while len(received) + missed < len(sent):
            chunk = reader.recv(1 << 20)
            assert chunk, "the stream ended"
            if body is None:  # the answer's head first
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                chunk, body = head.split(b"\r\n\r\n", 1)[1], ""
            body += chunk.decode()  # (JSON in ASCII: no character is cut in two)
            *blocks, body = body.split("\n\n")  # the last may be cut short: kept for the next chunk
            for block in blocks:
                fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
                if fields.get("event") == "decision":
                    received.append(json.loads(fields["data"])["id"])
                elif fields.get("event") == "missed":
                    missed += json.loads(fields["data"])["count"]
        reader.close()
    assert missed > 0, f"the reader fell behind by nothing: {len(received)} of {len(sent)} delivered"
    assert len(received) + missed == len(sent)
    assert len(set(received)) == len(received)
    order = {record_id: index for index, record_id in enumerate(sent)}
    positions = [order[record_id] for record_id in received]
    assert positions == sorted(positions)  # in the order stored, a gap where records were missed


def test_the_command_imports_no_server_code():
    """`routelens tail` runs where only the tracer is installed: none of the server extra's packages."""
    result = run_python("""
        import sys
        from routelens.collector.cli import SERVER_MODULES, main
        code = main(["tail", "--url", "http://127.0.0.1:1"])
        print(code, sorted(SERVER_MODULES & {name.split(".")[0] for name in sys.modules}))
    """, cwd=os.getcwd())
    assert result.stdout.split("\n")[0] == "1 []", result.stdout + result.stderr
    assert "cannot reach http://127.0.0.1:1" in result.stderr
