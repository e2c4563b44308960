"""A routelens server (`routelens collector` or `routelens up`) in a child
process, for `routelens demo`, the tests and the benches: `ServerProcess`.

The child dies with its parent: it gets SIGTERM (uvicorn's graceful stop)
when the process that started it ends, however it ended, even SIGKILLed
(`die_with`, which `serve_workers`' worker processes use for their
supervisor too). On Linux that is the parent-death signal, sent when the
*thread* that started the child ends: start it from a thread that outlives
it (the main thread, say). Only the standard library is imported here.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

# Set in the child's environment by `ServerProcess.start`: the pid to die with (`die_with_parent_if_asked`).
PARENT_ENV = "ROUTELENS_PARENT_PID"


class ServerNotStarted(RuntimeError):
    """The server exited, or did not answer in time; `log` holds its output."""

    def __init__(self, command: str, log: str):
        super().__init__(f"routelens {command} did not start:\n{log}")
        self.log = log

    @property
    def last_line(self) -> str:
        lines = [line.strip() for line in self.log.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"


class ServerProcess:
    """`routelens COMMAND --db DB --host HOST --port PORT --retention RETENTION ARGS`
    in a child process of its own session (Ctrl-C at a terminal reaches the
    parent only, which stops the server when it is done with it).

    `command`: "collector", or "up" (the dashboard as well); `args`: more
    options (say `--workers 2`; a `--retention` given there wins over
    `retention`, "never" by default: the demo, tests and benches keep every
    event). `start` returns once /healthz answers (with several workers:
    once one does); `start` again after `kill` or `stop` restarts it on the
    same port and database. The child's output, stdout and stderr together,
    goes to `log` (a temporary file, appended to across restarts)."""

    def __init__(self, db: str, port: int, command: str = "collector", args: Sequence[str] = (),
                 host: str = "127.0.0.1", retention: str = "never"):
        self.db = db
        self.port = port
        self.command = command
        self.args = list(args)
        self.host = host
        self.retention = retention
        self.url = f"http://{host}:{port}"
        self.process: Optional[subprocess.Popen] = None
        self.log = tempfile.TemporaryFile()
        # Every write of the child at the end, wherever this process has read the log to.
        fcntl.fcntl(self.log.fileno(), fcntl.F_SETFL, fcntl.fcntl(self.log.fileno(), fcntl.F_GETFL) | os.O_APPEND)

    def start(self, timeout_s: float = 60) -> "ServerProcess":
        """Start the server and wait until it answers. Raises `ServerNotStarted`
        when it exits first, or does not answer within `timeout_s` (it is
        killed then)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "routelens.collector.cli", self.command, "--db", self.db, "--host", self.host,
             "--port", str(self.port), "--retention", self.retention, *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, PARENT_ENV: str(os.getpid())})
        deadline = time.monotonic() + timeout_s
        while self.get("/healthz") is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise ServerNotStarted(self.command, self.log_text())
            time.sleep(0.1)
        return self

    def get(self, path: str, **params: Any) -> Optional[Any]:
        """The answer's JSON (`params`: the query string), or None when the server does not answer."""
        url = self.url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, a transaction in flight is cut off."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM, uvicorn's graceful stop (SIGKILL after `timeout_s`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def die_with_parent_if_asked() -> None:
    """In the server a `ServerProcess` started: die with that process. The
    request is not passed on to the server's own children."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None:
        die_with(int(parent))


def die_with(parent: int) -> None:
    """SIGTERM to this process when `parent` (its parent process) ends, even
    SIGKILLed: Linux's parent-death signal, else a watcher thread."""
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="routelens-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # gone before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)
