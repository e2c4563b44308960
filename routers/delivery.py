"""Where encoded batches go: a collector over HTTP, or a JSON Lines file.

Both are a `Destination`, and run on the exporter thread only. A destination
never raises: what it cannot deliver it stores (the spool) or counts as
dropped on the batch's source.
"""

from __future__ import annotations

import gzip
import http.client
import os
import random
import socket
import time
import urllib.parse
from typing import Callable, Dict, Optional, Protocol, Union

from .faults import faults
from .spool import Spool, SpoolFull

# Counts `n` events of the batch being delivered as dropped, under a reason.
DropCounter = Callable[[str, int], None]
# Counts every event of a spooled batch (its JSON given) as dropped, under a reason.
SpooledDropCounter = Callable[[bytes, str], None]


class Destination(Protocol):
    """What the exporter hands a source's encoded batches to."""

    @property
    def backlog(self) -> int:
        """Batches stored for later delivery (the exporter's flush waits for none)."""

    def deliver(self, body: bytes, n_events: int, count_drop: DropCounter) -> bool:
        """Deliver or store one batch; False if it was dropped (and counted with `count_drop`)."""

    def replay(self, budget_s: float, count_drop: SpooledDropCounter) -> None:
        """Deliver stored batches, oldest first, for at most about `budget_s`."""

    def close(self) -> None:
        """Release connections and files; called on the exporter thread's exit and after a fork."""


class JsonlSink:
    """Appends one wire-format batch per line, exactly the collector's JSON.

    Each line is written with a single `write` on an O_APPEND descriptor, so
    processes that share a path never interleave partial lines.
    """

    def __init__(self, path: str):
        self.path = path.format(pid=os.getpid(), hostname=socket.gethostname())
        self._fd: Optional[int] = None

    @property
    def backlog(self) -> int:
        return 0

    def deliver(self, body: bytes, n_events: int, count_drop: DropCounter) -> bool:
        """Write the batch; False if it was dropped (and counted)."""
        try:
            if self._fd is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            line = body + b"\n"
            if os.write(self._fd, line) != len(line):
                raise OSError(f"short write to {self.path}")
            return True
        except OSError as exc:
            self.close()
            count_drop("sink_error", n_events)
            faults.record(f"writing the JSON Lines sink {self.path}", exc)
            return False

    def replay(self, budget_s: float, count_drop: SpooledDropCounter) -> None:
        """Nothing waits in a file sink."""

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class CollectorClient:
    """POSTs batches to `/v1/events`; spools them while the collector is away.

    Order is kept: once anything is spooled, new batches queue behind it on
    disk until the spool is replayed, oldest first. Replays are paced by
    exponential backoff with jitter, so a collector coming back is not
    stampeded by every router of the cluster at once.
    """

    BACKOFF_BASE_S = 0.5
    BACKOFF_MAX_S = 10.0

    def __init__(self, url: str, token: str, spool: Spool, timeout_s: float):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"collector_url must be http(s)://host[:port], got {url!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        path = parsed.path.rstrip("/")
        self._path = path if path.endswith("/v1/events") else path + "/v1/events"
        self._headers: Dict[str, Union[str, bytes]] = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }
        if token:
            # As bytes: http.client would encode a str as latin-1; the collector reads UTF-8.
            self._headers["Authorization"] = b"Bearer " + token.encode()
        self._timeout_s = timeout_s
        self._spool = spool
        self._conn: Optional[http.client.HTTPConnection] = None
        self._failures = 0
        self._retry_at = 0.0  # monotonic

    @property
    def backlog(self) -> int:
        return len(self._spool)

    def deliver(self, body: bytes, n_events: int, count_drop: DropCounter) -> bool:
        """Send or spool the batch; False if it was dropped (and counted)."""
        if self._oldest_spooled() is None and time.monotonic() >= self._retry_at:
            outcome = self._post(body)
            if outcome == "ok":
                return True
            if outcome == "rejected":
                count_drop("rejected", n_events)
                return False
        return self._to_spool(body, n_events, count_drop)

    def replay(self, budget_s: float, count_drop: SpooledDropCounter) -> None:
        """Send spooled batches, oldest first, until done, failing, or out of time."""
        deadline = time.monotonic() + budget_s
        while time.monotonic() >= self._retry_at and time.monotonic() < deadline:
            body = self._oldest_spooled()
            if body is None:
                return
            outcome = self._post(body)
            if outcome == "retry":
                return
            if outcome == "rejected":
                count_drop(body, "rejected")
            self._spool.pop()

    def _oldest_spooled(self) -> Optional[bytes]:
        while True:  # each failure skips the unreadable segment, so this ends
            try:
                return self._spool.peek()
            except OSError as exc:
                faults.record(f"reading the spool in {self._spool.directory} (a segment was lost)", exc)

    def _to_spool(self, body: bytes, n_events: int, count_drop: DropCounter) -> bool:
        try:
            self._spool.append(body)
            return True
        except SpoolFull:
            count_drop("spool_full", n_events)
        except OSError as exc:
            count_drop("spool_error", n_events)
            faults.record(f"writing the spool in {self._spool.directory}", exc)
        return False

    def _post(self, body: bytes) -> str:
        """One attempt: 'ok', 'rejected' (the collector refuses it for good) or 'retry'."""
        payload = gzip.compress(body, 3)
        try:
            try:
                status, detail = self._request(payload)
            except (ConnectionError, http.client.RemoteDisconnected):
                # The collector may have closed our idle keep-alive connection;
                # that is no outage, so try once more on a fresh one.
                self._close_connection()
                status, detail = self._request(payload)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ValueError: http.client refusing a header or URL part; retried
            # like an outage, so the batch waits in the spool, counted if dropped.
            self._close_connection()
            self._schedule_retry()
            faults.record(f"sending to the collector at {self._host}:{self._port}", exc)
            return "retry"
        if 200 <= status < 300:
            self._failures = 0
            self._retry_at = 0.0
            return "ok"
        if status in (408, 429) or status >= 500:
            self._schedule_retry()
            return "retry"
        faults.record(
            "the collector refusing a batch",
            RuntimeError(f"HTTP {status}: {detail[:500].decode('utf-8', 'replace')}"),
        )
        return "rejected"

    def _request(self, payload: bytes):
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout_s)
        self._conn.request("POST", self._path, body=payload, headers=self._headers)
        response = self._conn.getresponse()
        return response.status, response.read()

    def _schedule_retry(self) -> None:
        delay = min(self.BACKOFF_MAX_S, self.BACKOFF_BASE_S * 2**self._failures)
        self._failures = min(self._failures + 1, 30)
        self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._close_connection()
        self._spool.close()

