"""Exports whose client stops reading, on SQLite and PostgreSQL, against the
real server (uvicorn, real sockets): they must not starve ingest and the
read API (issue 24, point 1).

An export streams: while its client does not read, the server's send waits
and the export keeps what it holds. More stalled exports than the database
pool has connections once made every other request wait for the pool's
timeout, then fail with 500.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from routelens.collector.api.app import create_app
from routelens.collector.cli.server_process import ServerProcess
from routelens.collector.settings import Settings
from routelens.collector.store.db import normalize_url
from routelens.collector.store.models import decisions
from tests.support.collector_server import CollectorServer
from tests.support.ports import free_port
from tests.support.wire_source import WireSource

STALLED = 20  # more than the database pool's 16 connections (8 + 8 overflow)
MAX_EXPORTS = 4
LOG_DECISIONS = 16_000  # 10 MB of CSV: more than the socket buffers (4 MB at most) and the server hold
INGEST_BATCHES = 12


def _traffic_batch(src: WireSource, ts: float, n: int) -> bytes:
    events = []
    for i in range(n):
        t = ts + i * 0.001
        replica = f"replica-{i % 7}"
        d = src.decision(t, [[replica], ["replica-other"]], request_id=f"req-{t}-{i}",
                         internal_request_id=f"int-{t}-{i}",
                         candidates={replica: {"queue_len": i % 5, "stats_age_s": 0.5, "stats_age_source": "stamped"}})
        events += [d, src.routed(t + 0.0005, replica, d)]
    return gzip.compress(json.dumps(src.batch(events)).encode())


def _post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/v1/events", content=body,
                       headers={"content-type": "application/json", "content-encoding": "gzip"})


def _stalled_export(port: int, what: str = "decisions", fmt: str = "csv") -> tuple:
    """An export whose client reads its first 100 bytes, then stops reading
    (and keeps the connection open). Its socket, and the answer's status."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's sends fill it soon
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /v1/export?since=0&what={what}&format={fmt} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while len(head) < 100 and b"\r\n" not in head:
        piece = sock.recv(100 - len(head))
        if not piece:
            break
        head += piece
    return sock, head


@pytest.fixture
def server(db_url):
    settings = Settings(db_url=db_url, retention_s=None, minute_rollup_retention_s=None, max_exports=MAX_EXPORTS)
    with CollectorServer(settings) as server:
        yield server


def test_stalled_exports_do_not_starve_ingest_or_reads(server):
    src = WireSource("stalled-export-test")
    t0 = time.time() - 600
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for n in range(LOG_DECISIONS // 2000):
            assert _post(client, _traffic_batch(src, t0 + n * 5, 2000)).status_code == 200

        stalled = [_stalled_export(server.port) for _ in range(STALLED)]
        try:
            statuses = [head.split(b" ", 2)[1] for _, head in stalled]
            assert statuses.count(b"200") == MAX_EXPORTS, statuses
            assert statuses.count(b"503") == STALLED - MAX_EXPORTS, statuses
            refused = next(head for _, head in stalled if b" 503 " in head)
            assert b"retry-after:" in refused.lower(), refused

            # Ingest from two threads and the read API, while the exports stall.
            answers, lock = [], threading.Lock()
            bodies = [_traffic_batch(src, time.time() - 60 + n, 100) for n in range(INGEST_BATCHES)]

            def send(share):
                with httpx.Client(base_url=server.url, timeout=120) as sender:
                    for body in share:
                        response = _post(sender, body)
                        with lock:
                            answers.append(("POST /v1/events", response.status_code, response.text[:200]))

            senders = [threading.Thread(target=send, args=(bodies[i::2],)) for i in range(2)]
            for thread in senders:
                thread.start()
            for path in ("/v1/summary", "/v1/distribution", "/v1/decisions", "/healthz"):
                response = client.get(path, params={} if path == "/healthz" else {"window": "1h"})
                answers.append((path, response.status_code, response.text[:200]))
            for thread in senders:
                thread.join()
            assert [answer for answer in answers if answer[1] != 200] == []
            assert len(answers) == INGEST_BATCHES + 4
        finally:
            for sock, _ in stalled:
                sock.close()

        # Every batch stored, once.
        with server.app.state.engine.connect() as connection:
            stored = connection.scalar(select(func.count()).select_from(decisions))
        assert stored == LOG_DECISIONS + INGEST_BATCHES * 100

        # The clients gone, their slots are free again: an export is served whole.
        deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
        while True:
            response = client.get("/v1/export", params={"since": 0, "format": "csv"})
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            assert response.status_code == 503 and response.headers["retry-after"]
            time.sleep(0.2)
        assert response.status_code == 200
        assert response.text.count("\n") == stored + 1  # a header line, then one line per decision


def test_a_full_pool_is_a_503_with_retry_after_never_a_500(db_url):
    """Requests that find every pooled connection taken for the pool's whole
    timeout are told to come back, as when the database is away. /metrics
    needs no connection: it answers, and says so."""
    engine = create_engine(normalize_url(db_url), pool_size=1, max_overflow=0, pool_timeout=0.5)
    app = create_app(Settings(db_url=db_url, retention_s=None, minute_rollup_retention_s=None), engine=engine)
    src = WireSource("full-pool-test")
    body = gzip.compress(json.dumps(src.batch([src.replicas(time.time() - 60, ["r1"])])).encode())
    try:
        with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client, \
                engine.connect():  # the pool's one connection
            answers = [client.post("/v1/events", content=body, headers={"content-type": "application/json",
                                                                          "content-encoding": "gzip"}),
                       client.get("/v1/summary", params={"window": "1h"}),
                       client.get("/v1/sources", params={"window": "1h"})]
            for answer in answers:
                assert (answer.status_code, answer.headers.get("retry-after")) == (503, "1"), answer.text
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert "routelens_database_available 0.0" in metrics.text
            assert "routelens_database_unavailable_total 3.0" in metrics.text
        # The connection given back: served again.
        with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
            assert client.get("/v1/summary", params={"window": "1h"}).status_code == 200
            assert "routelens_database_available 1.0" in client.get("/metrics").text
    finally:
        engine.dispose()


@pytest.mark.parametrize("what,fmt", [("decisions", "csv"), ("events", "jsonl")])
def test_a_stalled_postgresql_export_holds_no_snapshot(postgres, what, fmt):
    """A snapshot held by a stalled export keeps PostgreSQL from reclaiming
    the row versions ingest's rollup upserts leave, and slows every upsert
    after it (bench/export_starvation.py). Each of an export's reads is a
    transaction of its own: while its client stalls, its session holds none."""
    url = postgres.new_database()
    settings = Settings(db_url=url, retention_s=None, minute_rollup_retention_s=None)
    src = WireSource("snapshot-test")
    try:
        with CollectorServer(settings) as server, httpx.Client(base_url=server.url, timeout=120) as client:
            for n in range(LOG_DECISIONS // 2000):
                assert _post(client, _traffic_batch(src, time.time() - 600 + n * 5, 2000)).status_code == 200
            before = {session.pid for session in _sessions(server)}
            sock, head = _stalled_export(server.port, what=what, fmt=fmt)
            try:
                assert b" 200 " in head, head
                # Until the export has filled the socket and waits (on a busy machine, seconds): its session
                # stops running statements.
                deadline = time.monotonic() + 60  # a guard against hanging, not a measurement
                while True:
                    exports = [session for session in _sessions(server) if session.pid not in before]
                    if exports and exports[0].state != "active" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert len(exports) == 1, exports  # the export's own connection
                assert (exports[0].state, exports[0].backend_xmin) == ("idle", None), exports
            finally:
                sock.close()
    finally:
        postgres.drop(url)


def _sessions(server: CollectorServer) -> list:
    """The other sessions on the server's PostgreSQL database: pid, state, backend_xmin."""
    with server.app.state.engine.connect() as connection:
        return connection.execute(text("SELECT pid, state, backend_xmin::text FROM pg_stat_activity "
                                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")).all()


def test_the_export_limit_is_an_option_of_the_command(tmp_path):
    """`--max-exports N`: the (N+1)th export streaming at once is a 503 with Retry-After."""
    db = f"sqlite:///{tmp_path / 'routelens.db'}"
    src = WireSource("max-exports-test")
    with ServerProcess(db, free_port(), args=["--max-exports", "1"]) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        for n in range(LOG_DECISIONS // 2000):
            assert _post(client, _traffic_batch(src, time.time() - 600 + n * 5, 2000)).status_code == 200
        stalled = [_stalled_export(server.port) for _ in range(2)]
        try:
            assert [head.split(b" ", 2)[1] for _, head in stalled] == [b"200", b"503"], stalled
            assert b"retry-after:" in stalled[1][1].lower()
        finally:
            for sock, _ in stalled:
                sock.close()
