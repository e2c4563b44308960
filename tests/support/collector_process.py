"""The real collector (`routelens collector`) in a child process, for tests
that kill it (SIGKILL) and start it again on the same port and database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional, Sequence

from tests.support.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


class CollectorProcess:
    """`command`: "collector", or "up" (the dashboard as well); `args`: more
    options (say `--workers 2`; a `--retention` given there wins)."""

    def __init__(self, db_url: str, port: Optional[int] = None, command: str = "collector",
                 args: Sequence[str] = ()):
        self.db_url = db_url
        self.command = command
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.log = tempfile.TemporaryFile()

    def start(self, timeout_s: float = 60) -> "CollectorProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "routelens.collector.cli", self.command, "--db", self.db_url, "--port", str(self.port),
             "--retention", "never", *self.args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while self.get("/healthz") is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"the collector did not start:\n{self.log.read().decode(errors='replace')}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, a transaction in flight is cut off."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str):
        """The answer's JSON, or None when the collector does not answer."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None
