"""Unit tests for routers.delivery: the JSON Lines sink, and the collector client
against a real HTTP server on 127.0.0.1 (no Ray, no mocks of the code under test)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from routelens.routers.delivery import CollectorClient, JsonlSink
from routelens.routers.spool import Spool


class Drops:
    """A DropCounter / SpooledDropCounter that remembers its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, first, second):
        self.calls.append((first, second))


def _body(n: int) -> bytes:
    """A small wire-format-like batch numbered n."""
    return json.dumps({"seq": n, "events": [{"i": n}]}, separators=(",", ":")).encode()


# -- JsonlSink -----------------------------------------------------------------


def test_jsonl_sink_writes_one_exact_line_per_batch(tmp_path):
    """Each deliver appends the body bytes plus one newline, nothing else."""
    sink = JsonlSink(str(tmp_path / "out.jsonl"))
    drops = Drops()
    bodies = [_body(1), b'{"unicode":"\xc3\xa9"}', _body(3)]
    for body in bodies:
        sink.deliver(body, 1, drops)
    sink.close()
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(b + b"\n" for b in bodies)
    assert drops.calls == []


def test_jsonl_sink_expands_pid_and_hostname(tmp_path):
    """{pid} and {hostname} in the path are replaced by this process's values."""
    sink = JsonlSink(str(tmp_path / "ev-{hostname}-{pid}.jsonl"))
    expected = tmp_path / f"ev-{socket.gethostname()}-{os.getpid()}.jsonl"
    assert sink.path == str(expected)
    sink.deliver(_body(1), 1, Drops())
    sink.close()
    assert expected.read_bytes() == _body(1) + b"\n"


def test_jsonl_sink_creates_parent_dirs_and_appends(tmp_path):
    """Missing parent directories are created; an existing file is appended to, not truncated."""
    path = tmp_path / "a" / "b" / "out.jsonl"
    first = JsonlSink(str(path))
    first.deliver(_body(1), 1, Drops())
    first.close()
    second = JsonlSink(str(path))
    second.deliver(_body(2), 1, Drops())
    second.close()
    assert path.read_bytes() == _body(1) + b"\n" + _body(2) + b"\n"


def test_jsonl_sink_unwritable_path_counts_drop(tmp_path):
    """A path under a regular file counts ("sink_error", n) and does not raise."""
    blocker = tmp_path / "regular-file"
    blocker.write_bytes(b"")
    sink = JsonlSink(str(blocker / "sub" / "out.jsonl"))
    drops = Drops()
    sink.deliver(_body(1), 7, drops)
    sink.deliver(_body(2), 3, drops)
    assert drops.calls == [("sink_error", 7), ("sink_error", 3)]
    assert blocker.read_bytes() == b""
    assert sink.backlog == 0


# -- a real collector stand-in --------------------------------------------------


class FakeCollector:
    """A ThreadingHTTPServer on 127.0.0.1 recording every request and answering `status`."""

    def __init__(self):
        self.requests = []  # (path, headers, gunzipped body)
        self.status = 200
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real collector
            disable_nagle_algorithm = True  # headers and body are two writes

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                with collector._lock:
                    collector.requests.append((self.path, dict(self.headers), body))
                    status = collector.status
                reply = b'{"detail":"test"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def bodies(self):
        with self._lock:
            return [body for _, _, body in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def collector():
    server = FakeCollector()
    yield server
    server.close()


@pytest.fixture
def no_backoff(monkeypatch):
    """Replays may happen right after a failure."""
    monkeypatch.setattr(CollectorClient, "BACKOFF_BASE_S", 0.0)


def _client(url, tmp_path, token="tok", max_bytes=1_000_000):
    spool = Spool(str(tmp_path / "spool"), max_bytes=max_bytes, segment_bytes=256)
    return CollectorClient(url, token, spool, timeout_s=5.0)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spool_files(tmp_path):
    directory = tmp_path / "spool"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


# -- CollectorClient -------------------------------------------------------------


def test_post_is_gzipped_json_with_bearer_token(collector, tmp_path):
    """A batch is POSTed gzipped to /v1/events with JSON type and the bearer token."""
    client = _client(collector.url, tmp_path, token="s3cret")
    drops = Drops()
    client.deliver(_body(1), 1, drops)
    client.close()
    [(path, headers, body)] = collector.requests
    assert path == "/v1/events"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Authorization"] == "Bearer s3cret"
    assert body == _body(1)
    assert drops.calls == [] and client.backlog == 0


def test_no_token_no_authorization_header(collector, tmp_path):
    """Without a token no Authorization header is sent."""
    client = _client(collector.url, tmp_path, token="")
    client.deliver(_body(1), 1, Drops())
    client.close()
    [(_, headers, _)] = collector.requests
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    "suffix,expected",
    [
        ("", "/v1/events"),
        ("/", "/v1/events"),
        ("/v1/events", "/v1/events"),
        ("/v1/events/", "/v1/events"),
        ("/base", "/base/v1/events"),
        ("/base/v1/events", "/base/v1/events"),
    ],
)
def test_path_is_v1_events_once(collector, tmp_path, suffix, expected):
    """/v1/events is appended to the URL's path unless it already ends with it."""
    client = _client(collector.url + suffix, tmp_path)
    client.deliver(_body(1), 1, Drops())
    client.close()
    assert [path for path, _, _ in collector.requests] == [expected]


def test_several_batches_reuse_the_client(collector, tmp_path):
    """Consecutive batches are all delivered in order."""
    client = _client(collector.url, tmp_path)
    drops = Drops()
    for n in range(5):
        client.deliver(_body(n), 1, drops)
    client.close()
    assert collector.bodies == [_body(n) for n in range(5)]
    assert drops.calls == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "127.0.0.1:8000", "http://"])
def test_bad_url_is_refused_at_construction(tmp_path, url):
    """A non-http(s) URL or one without a host raises ValueError when the client is built."""
    with pytest.raises(ValueError):
        _client(url, tmp_path)


def test_server_error_spools_then_replays_oldest_first(collector, tmp_path, no_backoff):
    """On 500 batches are spooled; once the server answers 200 a replay sends them oldest first."""
    collector.status = 500
    client = _client(collector.url, tmp_path)
    drops = Drops()
    for n in range(3):
        client.deliver(_body(n), 1, drops)
    assert client.backlog >= 1 and _spool_files(tmp_path)
    assert collector.bodies[0] == _body(0)  # the first was tried once before spooling

    collector.status = 200
    attempts_before = len(collector.requests)
    client.replay(5.0, drops)
    assert collector.bodies[attempts_before:] == [_body(0), _body(1), _body(2)]
    assert client.backlog == 0
    assert _spool_files(tmp_path) == []
    assert drops.calls == []
    client.close()


def test_retry_at_reset_makes_replay_immediate(collector, tmp_path):
    """With the default backoff, clearing _retry_at lets the replay run right away."""
    collector.status = 503
    client = _client(collector.url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    assert client.backlog == 1
    collector.status = 200
    client._retry_at = 0
    client.replay(5.0, Drops())
    assert collector.bodies[-1] == _body(1)
    assert client.backlog == 0
    client.close()


def test_replay_waits_for_backoff(collector, tmp_path):
    """While the backoff has not expired, replay sends nothing and keeps the spool."""
    collector.status = 500
    client = _client(collector.url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    collector.status = 200
    client._retry_at = time.monotonic() + 3600
    attempts = len(collector.requests)
    client.replay(5.0, Drops())
    assert len(collector.requests) == attempts
    assert client.backlog == 1
    client.close()


def test_new_batches_queue_behind_the_spool(collector, tmp_path, no_backoff):
    """Once something is spooled, new batches are spooled too (order kept), even if the server is back."""
    collector.status = 500
    client = _client(collector.url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    collector.status = 200
    attempts = len(collector.requests)
    client.deliver(_body(2), 1, Drops())
    assert len(collector.requests) == attempts  # not sent directly: it would overtake batch 1
    client.replay(5.0, Drops())
    assert collector.bodies[attempts:] == [_body(1), _body(2)]
    client.deliver(_body(3), 1, Drops())  # spool empty again: sent directly
    assert collector.bodies[-1] == _body(3)
    assert client.backlog == 0
    client.close()


def test_replay_stops_at_the_first_failure(collector, tmp_path, no_backoff):
    """A replay that meets a 500 stops there and keeps the batch for later."""
    collector.status = 500
    client = _client(collector.url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    client.deliver(_body(2), 1, Drops())
    attempts = len(collector.requests)
    client.replay(5.0, Drops())
    assert collector.bodies[attempts:] == [_body(1)]
    assert client.backlog >= 1
    collector.status = 200
    client.replay(5.0, Drops())
    assert collector.bodies[-2:] == [_body(1), _body(2)]
    assert client.backlog == 0
    client.close()


def test_bad_request_is_dropped_not_spooled(collector, tmp_path):
    """A 400 answer counts ("rejected", n) and spools nothing."""
    collector.status = 400
    client = _client(collector.url, tmp_path)
    drops = Drops()
    client.deliver(_body(1), 4, drops)
    assert drops.calls == [("rejected", 4)]
    assert client.backlog == 0
    assert _spool_files(tmp_path) == []
    collector.status = 200
    client.deliver(_body(2), 1, drops)  # no backoff after a rejection
    assert collector.bodies == [_body(1), _body(2)]
    client.close()


def test_rejected_spooled_batch_is_counted_and_skipped(collector, tmp_path, no_backoff):
    """During a replay a 400 counts the spooled body as rejected and moves on to the next."""
    collector.status = 500
    client = _client(collector.url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    client.deliver(_body(2), 1, Drops())
    collector.status = 400
    spooled_drops = Drops()
    client.replay(5.0, spooled_drops)
    assert spooled_drops.calls == [(_body(1), "rejected"), (_body(2), "rejected")]
    assert client.backlog == 0
    client.close()


@pytest.mark.parametrize("status", [408, 429, 502])
def test_retryable_statuses_are_spooled(collector, tmp_path, status):
    """408, 429 and 5xx answers spool the batch instead of dropping it."""
    collector.status = status
    client = _client(collector.url, tmp_path)
    drops = Drops()
    client.deliver(_body(1), 2, drops)
    assert drops.calls == []
    assert client.backlog == 1
    client.close()


def test_connection_refused_is_spooled_not_raised(tmp_path, no_backoff):
    """With nothing listening batches are spooled to disk and deliver/replay return normally."""
    client = _client(f"http://127.0.0.1:{_closed_port()}", tmp_path)
    drops = Drops()
    client.deliver(_body(1), 1, drops)
    client.deliver(_body(2), 1, drops)
    client.replay(1.0, drops)  # still refused: returns, keeps everything
    client.close()
    assert drops.calls == []
    assert client.backlog >= 1
    on_disk = b"".join((tmp_path / "spool" / name).read_bytes() for name in _spool_files(tmp_path))
    assert on_disk == _body(1) + b"\n" + _body(2) + b"\n"


def test_spooled_while_down_delivered_when_server_starts(tmp_path, no_backoff):
    """Batches spooled while the collector is down are delivered, in order, once it is up."""
    server = FakeCollector()
    url = server.url
    server.close()  # the port is now closed
    client = _client(url, tmp_path)
    client.deliver(_body(1), 1, Drops())
    client.deliver(_body(2), 1, Drops())
    assert client.backlog >= 1
    revived = FakeCollector()
    try:
        client = CollectorClient(revived.url, "tok", client._spool, timeout_s=5.0)
        client.replay(5.0, Drops())
        assert revived.bodies == [_body(1), _body(2)]
        assert client.backlog == 0
    finally:
        client.close()
        revived.close()


def test_spool_full_counts_drop(tmp_path, no_backoff):
    """When the spool has no room the batch is counted as ("spool_full", n)."""
    client = _client(f"http://127.0.0.1:{_closed_port()}", tmp_path, max_bytes=len(_body(1)) + 1)
    drops = Drops()
    client.deliver(_body(1), 1, drops)  # fits exactly
    client.deliver(_body(2), 5, drops)  # does not
    assert drops.calls == [("spool_full", 5)]
    assert client.backlog == 1
    client.close()
