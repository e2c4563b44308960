"""Running an app under uvicorn, for `routelens collector` and `routelens up`."""

from __future__ import annotations

import gc
import ipaddress
import socket
import sys

LOOPBACK_HOSTS = {"localhost"}


class ServeError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                             "(choose another --port, or stop what uses it)") from None


def tune_gc_for_bulk_work() -> None:
    """Ingest and export allocate many short-lived containers; with Python's
    default thresholds the cyclic GC costs more than the work itself (export:
    half its time). What exists at start is frozen out of collections and
    young collections run less often."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def serve(app, host: str, port: int, token: str | None) -> None:
    import uvicorn  # here, not above: the commands that only need this module's errors and GC tuning skip it

    if token is None and not is_loopback(host):
        print(f"warning: listening on {host} without a token: anyone who can reach this port can read and "
              "write your routing data (set --token)", file=sys.stderr)
    tune_gc_for_bulk_work()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
