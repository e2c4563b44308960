"""Sends that skip Ray's rejection protocol, on real Ray Serve: Ray calls no
on_request_routed for them, and their completions are not rejections.

- DeploymentHandle.choose_replica() + dispatch(): the router routes, the
  replica accepts a reservation, dispatch() sends there. Each request is
  routed (attributed to the decision that supplied the replica) and
  completed; refused reservations are retried without a completion, and an
  unused one ends when Ray releases it.
- DeploymentHandle.broadcast(): one send per replica, no routing. Each is
  recorded as completed, neither rejected nor routed.
"""

from __future__ import annotations

import asyncio

import pytest
from ray import serve

from routers.examples import TracedPowerOfTwoChoicesRequestRouter
from tests import serve_apps
from tests.test_serve_routers import deploy
from tests.trace_checks import check_trace, read_events, wait_for

pytestmark = pytest.mark.ray


def test_choose_replica_and_dispatch_are_routed_and_completed(serve_instance, tmp_path):
    sink_dir, count_dir = str(tmp_path / "sink"), tmp_path / "counts"
    count_dir.mkdir()
    deploy(serve_apps.SlowApp, "dispatch", TracedPowerOfTwoChoicesRequestRouter, sink_dir, str(count_dir),
           num_replicas=2)
    n, concurrency = 40, 8  # twice the 4 slots of the two replicas: reservations may be refused

    async def send_all():
        handle = serve.get_deployment_handle("SlowApp", "dispatch")

        async def one():
            async with handle.choose_replica() as selection:
                return await handle.dispatch(selection)

        for _ in range(0, n, concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))

    try:
        asyncio.run(send_all())
        wait_for(lambda: sum(e["type"] == "completed" for e in read_events(sink_dir, "SlowApp")) >= n,
                 what=f"{n} completions")
        events = read_events(sink_dir, "SlowApp")
        figures = check_trace(events, n, serve_apps.read_counts(str(count_dir), "dispatch"))
        assert figures["rejections"] == 0  # a refused reservation sends nothing

        # A reservation left unused: routed when the replica accepted it, and
        # ended (no outcome, no latency) when Ray releases it, so it is not in
        # flight forever.
        asyncio.run(reserve_without_dispatch())
        seen = {e["id"] for e in events}

        def new_events():
            return [e for e in read_events(sink_dir, "SlowApp") if e["id"] not in seen]

        wait_for(lambda: any(e["type"] == "completed" for e in new_events()), what="the unused reservation's end")
        new = new_events()
        routed = [e for e in new if e["type"] == "routed"]
        completed = [e for e in new if e["type"] == "completed"]
        assert len(routed) == 1 and len(completed) == 1, new
        assert completed[0]["routed_id"] == routed[0]["id"]
        assert completed[0]["ok"] is None and completed[0]["latency_ms"] is None and completed[0]["rejected"] is False
    finally:
        serve.delete("dispatch")


async def reserve_without_dispatch():
    handle = serve.get_deployment_handle("SlowApp", "dispatch")
    async with handle.choose_replica():
        pass


def test_broadcast_sends_are_completed_not_rejected(serve_instance, tmp_path):
    sink_dir, count_dir = str(tmp_path / "sink"), tmp_path / "counts"
    count_dir.mkdir()
    handle = deploy(serve_apps.SlowApp, "broadcast", TracedPowerOfTwoChoicesRequestRouter, sink_dir,
                    str(count_dir), num_replicas=3)
    calls = 3
    try:
        names = [handle.broadcast("replica_name").results() for _ in range(calls)]
        replicas = set(names[0])
        assert len(replicas) == 3 and all(set(n) == replicas for n in names)
        wait_for(lambda: sum(e["type"] == "completed" for e in read_events(sink_dir, "SlowApp")) >= 3 * calls,
                 what="the broadcast's completions")
        events = read_events(sink_dir, "SlowApp")
        completed = [e for e in events if e["type"] == "completed"]
        assert len(completed) == 3 * calls
        assert all(c["rejected"] is False and c["routed_id"] is None and c["ok"] is True and c["latency_ms"] >= 0
                   for c in completed), completed
        assert {c["replica_id"] for c in completed} == replicas
        assert len({c["internal_request_id"] for c in completed}) == 3 * calls  # one id per replica per call
        assert not [e for e in events if e["type"] in ("routed", "decision")]
    finally:
        serve.delete("broadcast")
