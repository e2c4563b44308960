"""`routelens demo`, first version: the seed's two apps and Ray's default
router, traced, on a local Ray Serve; traffic through HTTP and a handle; then
a summary of what the tracer recorded (from its JSON Lines sink).

The full demo (collector, dashboard, skewed and stale traffic) is issue #6.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections import defaultdict
from typing import Any, Dict

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.context import _get_internal_replica_context

from routers import stamp_routing_stats


@serve.deployment(num_replicas=10, ray_actor_options={"num_cpus": 0})
class UniformRequestRouterApp:
    def __init__(self):
        self.replica_id = _get_internal_replica_context().replica_id

    async def __call__(self, *args: Any) -> str:
        return self.replica_id.unique_id


def _time_ms() -> int:
    return int(time.time() * 1000)


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class ThroughputAwareRequestRouterApp:
    """The seed's app, its routing stats stamped so staleness is exact."""

    def __init__(self):
        self.throughput_buckets: Dict[int, int] = defaultdict(int)
        self.last_throughput_buckets = _time_ms()
        self.replica_id = _get_internal_replica_context().replica_id

    def __call__(self, *args: Any) -> str:
        current_timestamp_ms = _time_ms()
        if current_timestamp_ms >= self.last_throughput_buckets - 1000:
            self.throughput_buckets[current_timestamp_ms] += 1
            self.last_throughput_buckets = current_timestamp_ms
        return self.replica_id.unique_id

    @stamp_routing_stats
    def record_routing_stats(self) -> Dict[str, Any]:
        now = _time_ms()
        for t in [t for t in self.throughput_buckets if t < now - 1000]:
            self.throughput_buckets.pop(t)
        return {"throughput": sum(self.throughput_buckets.values())}


@serve.deployment(num_replicas=3, max_ongoing_requests=2, ray_actor_options={"num_cpus": 0})
class SlowApp:
    """50 ms per request, 2 at a time: bursts get rejections and FIFO hand-offs."""

    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(0.05)
        return "ok"


APPS = {
    "uniform": (UniformRequestRouterApp, "routers.examples:TracedUniformRequestRouter", {}),
    "throughput": (ThroughputAwareRequestRouterApp, "routers.examples:TracedThroughputAwareRequestRouter",
                   {"request_routing_stats_period_s": 1, "request_routing_stats_timeout_s": 1}),
    "pow2": (SlowApp, "routers.examples:TracedPowerOfTwoChoicesRequestRouter", {}),
}


def run(directory: str, requests: int, port: int) -> None:
    import ray

    from collector import sink_report

    os.makedirs(directory, exist_ok=True)
    for path in sink_report.sink_files(directory):
        os.unlink(path)
    jsonl_path = os.path.join(os.path.abspath(directory), "events-{hostname}-{pid}.jsonl")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handles = {}
        for name, (app, router, options) in APPS.items():
            config = RequestRouterConfig(request_router_class=router,
                                         request_router_kwargs={"jsonl_path": jsonl_path}, **options)
            print(f"deploying {name} ({router.split(':')[1]})")
            handles[name] = serve.run(app.options(request_router_config=config).bind(),
                                      name=name, route_prefix=f"/{name}")
        time.sleep(2)  # let the first stamped stats reach the routers
        for name, handle in handles.items():
            print(f"sending {requests} requests to {name} through HTTP and {requests} through a handle")
            for _ in range(requests):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=60).read()
            for start in range(0, requests, 50):
                for response in [handle.remote() for _ in range(min(50, requests - start))]:
                    response.result(timeout_s=60)
        time.sleep(4)  # one flush interval, plus the grace period for rejections
    finally:
        serve.shutdown()
        ray.shutdown()
    sink_report.render(sink_report.summarize(sink_report.sink_files(directory)))
    print(f"decision logs (JSON Lines, one wire-format batch per line): {os.path.abspath(directory)}")
