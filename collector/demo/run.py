"""`routelens demo`: everything on one machine, so that a newcomer sees every
view of the dashboard show something true within a minute.

In order: `routelens up` on a SQLite file (a child process, so that the
dashboard never competes with the traffic for this process's GIL); a local
Ray and Serve; the apps of `collector.demo.apps`, their traced routers
pointed at that collector; once the routers have reported every replica,
traffic (`collector.demo.traffic`) until `--duration` ends or Ctrl-C. Then,
in the order that loses nothing: the traffic stops, Serve shuts down (the
routers flush their last events), the final figures are read from the
collector, Ray stops, the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

from rich import box
from rich.console import Console
from rich.table import Table

from ..cli.errors import DemoError, ServeError
from ..cli.server import check_port_free
from ..cli.server_process import ServerNotStarted, ServerProcess

HOST = "127.0.0.1"
STATUS_EVERY_S = 2.0
LINE_EVERY_S = 10.0  # when the output is not a terminal: a plain line this often
MEMBERS_TIMEOUT_S = 30.0  # how long the traffic waits for the routers to report every replica
MEMBERS_POLL_S = 0.2


@dataclass(frozen=True)
class DemoOptions:
    duration: Optional[float]  # seconds of traffic; None: until Ctrl-C
    rate: float  # requests/s, all apps together, bursts not counted
    db: Optional[str]  # SQLite file to keep; None: a temporary one
    port: int  # the dashboard's
    serve_port: int  # Serve's HTTP proxy
    traffic: bool


def run(options: DemoOptions) -> int:
    for port, flag in ((options.port, "--port"), (options.serve_port, "--serve-port")):
        try:
            check_port_free(HOST, port)
        except ServeError as exc:
            raise DemoError(f"{exc} ({flag})") from None
    _interrupt_on_signals()
    console = Console(stderr=True, highlight=False)
    workdir = tempfile.mkdtemp(prefix="routelens-demo-")
    db = os.path.abspath(options.db) if options.db else os.path.join(workdir, "routelens.db")
    try:
        with _dashboard(db, options.port) as server:
            console.print(f"[bold]routelens up[/] on {db}")
            try:
                _run_serve(options, server, os.path.join(workdir, "spool"), console)
            except KeyboardInterrupt:
                console.print("interrupted: shutting down")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not options.db:
        console.print("the demo's database was temporary; keep one with --db FILE, "
                      "then browse it with `routelens up --db FILE`")
    return 0


@contextlib.contextmanager
def _dashboard(db: str, port: int) -> Iterator[ServerProcess]:
    """`routelens up` in a child process that dies with this one, and in a
    session of its own: Ctrl-C reaches the demo, which stops the server last,
    after the routers' final flush."""
    server = ServerProcess(db, port, command="up", host=HOST)
    try:
        server.start()
    except ServerNotStarted as exc:
        raise DemoError(f"routelens up did not start: {exc.last_line}") from None
    try:
        yield server
    finally:
        server.stop(timeout_s=15)


def _interrupt_on_signals() -> None:
    """SIGTERM (kill, a CI timeout, a service manager) and SIGINT stop the demo
    as Ctrl-C does, through the orderly shutdown; also when a shell started it
    in the background, which makes it ignore SIGINT."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _run_serve(options: DemoOptions, server: ServerProcess, spool_dir: str, console: Console) -> None:
    import ray
    from ray import serve

    from .apps import APPS

    started_at = time.time()
    # Ray's notes about a local cluster, and Serve's warnings about `backend`, which the demo overloads on
    # purpose, would bury the demo's own lines; errors still show.
    with console.status("starting Ray and Serve"):
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        serve.start(http_options={"host": HOST, "port": options.serve_port})
        router_kwargs = {"collector_url": server.url, "spool_dir": spool_dir}
        began = time.monotonic()
        # All at once: their replicas start side by side, and the controller waits for them together.
        with console.status(f"deploying {len(APPS)} apps, {sum(app.replicas for app in APPS)} replicas"):
            handles = dict(zip((app.name for app in APPS), serve.run_many([
                serve.RunTarget(app.bind(router_kwargs), name=app.name,
                                route_prefix=f"/{app.name}" if app.http else None) for app in APPS])))
        console.print(f"deployed in {time.monotonic() - began:.0f} s:")
        for app in APPS:
            console.print(f"  {app.name}: {app.replicas} replicas, {app.router.split(':')[1]}")
        with console.status("waiting for the routers to report every replica"):
            _wait_for_members(server, _start_handle_routers(handles, APPS, console))
        serve_url = f"http://{HOST}:{options.serve_port}"
        console.print(f"\n[bold]dashboard: {server.url}/[/]   (API: {server.url}/docs)")
        console.print(f"Serve: {serve_url}/{{{','.join(app.name for app in APPS if app.http)}}}")
        if options.traffic:
            tally = _drive(handles, serve_url, options, server, started_at, console)
        else:
            console.print("no traffic (--no-traffic): send your own; Ctrl-C stops the demo")
            _wait(options.duration)
            tally = None
        with console.status("shutting down Serve (the routers flush their last events)"):
            serve.shutdown()
        if tally is not None:
            console.print(_final_table(server, started_at, tally))
    finally:
        with console.status("stopping Ray"):
            serve.shutdown()  # a no-op unless interrupted before the shutdown above
            ray.shutdown()


def _start_handle_routers(handles, apps, console: Console) -> list:
    """Start the routers of the apps reached through handles only (no proxy's router reports their
    replicas) before any request, so that they report their replicas before the traffic; returns
    the apps whose routers report before the first request: the ones to wait for. Ray has no
    public call for it, but Ray 2.60 starts a handle's router in `options()` (public), as at its
    first `remote()`. A Ray that no longer does is named, and that app's replicas show from its
    first request on, rather than the demo failing at start-up on a removed private method."""
    reporting = []
    for app in apps:
        if not app.http:
            handle = handles[app.name]
            handle.options()
            if not handle.is_initialized:
                console.print(f"[yellow]{app.name}:[/] this Ray starts a handle's router only at its first request;"
                              f" {app.name}'s replicas show from then on, not at 0 before it")
                continue
        reporting.append(app)
    return reporting


def _wait_for_members(server: ServerProcess, apps) -> None:
    """Until the collector lists every replica of every app as a member (each app's routers report
    them as Serve starts them: the last ones may come after `serve.run` returned), then one
    exporter flush interval more. The traffic's first requests then reach the collector in later
    batches than the ones that named their replicas, so that every replica is seen at 0 before it
    counts a request: in the dashboard, and by a Prometheus that scrapes the collector more often
    than that (`increase` and `rate` start from a counter's first sample, and would miss what it
    held then). After MEMBERS_TIMEOUT_S the traffic starts anyway."""
    # Imported here: routelens.routers imports Ray, which the demo has started by now, and which
    # a collector host importing this module needs not have (tests/test_packaging.py).
    from routelens.routers.config import TracerConfig

    deadline = time.monotonic() + MEMBERS_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(_members(server, app.name) >= app.replicas for app in apps):
            time.sleep(TracerConfig.flush_interval_s)
            return
        time.sleep(MEMBERS_POLL_S)


def _members(server: ServerProcess, app: str) -> int:
    distribution = server.get("/v1/distribution", app=app, window="1h")
    return sum(replica["member"] for replica in distribution["replicas"]) if distribution else 0


def _wait(duration: Optional[float]) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.5)


def _drive(handles, serve_url: str, options: DemoOptions, server: ServerProcess, started_at: float,
           console: Console):
    from .traffic import Traffic

    traffic = Traffic(handles, serve_url, options.rate)

    async def drive() -> None:
        sending = asyncio.create_task(traffic.run())
        status = asyncio.create_task(_show_status(traffic, server, started_at, options.duration, console))
        try:
            await asyncio.wait_for(asyncio.shield(sending), options.duration)
        except asyncio.TimeoutError:
            pass
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            status.cancel()

    try:
        asyncio.run(drive())
    except KeyboardInterrupt:
        console.print("interrupted: stopping the traffic")
    return traffic.tally


async def _show_status(traffic, server: ServerProcess, started_at: float, duration: Optional[float],
                       console: Console) -> None:
    last_line = 0.0
    traffic_began = time.monotonic()
    with console.status("") as status:
        while True:
            total = traffic.total
            figures = await asyncio.to_thread(server.get, "/v1/summary", since=started_at)
            clock = f"{time.monotonic() - traffic_began:.0f}" + (f"/{duration:.0f}" if duration else "")
            stored = (f"stored {figures['decisions']} decisions, {figures['routed']} routed, "
                      f"{figures['rejections']} rejections" if figures else "the collector does not answer")
            text = f"{clock} s: sent {total.sent}, {total.ok} ok, {total.failed} failed; {stored}"
            if console.is_terminal:
                status.update(text)
            elif time.monotonic() - last_line >= LINE_EVERY_S:
                console.print(text)
                last_line = time.monotonic()
            await asyncio.sleep(STATUS_EVERY_S)


def _final_table(server: ServerProcess, started_at: float, tally) -> Table:
    """One row per deployment: imbalance and staleness are a deployment's own.
    A row is named by its app where the app has one deployment (the demo's do)."""
    table = Table(title="what the routers decided, as the collector stored it", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    for column in ("deployment", "sent", "routed", "Jain", "rank 0", "handoffs", "refused", "stats p95"):
        table.add_column(column, justify="left" if column == "deployment" else "right",
                         overflow="fold" if column == "deployment" else "ellipsis", no_wrap=column != "deployment")
    summary = server.get("/v1/summary", since=started_at) or {"deployments": []}
    per_app = Counter(d["app"] for d in summary["deployments"])
    for d in sorted(summary["deployments"], key=lambda d: (d["app"], d["deployment"])):
        name = d["app"] if per_app[d["app"]] == 1 else f'{d["app"]}/{d["deployment"]}'
        table.add_row(name, str(tally[d["app"]].sent if d["app"] in tally else ""), str(d["routed"]),
                      _fixed(d["imbalance"]["jain"], "{:.3f}"), _fixed(d["rank0_rate"], "{:.0%}"),
                      str(d["handoffs"]), str(d["rejections"]), _fixed(d["staleness"]["p95_s"], "{:.2f} s"))
    return table


def _fixed(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value)
