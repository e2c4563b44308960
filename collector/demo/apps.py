"""The Serve applications `routelens demo` deploys, each behind a traced router.

- `uniform`: the guide's UniformRequestRouterApp, 10 replicas, its uniform router.
- `throughput`: the guide's ThroughputAwareRequestRouterApp, 3 replicas, its
  throughput-aware router; stats stamped and collected every second.
- `backend`: 3 replicas on Ray's default power-of-two router, 2 requests at a
  time each; one replica is 10x slower than the others, and the demo's
  bursts overflow them all (rejections, FIFO hand-offs).
- `models`: 4 replicas serving multiplexed models, slow to load, on a
  model-then-locality router; one replica's stats stop arriving after a
  while (its `record_routing_stats` outlives the timeout), so the routers
  rank it on ever older stats.

Which replica is the slow or the stale one is decided by its replica rank,
so it is always exactly one.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List

from ray import serve
from ray.serve.context import _get_internal_replica_context

from routelens.routers import stamp_routing_stats

STATS_PERIOD_S = 1.0
STATS_TIMEOUT_S = 1.0
MODELS = [f"model-{name}" for name in ("a", "b", "c", "d", "e", "f")]
MODEL_LOAD_S = 0.5
STALE_AFTER_S = 20.0  # the stale replica reports fresh stats this long first


def _replica_rank() -> int:
    rank = _get_internal_replica_context().rank
    return getattr(rank, "rank", rank)


def _replica_id() -> str:
    return _get_internal_replica_context().replica_id.unique_id


@serve.deployment(num_replicas=10, ray_actor_options={"num_cpus": 0})
class UniformRequestRouterApp:
    def __init__(self):
        self.replica_id = _replica_id()

    async def __call__(self, *args: Any) -> str:
        return self.replica_id


def _time_ms() -> int:
    return int(time.time() * 1000)


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class ThroughputAwareRequestRouterApp:
    """The guide's app, its routing stats stamped so staleness is exact."""

    def __init__(self):
        self.throughput_buckets: Dict[int, int] = defaultdict(int)
        self.last_throughput_buckets = _time_ms()
        self.replica_id = _replica_id()

    def __call__(self, *args: Any) -> str:
        current_timestamp_ms = _time_ms()
        if current_timestamp_ms >= self.last_throughput_buckets - 1000:
            self.throughput_buckets[current_timestamp_ms] += 1
            self.last_throughput_buckets = current_timestamp_ms
        return self.replica_id

    @stamp_routing_stats
    def record_routing_stats(self) -> Dict[str, Any]:
        now = _time_ms()
        for t in [t for t in self.throughput_buckets if t < now - 1000]:
            self.throughput_buckets.pop(t)
        return {"throughput": sum(self.throughput_buckets.values())}


@serve.deployment(num_replicas=3, max_ongoing_requests=2, ray_actor_options={"num_cpus": 0})
class Backend:
    """20 ms per request, 200 ms on the replica of rank 0."""

    def __init__(self):
        self.replica_id = _replica_id()
        self.service_s = 0.2 if _replica_rank() == 0 else 0.02

    async def __call__(self, *args: Any) -> str:
        await asyncio.sleep(self.service_s)
        return self.replica_id


@serve.deployment(num_replicas=4, max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class ModelServer:
    """Loads a model on first use (MODEL_LOAD_S), keeps all of them. Reports
    how many it holds as routing stats; the replica of rank 0 stops answering
    in time after STALE_AFTER_S."""

    def __init__(self):
        self.replica_id = _replica_id()
        self.started = time.monotonic()
        self.goes_stale = _replica_rank() == 0
        self.loaded = 0

    @serve.multiplexed(max_num_models_per_replica=len(MODELS))
    async def get_model(self, model_id: str) -> str:
        await asyncio.sleep(MODEL_LOAD_S)
        self.loaded += 1
        return model_id

    async def __call__(self, *args: Any) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(0.01)
        return f"{model} on {self.replica_id}"

    @stamp_routing_stats
    async def record_routing_stats(self) -> Dict[str, Any]:
        if self.goes_stale and time.monotonic() - self.started > STALE_AFTER_S:
            await asyncio.sleep(3 * STATS_TIMEOUT_S)  # Ray gives up at the timeout; routers keep the old value
        return {"models_loaded": self.loaded}


@dataclass(frozen=True)
class DemoApp:
    name: str
    deployment: Any
    router: str
    config: Dict[str, Any] = field(default_factory=dict)  # more RequestRouterConfig fields

    def bind(self, router_kwargs: Dict[str, Any]):
        from ray.serve.config import RequestRouterConfig

        config = RequestRouterConfig(request_router_class=self.router, request_router_kwargs=router_kwargs,
                                     **self.config)
        return self.deployment.options(request_router_config=config).bind()

    @property
    def replicas(self) -> int:
        return self.deployment.num_replicas


_STAMPED_STATS = {"request_routing_stats_period_s": STATS_PERIOD_S,
                  "request_routing_stats_timeout_s": STATS_TIMEOUT_S}

APPS: List[DemoApp] = [
    DemoApp("uniform", UniformRequestRouterApp, "routelens.routers.examples:TracedUniformRequestRouter"),
    DemoApp("throughput", ThroughputAwareRequestRouterApp, "routelens.routers.examples:TracedThroughputAwareRequestRouter",
            _STAMPED_STATS),
    DemoApp("backend", Backend, "routelens.routers.examples:TracedPowerOfTwoChoicesRequestRouter"),
    DemoApp("models", ModelServer, "routelens.routers.examples:TracedModelAwareRequestRouter", _STAMPED_STATS),
]
