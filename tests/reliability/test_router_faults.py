"""The router side under faults of its own machine: the wall clock jumps, the
spool's disk fills up. Routing goes on, figures stay right, every loss is
counted. (Collector failures seen from Ray Serve: tests/test_serve_robustness.py
and bench/router_faults.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time

import pytest

from routelens.routers import completions as tracer_module
from routelens.routers import ray_contract
from routelens.routers.config import TracerConfig
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter, TracedUniformRequestRouter
from routelens.routers.exporter import Exporter
from routelens.routers.faults import FaultLog
from routelens.routers.testing import FakeResult, make_request, make_router
from tests.support.event_sink_server import EventSinkServer
from tests.support.system_deps import require
from tests.test_exporter_outage import drive

JUMP_S = 3600.0


class JumpingClock:
    """`time` as the tracer sees it, with a wall clock that can jump; the monotonic clock never does."""

    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch):
    jumping = JumpingClock()
    monkeypatch.setattr(tracer_module, "time", jumping)
    return jumping


def events_of(path):
    return [e for line in open(path) for e in json.loads(line)["events"]]


@pytest.mark.parametrize("jump", [-JUMP_S, JUMP_S])
def test_a_clock_jump_changes_no_latency_and_settles_rejections_on_time(tmp_path, clock, monkeypatch, jump):
    monkeypatch.setattr(tracer_module, "REJECTION_GRACE_S", 0.2)
    # Where the replicas' answers cannot be read, refusals are settled after the grace period: on time?
    monkeypatch.setattr(ray_contract, "REFUSALS", False)
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        accepted, refused = make_request(), make_request()
        ranks = await router.choose_replicas(router._replicas_list, accepted)
        replica_id = ranks[0][0].replica_id
        result = FakeResult.sent(router, replica_id, accepted)
        router.on_request_routed(accepted, replica_id, result)
        # A refused attempt of another request: no routed event, only a completion.
        FakeResult.sent(router, replica_id, refused).finish(None)
        clock.offset = jump  # NTP steps the clock while both are in flight
        await asyncio.sleep(0.05)
        result.finish("ok")
        started = time.monotonic()
        # The refused attempt is settled as a rejection one grace period later, whatever the wall clock did.
        while time.monotonic() - started < 5 and not rejected(router):
            await asyncio.sleep(0.05)
        return replica_id

    def rejected(router):
        return not router._routelens._unmatched_completions

    asyncio.run(main())
    assert exporter.flush(10)
    exporter.close()
    completed = [e for e in events_of(sink) if e["type"] == "completed"]
    assert sorted(c["rejected"] for c in completed) == [False, True]
    accepted = next(c for c in completed if not c["rejected"])
    assert 40 <= accepted["latency_ms"] < 1000  # the 50 ms it took, not an hour either way


def test_a_collector_or_disk_failure_is_one_line_and_a_bug_a_traceback(caplog):
    log = FaultLog()
    with caplog.at_level(logging.WARNING, logger="routelens"):
        log.record("sending to the collector at 127.0.0.1:1", ConnectionRefusedError(111, "Connection refused"))
        log.record("sending to the collector at 127.0.0.1:1", ConnectionRefusedError(111, "Connection refused"))
        log.record("encoding an event", ValueError("not JSON"))
    first, bug = caplog.records  # the second refusal waits for the minute's count
    assert first.exc_info is None and "Connection refused" in first.getMessage()
    assert bug.exc_info is not None and "encoding an event" in bug.getMessage()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB filesystem of its own (tmpfs): writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "tiny"
    mount.mkdir()

    def mount_tmpfs():
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                capture_output=True, text=True)
        if result.returncode:
            raise OSError(result.stderr.strip() or f"mount exited {result.returncode}")

    require(mount_tmpfs, OSError, "cannot mount a small tmpfs for the disk-full test",
            "mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_spool_disk_keeps_routing_and_counts_every_loss(tiny_disk):
    server = EventSinkServer()
    server.stop()  # the collector is down: batches go to the spool, which the disk cannot hold
    router_kwargs = {"collector_url": server.url, "spool_dir": str(tiny_disk)}
    exporter = Exporter(TracerConfig(flush_interval_s=0.2, **router_kwargs))

    async def scenario():
        router = make_router(TracedPowerOfTwoChoicesRequestRouter, 16, router_kwargs=router_kwargs,
                             exporter=exporter)
        await drive(router, 5)  # 5,000 requests, each through every hook: none may fail
        return router._routelens.source

    source = asyncio.run(scenario())
    server.start()
    try:
        assert exporter.flush(60), "what the disk held was not replayed"
    finally:
        exporter.close()
        server.stop()
    stored = server.events(source_id=source.id)
    dropped = source.dropped()
    assert sum(dropped.values()) > 0 and set(dropped) <= {"spool_full", "spool_error"}, dropped
    assert len(stored) > 0  # what fitted on the disk arrived
    assert len(stored) + sum(dropped.values()) == source.produced
    decisions = sum(e["type"] == "decision" for e in stored.values())
    assert decisions < 5000 <= source.produced  # the loss was real, and counted
