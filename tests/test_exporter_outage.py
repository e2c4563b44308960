"""The exporter through a collector outage: a real HTTP server goes away and
comes back while a traced router (real class, fake replicas, no Ray I/O)
makes 1,000 decisions/s. Memory stays within the configured bounds, and every
event is delivered after recovery or counted as dropped."""

from __future__ import annotations

import asyncio
import time

import pytest

from routelens.routers.config import TracerConfig
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from routelens.routers.exporter import Exporter
from routelens.routers.testing import make_router, route_one
from tests.support.event_sink_server import EventSinkServer

RATE = 1000  # decisions per second


async def drive(router, seconds: float, on_tick=None) -> None:
    """Route RATE requests a second through the full hook sequence."""
    tick = 0.01
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        for _ in range(int(RATE * tick)):
            await route_one(router)
            n += 1
        if on_tick:
            on_tick()
        # Pace to RATE: sleep until this batch's slot has passed.
        await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
    await asyncio.sleep(0.1)  # let the last completions hop back to the loop


def run_outage(tmp_path, outage_s: float, spool_max_bytes: int):
    server = EventSinkServer()
    router_kwargs = {"collector_url": server.url, "spool_dir": str(tmp_path / "spool")}
    exporter = Exporter(TracerConfig(flush_interval_s=0.5, queue_max_events=20_000,
                                     spool_max_bytes=spool_max_bytes, **router_kwargs))
    peaks = {"queue": 0, "spool": 0}

    def sample():
        peaks["queue"] = max(peaks["queue"], len(exporter._queue))
        for destination in exporter._destinations.values():
            peaks["spool"] = max(peaks["spool"], destination._spool.bytes)

    async def scenario():
        router = make_router(TracedPowerOfTwoChoicesRequestRouter, 16,
                             router_kwargs=router_kwargs, exporter=exporter)
        await drive(router, 3, sample)
        server.stop()
        await drive(router, outage_s, sample)
        server.start()
        await drive(router, 3, sample)
        return router._routelens.source

    source = asyncio.run(scenario())
    delivered = exporter.flush(timeout_s=180)
    exporter.close()
    server.stop()
    return server, source, peaks, delivered


# 20 s of outage is past the exporter's longest retry backoff (10 s, jittered):
# the spool is replayed by a retry that backed off all the way. The
# minute-long outage runs with the long scenarios (--run-long).
@pytest.mark.slow
@pytest.mark.parametrize("outage_s", [20, pytest.param(60, marks=pytest.mark.reliability_long)])
def test_an_outage_loses_nothing(tmp_path, outage_s):
    spool_max = 256 * 1024 * 1024
    server, source, peaks, delivered = run_outage(tmp_path, outage_s, spool_max)
    assert delivered, "the spool was not replayed after the collector came back"
    stored = server.events(source_id=source.id)
    assert source.dropped() == {}
    assert len(stored) == source.produced
    decisions = sum(e["type"] == "decision" for e in stored.values())
    assert decisions >= 0.9 * RATE * (outage_s + 6)  # the rate was held throughout the outage
    # Memory stayed within the configured bounds: the queue never filled and
    # the spool took the outage within its size limit.
    assert peaks["queue"] < 20_000
    assert 0 < peaks["spool"] <= spool_max
    assert not list((tmp_path / "spool").rglob("*.jsonl"))  # replayed and deleted


def test_small_spool_counts_what_it_cannot_hold(tmp_path):
    spool_max = 256 * 1024
    server, source, peaks, delivered = run_outage(tmp_path, 5, spool_max)
    assert delivered
    stored = server.events(source_id=source.id)
    dropped = source.dropped()
    assert dropped.get("spool_full", 0) > 0
    assert set(dropped) == {"spool_full"}
    assert len(stored) + sum(dropped.values()) == source.produced
    assert peaks["spool"] <= spool_max
    # The collector sees the same counters: the last batch carries them.
    last = max((b for b in server.batches if b["source"]["source_id"] == source.id), key=lambda b: b["seq"])
    assert last["dropped"] == dropped and last["produced"] == source.produced
