"""A load generator process: real traced routers and a real exporter sending
to a collector, at a steady rate, as a Ray proxy would (but no Ray cluster).

    python -m tests.support.exporter_load --collector URL --spool DIR \\
        --rate 5000 --seconds 20 --start-at EPOCH --out result.json

Each request goes through the full hook sequence of
`routers.examples.TracedPowerOfTwoChoicesRequestRouter` on 16 fake replicas
(`routers.testing`): three events (decision, routed, completed). Requests
are paced to `--rate` events per second over `--routers` routers (sources)
in this process. The process's own exporter batches, gzips and POSTs them,
spooling while the collector is away, like in production.

After the load it flushes (waits until the spool is replayed) and writes,
per source, the counters the exporter keeps: what the test compares with
what the collector stored. Starting at `--start-at` (wall clock) lets
several such processes, and the test's fault schedule, share one timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from routelens.routers.config import TracerConfig
from routelens.routers.delivery import CollectorClient
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from routelens.routers.exporter import Exporter
from routelens.routers.faults import faults
from routelens.routers.testing import make_router, route_one

EVENTS_PER_REQUEST = 3  # decision, routed, completed
TICK_S = 0.01


async def drive(routers, requests_per_s: float, seconds: float, peaks: dict, exporter: Exporter) -> int:
    """Route `requests_per_s` requests a second, round robin over `routers`,
    for `seconds`; returns how many were routed."""
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * requests_per_s)
        while n < due:
            await route_one(routers[n % len(routers)])
            n += 1
        if len(exporter._queue) > peaks["queue"]:
            peaks["queue"], peaks["queue_at_s"] = len(exporter._queue), round(time.monotonic() - start, 1)
        for destination in exporter._destinations.values():
            peaks["spool_bytes"] = max(peaks["spool_bytes"], destination._spool.bytes)
        await asyncio.sleep(TICK_S)
    await asyncio.sleep(0.2)  # let the last completions hop back to the loop
    return n


def watch_posts(exporter: Exporter, peaks: dict) -> None:
    """Record the longest POST (the exporter thread waits for it while the
    queue fills) and count the POSTs that failed: answered 5xx or not at all.
    Those counts, not the spool's sampled size, show that a fault reached the
    exporters: on a starved machine the spool can fill and drain between two
    samples of the routing loop."""
    original = CollectorClient._request

    def timed(client, payload):
        started = time.monotonic()
        answered = None
        try:
            answered = original(client, payload)
            return answered
        finally:
            peaks["post_s"] = max(peaks["post_s"], round(time.monotonic() - started, 2))
            if answered is None or answered[0] >= 500:
                peaks["failed_posts"] += 1

    CollectorClient._request = timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--collector", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second in this process")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start the load at")
    parser.add_argument("--spool-max-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--queue-max-events", type=int, default=20_000)
    parser.add_argument("--flush-timeout", type=float, default=180.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    router_kwargs = {"collector_url": args.collector, "spool_dir": args.spool}
    # Production defaults otherwise (batches of 1,000, 1 s interval, 5 s HTTP
    # timeout): the point is how those behave.
    exporter = Exporter(TracerConfig(spool_max_bytes=args.spool_max_bytes, queue_max_events=args.queue_max_events,
                                     **router_kwargs))
    peaks = {"queue": 0, "queue_at_s": None, "spool_bytes": 0, "post_s": 0.0, "failed_posts": 0}
    watch_posts(exporter, peaks)

    async def scenario():
        routers = [make_router(TracedPowerOfTwoChoicesRequestRouter, 16, router_kwargs=router_kwargs,
                               exporter=exporter, deployment="Checkout", app="shop")
                   for _ in range(args.routers)]
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        started = time.monotonic()
        n = await drive(routers, args.rate / EVENTS_PER_REQUEST, args.seconds, peaks, exporter)
        return routers, n, time.monotonic() - started

    routers, requests, elapsed = asyncio.run(scenario())
    flush_started = time.monotonic()
    flushed = exporter.flush(timeout_s=args.flush_timeout)
    flush_s = time.monotonic() - flush_started
    exporter.close()
    sources = {}
    for router in routers:
        source = router._routelens.source
        produced, dropped = source.counters()
        sources[source.id] = {"produced": produced, "dropped": dropped, "last_seq": source.batch_seq}
    result = {"pid": os.getpid(), "requests": requests, "seconds": elapsed, "flushed": flushed,
              "flush_s": flush_s, "sources": sources, "peaks": peaks, "faults": faults.total}
    with open(args.out + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
