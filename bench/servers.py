"""A routelens server (`routelens collector` or `routelens up`) in a child process, for the benchmarks."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.ports import free_port  # noqa: E402


class Server:
    """`python -m collector.cli COMMAND --db URL --port P --retention never --workers N`, ready when
    /healthz answers (with several workers: when one does)."""

    def __init__(self, db_url: str, command: str = "collector", workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "routelens.collector.cli", command, "--db", db_url, "--port", str(self.port),
             "--retention", "never", "--workers", str(workers)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"routelens {command} did not start:\n"
                                   f"{self.log.read().decode(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
