"""A real HTTP server that takes wire-format batches, for tests: it can refuse
(500), stall, or be stopped and started again on the same port."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional


class EventSinkServer:
    def __init__(self, port: int = 0):
        self.batches: List[Dict[str, Any]] = []
        self.mode = "ok"  # "ok" | "error" (HTTP 500) | "stall" (wait stall_s, then 200)
        self.stall_s = 10.0
        self.posts_started = 0
        self.posts_finished = 0
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                with owner._lock:
                    owner.posts_started += 1
                    mode = owner.mode
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if mode == "stall":
                    time.sleep(owner.stall_s)
                if mode == "error":
                    self.send_response(500)
                    self.end_headers()
                else:
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    with owner._lock:
                        owner.batches.append(json.loads(body))
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b"{}")
                with owner._lock:
                    owner.posts_finished += 1

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop answering: new connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self, **source_filter: str) -> Dict[str, Dict[str, Any]]:
        """Unique events by id (re-sent batches count once), optionally of one source."""
        with self._lock:
            batches = list(self.batches)
        out = {}
        for b in batches:
            if all(b["source"].get(k) == v for k, v in source_filter.items()):
                for e in b["events"]:
                    out[e["id"]] = e
        return out
