"""Running an app under uvicorn, for `routelens collector` and `routelens up`:
in this process (`serve`), or in N worker processes (`serve_workers`)."""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import replace
from typing import Callable

from ..settings import Settings
from .errors import ServeError
from .gc_tuning import tune_gc_for_bulk_work
from .server_process import die_with

LOOPBACK_HOSTS = {"localhost"}
WORKER_ENV = "ROUTELENS_WORKER"  # what a worker process serves (JSON, see `serve_workers`)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_FAILURE = "worker-failure"  # in the command's private directory: why a worker could not start


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, bound as uvicorn would bind it, for it
    to serve on (port 0: one the system picks, which `getsockname()` tells).
    Listening at once, a connection made as soon as the port is announced
    waits for the server rather than being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                         "(choose another --port, or stop what uses it)") from None
    return sock


def check_port_free(host: str, port: int) -> None:
    bind(host, port).close()


def load_factory(name: str) -> Callable[[Settings], object]:
    """"module:function" -> the function (an app factory taking `Settings`)."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _warn_without_token(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        print(f"warning: listening on {host} without a token: anyone who can reach this port can read and "
              "write your routing data (set --token)", file=sys.stderr)


def serve(app, sock: socket.socket, token: str | None) -> None:
    """Serve `app` on `sock` (from `bind`) until Ctrl-C or SIGTERM, as `uvicorn.run` would."""
    import uvicorn  # here, not above: the commands that only need this module's errors skip it
    from uvicorn.config import STARTUP_FAILURE

    _warn_without_token(sock.getsockname()[0], token)
    tune_gc_for_bulk_work()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve_workers(settings: Settings, factory: str, sock: socket.socket, workers: int, banner: str) -> None:
    """Serve `factory(settings)` ("module:function") from `workers` processes
    that accept on one listening socket: uvicorn's supervisor starts them,
    restarts one that dies, and stops them all on Ctrl-C or SIGTERM; a worker
    also stops when this process is gone, however it ended.

    What must happen once happens here, in the supervisor, and not in each
    worker: the schema check (which creates a new SQLite file), and the
    retention pruner. The workers' metrics go to a private directory, summed
    at each scrape and removed at the end. Raises `db.DatabaseError` for a
    database that cannot be used (before `banner` is printed), `ServeError`
    when a worker cannot start (its reason, in one line)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    runtime = tempfile.mkdtemp(prefix="routelens-")
    metrics_dir = os.path.join(runtime, "metrics")
    os.mkdir(metrics_dir)
    # Before prometheus-client is imported, here (the pruner's gauge) and in the workers.
    os.environ[MULTIPROC_ENV] = metrics_dir
    from ..api.metrics import pruners_gauge
    from ..store.db import check_schema, make_engine
    from ..store.retention import Retention

    engine = make_engine(settings.db_url)
    try:
        check_schema(engine, settings.db_url)
        retention = Retention(engine, settings.retention_s, settings.minute_rollup_retention_s,
                              settings.retention_interval_s, running=pruners_gauge(None))
        os.environ[WORKER_ENV] = json.dumps({
            "settings": replace(settings, retention_s=None, minute_rollup_retention_s=None,
                                metrics_dir=metrics_dir).to_json(),
            "factory": factory, "runtime": runtime, "supervisor": os.getpid()})
        # uvicorn says "Child process [pid] failed to start"; the worker's own reason replaces it (below).
        logging.getLogger("uvicorn.error").addFilter(lambda record: "failed to start" not in record.getMessage())
        _warn_without_token(sock.getsockname()[0], settings.token)
        print(banner, file=sys.stderr)
        retention.start()
        # A worker starting on a busy machine can take longer than uvicorn's
        # 5 s to answer its first health check, and would be killed as hung
        # (and again, and again). Longer is not better either: a worker that
        # exits just after a check was sent holds the supervisor that long.
        config = uvicorn.Config("routelens.collector.cli.server:worker_app", factory=True, workers=workers,
                                log_level="warning", access_log=False, timeout_worker_healthcheck=20)
        try:
            Multiprocess(config, sockets=[sock]).run()  # what `uvicorn.run` does with workers, on our socket
        except KeyboardInterrupt:
            pass
        finally:
            retention.stop()
        failure = os.path.join(runtime, _FAILURE)
        if os.path.exists(failure):
            with open(failure) as reason:
                raise ServeError(reason.read())
    finally:
        engine.dispose()
        os.environ.pop(WORKER_ENV, None)
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(runtime, ignore_errors=True)


def worker_app():
    """The app of one worker process of `serve_workers` (uvicorn calls this
    factory in each worker). A worker that cannot build its app leaves its
    reason for the supervisor and exits with uvicorn's startup-failure code,
    which stops the supervisor instead of restarting the worker forever."""
    from uvicorn.config import STARTUP_FAILURE

    spec = json.loads(os.environ[WORKER_ENV])
    die_with(spec["supervisor"])
    try:
        app = load_factory(spec["factory"])(Settings.from_json(spec["settings"]))
    except Exception as exc:
        from ..store.db import DatabaseError

        reason = str(exc) if isinstance(exc, (DatabaseError, ServeError)) else \
            f"a worker failed to start: {type(exc).__name__}: {exc}".splitlines()[0]
        try:  # the first worker to fail tells why
            with open(os.path.join(spec["runtime"], _FAILURE), "x") as out:
                out.write(reason)
        except FileExistsError:
            pass
        # At once, not through the interpreter's teardown: the supervisor's
        # health check may ping meanwhile, and a ping this process neither
        # answers nor refuses (by being gone) holds the supervisor for the
        # check's whole timeout.
        os._exit(STARTUP_FAILURE)
    tune_gc_for_bulk_work()
    return app
