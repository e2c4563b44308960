"""A collector address that passes every batch on to several real collectors
and keeps a copy: one traced deployment set feeds a collector on each backend,
and its raw batches are there for checks on the trace itself."""

from __future__ import annotations

import gzip
import json
import os
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence, Tuple

FORWARDED_HEADERS = ("Content-Type", "Content-Encoding", "Authorization")


class TeeServer:
    """POST /v1/events to `url` goes to each of `collectors` in turn. The
    answer is 200 (the first collector's body) when every collector stored the
    batch, else the first refusal, so that the tracer sends the batch again
    (collectors store an event once). Each batch every collector took is
    appended once, as it was sent (ungzipped), to `<sink_dir>/tee.jsonl`, as the
    JSON Lines sink writes it (`trace_checks.read_events` reads it)."""

    def __init__(self, collectors: Sequence[str], sink_dir: str):
        self.collectors = list(collectors)
        os.makedirs(sink_dir, exist_ok=True)
        self._sink = os.path.join(sink_dir, "tee.jsonl")
        self._kept = set()  # (source_id, seq) of the batches written to the sink
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k: self.headers[k] for k in FORWARDED_HEADERS if self.headers.get(k)}
                status, answer = owner._forward(self.path, body, headers)
                if status == 200:
                    owner._keep(gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="tee", daemon=True)

    def _forward(self, path: str, body: bytes, headers: dict) -> Tuple[int, bytes]:
        answers = []
        for collector in self.collectors:
            request = urllib.request.Request(collector + path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append((response.status, response.read()))
            except urllib.error.HTTPError as refused:
                answers.append((refused.code, refused.read()))
            except OSError as exc:
                answers.append((503, json.dumps({"detail": f"{collector}: {exc}"}).encode()))
        return next((answer for answer in answers if answer[0] != 200), answers[0])

    def _keep(self, body: bytes) -> None:
        batch = json.loads(body)
        key = (batch["source"]["source_id"], batch["seq"])
        with self._lock:
            if key not in self._kept:  # a batch sent again after a lost answer
                self._kept.add(key)
                with open(self._sink, "ab") as sink:
                    sink.write(body + b"\n")

    def __enter__(self) -> "TeeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)
