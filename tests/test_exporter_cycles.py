"""Exporter.wake names the cycle that exports what is queued; wait_for_cycle
waits for it (what flush and the benchmark build on)."""

from __future__ import annotations

import asyncio

from routelens.routers.config import TracerConfig
from routelens.routers.examples import TracedUniformRequestRouter
from routelens.routers.exporter import Exporter
from routelens.routers.testing import make_router, route_one
from tests.support.event_sink_server import EventSinkServer
from tests.support.trace_checks import wait_for


def test_a_wake_during_a_cycle_names_the_next_cycle(tmp_path):
    """Events queued while the thread is busy delivering (here: a collector
    that takes a second per POST) are not in the batch it is sending: the
    cycle wake() names must be the one after, and waiting for it must find
    them delivered."""
    server = EventSinkServer()
    server.mode, server.stall_s = "stall", 1.0
    config = TracerConfig(collector_url=server.url, spool_dir=str(tmp_path), flush_interval_s=3600,
                          batch_max_events=10**9)
    exporter = Exporter(config)

    async def main():
        router = make_router(TracedUniformRequestRouter, 4, exporter=exporter,
                             router_kwargs={"collector_url": server.url, "spool_dir": str(tmp_path)})
        try:
            await route_one(router)
            first = exporter.wake()
            assert first == 1  # the thread was idle: its next cycle
            await asyncio.to_thread(wait_for, lambda: server.posts_started >= 1, 10, "the first POST")
            await route_one(router)
            second = exporter.wake()
            assert second == 2  # cycle 1 is under way, past the queue
            assert not exporter.wait_for_cycle(second, 0.05)  # each POST takes a second
            assert await asyncio.to_thread(exporter.wait_for_cycle, first, 10)
            assert await asyncio.to_thread(exporter.wait_for_cycle, second, 10)
            types = sorted(event["type"] for event in server.events().values())
            assert types.count("decision") == 2 and types.count("routed") == 2 and types.count("completed") == 2
        finally:
            exporter.close()
            server.stop()

    asyncio.run(main())
