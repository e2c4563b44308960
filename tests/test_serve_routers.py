"""The traced seed routers and Ray's pow-2 router on real Ray Serve.

Requests go both through Serve's HTTP proxy and through a DeploymentHandle,
so the proxy's and the driver's routers are both traced. Every test checks
the invariants of `trace_checks.check_trace` against the counts the replicas
kept themselves.
"""

from __future__ import annotations

import os

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter, TracedThroughputAwareRequestRouter
from tests.support import serve_apps
from tests.support.serve_traffic import send_handle, send_http
from tests.support.trace_checks import check_trace, read_events, routed_count, wait_for

pytestmark = pytest.mark.ray


def deploy(app_cls, name: str, router_class, sink_dir: str, count_dir: str, **options):
    config = RequestRouterConfig(
        request_router_class=router_class,
        request_router_kwargs={"jsonl_path": os.path.join(sink_dir, "events-{pid}.jsonl")},
        **options.pop("router_config", {}),
    )
    app = app_cls.options(request_router_config=config, **options).bind(count_dir)
    return serve.run(app, name=name, route_prefix=f"/{name}")


def traced_run(serve_instance, tmp_path, app_cls, name, router_class, n_http, n_handle, concurrency, **options):
    sink_dir, count_dir = str(tmp_path / "sink"), str(tmp_path / "counts")
    os.makedirs(count_dir)
    handle = deploy(app_cls, name, router_class, sink_dir, count_dir, **options)
    try:
        send_http(f"{serve_instance}/{name}", n_http, concurrency)
        send_handle(handle, n_handle, concurrency)
        n = n_http + n_handle
        deployment = app_cls.name
        wait_for(lambda: routed_count(sink_dir, deployment) >= n, what=f"{n} routed events")
        wait_for(lambda: sum(serve_apps.read_counts(count_dir, name).values()) >= n, what="replica counts")
        # Let trailing completions arrive (they follow routed by a flush interval).
        wait_for(
            lambda: sum(e["type"] == "completed" and not e["rejected"] for e in read_events(sink_dir, deployment)) >= n,
            what="completions",
        )
        events = read_events(sink_dir, deployment)
        return events, check_trace(events, n, serve_apps.read_counts(count_dir, name))
    finally:
        serve.delete(name)


def test_uniform_router_ten_replicas(serve_instance, tmp_path):
    # The seed deploys with an import-path string; so does this test.
    events, figures = traced_run(
        serve_instance, tmp_path, serve_apps.UniformRequestRouterApp, "uniform",
        "routelens.routers.examples:TracedUniformRequestRouter", n_http=150, n_handle=150, concurrency=10,
        num_replicas=10,
    )
    routed = [e for e in events if e["type"] == "routed"]
    # Uniform ranks a single replica: every request is placed from rank 0.
    assert {r["rank"] for r in routed} == {0}
    assert len({r["replica_id"] for r in routed}) == 10
    handle_sources = {e["source"]["handle_source"] for e in routed}
    assert handle_sources == {"PROXY", "UNKNOWN"}  # the proxy's router and the driver's
    decisions = [e for e in events if e["type"] == "decision"]
    assert all(d["n_candidates"] == 10 and len(d["ranks"]) == 1 for d in decisions)


def test_throughput_aware_router_stamped_stats(serve_instance, tmp_path):
    period = 1.0
    events, figures = traced_run(
        serve_instance, tmp_path, serve_apps.ThroughputAwareRequestRouterApp, "throughput",
        TracedThroughputAwareRequestRouter, n_http=100, n_handle=100, concurrency=4,
        num_replicas=3,
        router_config={"request_routing_stats_period_s": period, "request_routing_stats_timeout_s": 1},
    )
    decisions = [e for e in events if e["type"] == "decision"]
    ages = [
        inputs["stats_age_s"]
        for d in decisions
        for inputs in d["replicas"].values()
        if inputs["stats_age_source"] == "stamped"
    ]
    # Stats arrive stamped once the first collection reached the router; before
    # that a replica's stats are {}, which have no age.
    assert len(ages) >= 0.8 * len(decisions), (len(ages), len(decisions))
    assert max(ages) <= period + 1.0, sorted(ages)[-5:]
    assert min(ages) >= 0
    stats_events = [e for e in events if e["type"] == "stats" and e["collected_at"] is not None]
    assert stats_events and all("throughput" in e["stats"] for e in stats_events)


def test_pow2_router_under_rejections(serve_instance, tmp_path):
    events, figures = traced_run(
        serve_instance, tmp_path, serve_apps.SlowApp, "pow2",
        TracedPowerOfTwoChoicesRequestRouter, n_http=120, n_handle=120, concurrency=40,
        num_replicas=3,
    )
    # 40 concurrent requests on 3 replicas x 2 slots: replicas refuse some, and
    # FIFO hands replicas found for one request to another.
    assert figures["rejections"] > 0
    assert figures["handoffs"] > 0
    rejected = [e for e in events if e["type"] == "completed" and e["rejected"]]
    assert all(e["latency_ms"] is None and e["routed_id"] is None for e in rejected)
    retried = [e for e in events if e["type"] == "routed" and e["attempts"] > 1]
    assert retried, "some request must have needed more than one decision"
