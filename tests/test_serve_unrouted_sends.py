"""Sends that skip Ray's rejection protocol, on real Ray Serve: Ray calls no
on_request_routed for them, and their completions are not rejections.

- DeploymentHandle.choose_replica() + dispatch(): the router routes, the
  replica accepts a reservation, dispatch() sends there. Each request is
  routed (attributed to the decision that supplied the replica) and
  completed; refused reservations are retried without a completion, and an
  unused one ends when Ray releases it.
- DeploymentHandle.broadcast(): one send per replica, no routing. Each is
  recorded as completed, neither rejected nor routed.

One deployment serves the three phases, each checked on the events it adds.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from tests.support import serve_apps
from tests.support.trace_checks import check_trace, read_events, wait_for

pytestmark = pytest.mark.ray

APP = "unrouted"


def test_dispatched_unused_and_broadcast_sends(serve_instance, tmp_path):
    sink_dir, count_dir = str(tmp_path / "sink"), tmp_path / "counts"
    count_dir.mkdir()
    config = RequestRouterConfig(
        request_router_class=TracedPowerOfTwoChoicesRequestRouter,
        request_router_kwargs={"jsonl_path": os.path.join(sink_dir, "events-{pid}.jsonl"), "flush_interval_s": 0.2},
    )
    handle = serve.run(serve_apps.SlowApp.options(request_router_config=config, num_replicas=2).bind(str(count_dir)),
                       name=APP, route_prefix=f"/{APP}")
    seen = set()

    def new_events():
        return [e for e in read_events(sink_dir, "SlowApp") if e["id"] not in seen]

    def wait_for_completions(n, what):
        wait_for(lambda: sum(e["type"] == "completed" for e in new_events()) >= n, what=what)
        events = new_events()
        seen.update(e["id"] for e in events)
        return events

    try:
        # Dispatched: twice as many at once as the two replicas' 4 slots, so reservations may be refused.
        n, concurrency = 40, 8
        asyncio.run(dispatch_all(n, concurrency))
        events = wait_for_completions(n, f"{n} completions")
        figures = check_trace(events, n, serve_apps.read_counts(str(count_dir), APP))
        assert figures["rejections"] == 0  # a refused reservation sends nothing
        # Each replica's answer to a reservation counts the slot it reserved. Routed at the
        # reservation, before dispatch() sends it, a request has no send to routed time.
        assert all(e["reported_queue_len"] >= 1 and e["send_to_routed_ms"] is None
                   for e in events if e["type"] == "routed"), events

        # A reservation left unused: routed when the replica accepted it, and ended
        # (no outcome, no latency) when Ray releases it, so it is not in flight forever.
        asyncio.run(reserve_without_dispatch())
        events = wait_for_completions(1, "the unused reservation's end")
        routed = [e for e in events if e["type"] == "routed"]
        completed = [e for e in events if e["type"] == "completed"]
        assert len(routed) == 1 and len(completed) == 1, events
        assert completed[0]["routed_id"] == routed[0]["id"] and routed[0]["reported_queue_len"] >= 1
        assert completed[0]["ok"] is None and completed[0]["latency_ms"] is None and completed[0]["rejected"] is False

        # Broadcast: every replica, no routing.
        calls = 3
        names = [handle.broadcast("replica_name").results() for _ in range(calls)]
        replicas = set(names[0])
        assert len(replicas) == 2 and all(set(n) == replicas for n in names)
        events = wait_for_completions(2 * calls, "the broadcasts' completions")
        completed = [e for e in events if e["type"] == "completed"]
        assert len(completed) == 2 * calls
        assert all(c["rejected"] is False and c["routed_id"] is None and c["ok"] is True and c["latency_ms"] >= 0
                   for c in completed), completed
        assert {c["replica_id"] for c in completed} == replicas
        assert len({c["internal_request_id"] for c in completed}) == 2 * calls  # one id per replica per call
        assert not [e for e in events if e["type"] in ("routed", "decision")]
    finally:
        serve.delete(APP)


async def dispatch_all(n, concurrency):
    handle = serve.get_deployment_handle("SlowApp", APP)

    async def one():
        async with handle.choose_replica() as selection:
            return await handle.dispatch(selection)

    for _ in range(0, n, concurrency):
        await asyncio.gather(*(one() for _ in range(concurrency)))


async def reserve_without_dispatch():
    handle = serve.get_deployment_handle("SlowApp", APP)
    async with handle.choose_replica():
        pass
