"""Tracing never makes routing worse: routers that cannot be imported where
they run, routers with bugs, and collectors that are down, slow or failing."""

from __future__ import annotations

import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from tests.support import misbehaving_routers, serve_apps
from tests.support.event_sink_server import EventSinkServer
from tests.support.serve_traffic import send_handle, send_http
from tests.support.trace_checks import read_events, wait_for

pytestmark = pytest.mark.ray


def deploy(name, router_class, count_dir, router_kwargs, num_replicas=2):
    config = RequestRouterConfig(request_router_class=router_class, request_router_kwargs=router_kwargs)
    app = serve_apps.UniformRequestRouterApp.options(
        name=name, num_replicas=num_replicas, request_router_config=config
    ).bind(count_dir)
    return serve.run(app, name=name, route_prefix=f"/{name}")


@ray.remote(num_cpus=0)
def importable_in_a_worker(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_router_from_a_module_the_proxy_cannot_import(serve_instance, tmp_path, monkeypatch):
    module_dir = tmp_path / "elsewhere"
    module_dir.mkdir()
    (module_dir / "faraway_router.py").write_text(textwrap.dedent("""
        import random
        from ray.serve.request_router import RequestRouter
        from routelens.routers import TracingMixin

        class FarawayRouter(TracingMixin, RequestRouter):
            async def choose_replicas(self, candidate_replicas, pending_request=None):
                return [[random.choice(candidate_replicas)]]
    """))
    monkeypatch.syspath_prepend(str(module_dir))
    import faraway_router

    assert not ray.get(importable_in_a_worker.remote("faraway_router"))
    sink_dir = tmp_path / "sink"
    count_dir = tmp_path / "counts"
    count_dir.mkdir()
    deploy("faraway", faraway_router.FarawayRouter, str(count_dir),
           {"jsonl_path": str(sink_dir / "events-{pid}.jsonl")})
    try:
        send_http(f"{serve_instance}/faraway", 20, concurrency=5)
        wait_for(lambda: sum(e["type"] == "routed" for e in read_events(str(sink_dir), "faraway")) >= 20,
                 what="routed events from the proxy")
        routed = [e for e in read_events(str(sink_dir), "faraway") if e["type"] == "routed"]
        assert len(routed) == 20
        assert {e["source"]["handle_source"] for e in routed} == {"PROXY"}
        assert {e["source"]["router_class"] for e in routed} == {"faraway_router.FarawayRouter"}
    finally:
        serve.delete("faraway")
        sys.modules.pop("faraway_router", None)


# Requests for the model "boom" make FlakyChooseRouter raise.
MODELS = ["", "boom", "", "", "boom", "", "", ""]


def outcomes(handle):
    """What each request of MODELS came to: 'ok' or the exception's type."""
    results = []
    for model in MODELS:
        try:
            handle.options(multiplexed_model_id=model).remote().result(timeout_s=5)
            results.append("ok")
        except Exception as exc:  # the router's own bug, surfaced by Ray
            results.append(type(exc).__name__)
    return results


@pytest.mark.parametrize("plain, traced, expected", [
    # A failing choose_replicas loses the request (Ray 2.60): it times out.
    (misbehaving_routers.FlakyChooseRouter, misbehaving_routers.TracedFlakyChooseRouter,
     ["TimeoutError" if model == "boom" else "ok" for model in MODELS]),
    # A failing on_request_routed fails the request it was called for.
    (misbehaving_routers.RaisingHooksRouter, misbehaving_routers.TracedRaisingHooksRouter,
     ["RuntimeError"] * len(MODELS)),
])
def test_buggy_routers_behave_the_same_traced(serve_instance, tmp_path, plain, traced, expected):
    count_dir = tmp_path / "counts"
    count_dir.mkdir()
    sink = str(tmp_path / "sink" / "events-{pid}.jsonl")
    names = {label: f"{plain.__name__.lower()}-{label}" for label in ("plain", "traced")}
    handles = {}
    try:
        for label, router in (("plain", plain), ("traced", traced)):
            handles[label] = deploy(names[label], router, str(count_dir), {"jsonl_path": sink})
        # Each router's requests one after another (one its bug loses holds up none of the next),
        # the two routers' side by side: their timeouts run out together.
        with ThreadPoolExecutor(len(handles)) as pool:
            seen = dict(zip(handles, pool.map(outcomes, handles.values())))
    finally:
        serve_apps.delete_apps(names[label] for label in handles)
    assert seen["plain"] == expected
    assert seen["traced"] == expected
    # And the traced one was traced: its decisions were recorded.
    traced_name = f"{plain.__name__.lower()}-traced"
    wait_for(lambda: any(e["type"] == "decision" for e in read_events(str(tmp_path / "sink"), traced_name)),
             what="decisions of the traced router")


def driver_events(server: EventSinkServer, name: str, kind: str):
    return [e for e in server.events(app=name, handle_source="UNKNOWN").values() if e["type"] == kind]


def test_failing_collectors_never_block_routing(serve_instance, tmp_path):
    """A collector that is down, one that answers 500 and one that holds every
    POST, each behind a deployment of its own, side by side (their exporters'
    backoffs run out together): routing goes on, and once each collector
    recovers, what was spooled meanwhile arrives, once per id."""
    servers = {failure: EventSinkServer() for failure in ("down", "error", "stall")}
    servers["down"].stop()
    servers["error"].mode = "error"
    servers["stall"].mode = "stall"
    servers["stall"].stall_s = 60.0  # longer than the traffic takes, however busy the cores
    names = {failure: f"collector-{failure}" for failure in servers}
    count_dir = tmp_path / "counts"
    count_dir.mkdir()
    handles = {}
    try:
        for failure, server in servers.items():
            handles[failure] = deploy(names[failure], TracedPowerOfTwoChoicesRequestRouter, str(count_dir),
                                      {"collector_url": server.url, "spool_dir": str(tmp_path / failure / "spool")})

        def traffic(failure):
            # Through the driver's router (in this process) and the proxy's, long
            # enough for the exporter to hit the failing collector meanwhile.
            for _ in range(3):
                send_handle(handles[failure], 40, concurrency=10)
                send_http(f"{serve_instance}/{names[failure]}", 20, concurrency=5)
                time.sleep(0.5)

        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(traffic, servers))
        # Every request completed while the collector held the exporter's first POST.
        assert servers["stall"].posts_started >= 1 and servers["stall"].posts_finished == 0
        for failure in servers:
            assert sum(serve_apps.read_counts(str(count_dir), names[failure]).values()) == 180, failure
        # The collectors recover: what was spooled meanwhile arrives, once per id.
        servers["down"].start()
        for server in servers.values():
            server.mode = "ok"
        for failure, server in servers.items():
            wait_for(lambda server=server, name=names[failure]: len(driver_events(server, name, "routed")) == 120,
                     timeout_s=90, what=f"every routed event of the driver's router after recovery ({failure})")
    finally:
        serve_apps.delete_apps(names[failure] for failure in handles)
        for server in servers.values():
            server.stop()
