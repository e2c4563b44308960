"""The collector killed (SIGKILL) and restarted while traced Ray Serve traffic
runs as fast as these cores allow: every event a router produced is stored
exactly once, or reported dropped, and nothing is dropped while the spool has
room.

Routers in two kinds of process report: this one (the driver, which sends
through a handle) and Serve's proxy (HTTP). Each counts what it produced and
dropped, and sends the counters with every batch; the database says what was
stored. The long version (5 minutes, 3 kills) runs with --run-long; its
figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.collector.store.models import RAW_TABLES
from tests.support.collector_process import CollectorProcess

pytestmark = pytest.mark.ray

DOWN_S = 3.0  # how long the collector stays dead each time
CONCURRENCY = 64  # requests in flight through the handle: enough to keep 2 cores busy


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, *args) -> int:
        return 1


def drive_handle(handle, stop: threading.Event, sent: Counter) -> None:
    async def run():
        async def worker():
            while not stop.is_set():
                await handle.remote()
                sent["handle"] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    asyncio.run(run())


def drive_http(url: str, stop: threading.Event, sent: Counter) -> None:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    while not stop.is_set():
        connection.request("GET", parsed.path)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        sent["http"] += 1


def accounting(db_path: str) -> dict:
    """Per source: (produced, dropped, stored) as the database has them."""
    with sqlite3.connect(db_path) as db:
        stored = Counter()
        for table in RAW_TABLES:
            for source_pk, n in db.execute(f"SELECT source_pk, count(*) FROM {table.name} GROUP BY source_pk"):
                stored[source_pk] += n
        return {source_id: (produced, json.loads(dropped), stored[pk])
                for pk, source_id, produced, dropped in db.execute(
                    "SELECT pk, source_id, produced, dropped FROM sources")}


def settled(figures: dict) -> bool:
    return bool(figures) and all(produced is not None and produced == sum(dropped.values()) + stored
                                 for produced, dropped, stored in figures.values())


@pytest.mark.parametrize("seconds, kills", [
    pytest.param(20, 1, id="20s-1-kill"),  # traffic before the kill, through the 3 s outage, after the restart
    pytest.param(300, 3, id="5min-3-kills", marks=[pytest.mark.slow, pytest.mark.reliability_long]),
])
def test_a_killed_collector_loses_no_event_of_traced_serve_traffic(serve_instance, tmp_path, seconds, kills):
    db_path = str(tmp_path / "collector.db")
    collector = CollectorProcess(f"sqlite:///{db_path}").start()
    name = f"kills-{seconds}"
    config = RequestRouterConfig(
        request_router_class="routelens.routers.examples:TracedPowerOfTwoChoicesRequestRouter",
        request_router_kwargs={"collector_url": collector.url, "spool_dir": str(tmp_path / "spool")})
    handle = serve.run(Echo.options(request_router_config=config).bind(), name=name, route_prefix=f"/{name}")
    stop, sent = threading.Event(), Counter()
    drivers = [threading.Thread(target=drive_handle, args=(handle, stop, sent), daemon=True),
               threading.Thread(target=drive_http, args=(f"{serve_instance}/{name}", stop, sent), daemon=True)]
    try:
        started = time.monotonic()
        for driver in drivers:
            driver.start()
        for kill in range(kills):
            # Kills spread over the run, the last one well before its end.
            time.sleep(max(0.0, started + seconds * (kill + 1) / (kills + 1) - time.monotonic()))
            collector.kill()
            time.sleep(DOWN_S)
            collector.start()
        time.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        for driver in drivers:
            driver.join(timeout=60)
        elapsed = time.monotonic() - started
        # The spools replay with backoff; the last batches carry the final counters.
        deadline = time.monotonic() + 180
        while not settled(figures := accounting(db_path)) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        stop.set()
        serve.delete(name)
        collector.stop()
    assert settled(figures), figures
    assert all(dropped == {} for _, dropped, _ in figures.values()), figures  # the spool had room throughout
    assert len(figures) >= 2  # the driver's router and the proxy's
    with sqlite3.connect(db_path) as db:
        decisions = db.execute("SELECT count(*) FROM decisions").fetchone()[0]
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    assert integrity == "ok"
    print(f"\n{kills} kill(s) in {elapsed:.0f} s: {sent['handle']} requests through the handle, {sent['http']} "
          f"through HTTP, {decisions} decisions ({decisions / elapsed:.0f}/s), "
          f"{sum(stored for _, _, stored in figures.values())} events stored, none lost or twice")
