"""`routelens tail` and `GET /v1/tail` against a live collector (uvicorn, real
sockets): every stored decision once, in the order stored, with its outcome;
filters; the read API's token; a slow reader told what it missed, while
ingest goes on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from routelens.collector.settings import Settings
from tests.support.collector_server import CollectorServer
from tests.support.trace_checks import wait_for
from tests.support.wire_source import WireSource

TOKEN = "tail-token"


@pytest.fixture
def server(tmp_path):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'routelens.db'}", token=TOKEN, retention_s=None,
                        minute_rollup_retention_s=None, tail_buffer=200)
    with CollectorServer(settings) as collector:
        with httpx.Client(base_url=collector.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            collector.api = api
            yield collector


def readers(server) -> int:
    return len(server.app.state.tail._readers)


def store(server, batch: dict) -> None:
    answer = server.api.post("/v1/events", json=batch)
    assert answer.status_code == 200, answer.text


def tail(server, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "routelens.collector.cli", "tail", "--url", server.url, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "ROUTELENS_TOKEN": TOKEN})
    wait_for(lambda: readers(server) > 0 or process.poll() is not None, 30, "the tail to connect")
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
    a = WireSource("a", app="shop", deployment="Checkout")
    b = WireSource("b", app="shop", deployment="Search")
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
        store(server, source.batch([source.completed(time.time(), r["replica_id"], r, ok=False, latency_ms=9.0)
                                    for r in routed]))
    later = sum(len(routed) for _source, routed in pending)
    deadline = time.monotonic() + 30
    lines = []
    while len(lines) < len(sent) + later and time.monotonic() < deadline:
        lines.append(json.loads(process.stdout.readline()))
    stop(process)
    decisions = [line for line in lines if line["type"] == "decision"]
    assert [d["id"] for d in decisions] == sent  # each once, in the order stored
    assert all(d["replica"] in ("r0", "r1") and d["rank"] == 0 for d in decisions)
    assert sum(d["outcome"] == {"ok": True, "latency_ms": 4.0, "rejected": False} for d in decisions) == 80
    completions = [line for line in lines if line["type"] == "completed"]
    assert len(completions) == later and not any(line["type"] == "missed" for line in lines)
    by_id = {d["id"] for d in decisions if d["outcome"] is None}
    assert {c["decision_id"] for c in completions} == by_id and all(c["ok"] is False for c in completions)


def test_filters_and_the_text_lines(server):
    process = tail(server, "--deployment", "Search", "--replica", "r1")
    a = WireSource("a", app="shop", deployment="Checkout")
    b = WireSource("b", app="shop", deployment="Search")
    store(server, a.batch(requests(a, time.time(), 4, "a")[0]))
    store(server, b.batch(requests(b, time.time(), 4, "b")[0]))
    lines = [process.stdout.readline().rstrip("\n") for _ in range(2)]
    stop(process)
    assert all("shop/Search" in line and "-> r1 (rank 0)" in line and line.endswith("ok 4.0 ms") for line in lines)
    assert [line.split()[2] for line in lines] == ["b1", "b3"]  # request ids; Checkout's and r0's left out


def test_the_tail_wants_the_read_apis_token(server):
    assert httpx.get(server.url + "/v1/tail", timeout=10).status_code == 401
    denied = subprocess.run([sys.executable, "-m", "routelens.collector.cli", "tail", "--url", server.url,
                             "--token", "wrong"], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "ROUTELENS_TOKEN"})
    assert denied.returncode == 1 and "token" in denied.stderr and "Traceback" not in denied.stderr


def sse_events(data: bytes):
    """The complete events of a stream read so far (the last block may be cut short)."""
    for block in data.decode(errors="replace").split("\n\n")[:-1]:
        name = data_line = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data_line = line[len("data: "):]
        if name and data_line:
            yield name, json.loads(data_line)


def test_a_slow_reader_is_told_what_it_missed_and_ingest_goes_on(server):
    """A reader that stops reading: ingest stores every batch meanwhile; its buffer
    holds at most `tail_buffer` records; when it reads again it gets records in
    order, each once, and `missed` events that account for all the others."""
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", server.port))
    # HTTP/1.0: the body comes as it is, not in chunks, until the server closes.
    reader.sendall(f"GET /v1/tail HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    wait_for(lambda: readers(server) > 0, 30, "the reader to subscribe")
    src = WireSource("busy", app="shop", deployment="Checkout")
    t = time.time()
    sent = []
    started = time.monotonic()
    for k in range(30):
        events = [src.decision(t + k + i * 0.001, [["r0"]], request_id=f"q{k}-{i}") for i in range(400)]
        store(server, src.batch(events))
        sent += [e["id"] for e in events]
    stored_in = time.monotonic() - started
    (subscriber,) = server.app.state.tail._readers
    assert len(subscriber._records) <= server.app.state.tail.buffer + 1  # bounded (a `missed` marker beside)
    reader.settimeout(1.0)
    data = b""
    deadline = time.monotonic() + 60
    received, missed = [], 0
    while time.monotonic() < deadline and len(received) + missed < len(sent):
        try:
            chunk = reader.recv(1 << 20)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
        body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
        received, missed = [], 0
        for name, record in sse_events(body.replace(b"\r\n", b"\n")):
            if name == "decision":
                received.append(record["id"])
            elif name == "missed":
                missed += record["count"]
    reader.close()
    assert missed > 0, f"the reader fell behind by nothing: {len(received)} of {len(sent)} delivered"
    assert len(received) + missed == len(sent)
    assert len(set(received)) == len(received)
    order = {record_id: index for index, record_id in enumerate(sent)}
    positions = [order[record_id] for record_id in received]
    assert positions == sorted(positions)  # in the order stored, a gap where records were missed
    assert stored_in < 60, stored_in
