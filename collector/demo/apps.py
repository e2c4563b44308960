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
- `llm`: 3 replicas of a fake LLM (no model: it sleeps in proportion to the
  prompt's length) on Ray's prefix-cache-aware router, traced
  (routers.llm); its prompts begin with one of a handful of shared system
  prompts, so that requests form prefix groups (the Prefix affinity view).
  Its requests carry the prompt as an object, as Ray's LLM serving passes
  it between deployments: it is called through handles only, never over HTTP.

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


# The llm app's shared system prompts (each longer than the prefix groups' default
# 128 characters: requests that share one share a group, whatever follows).
SYSTEM_PROMPTS = [
    "You are a support agent for a cloud storage service. Answer the customer's question in two or three "
    "sentences, name the setting they need, and never ask for their password or their payment details.",
    "You are a code reviewer. Read the diff below, point out bugs before style, quote the line you mean, and "
    "end with one sentence saying whether you would approve it as it stands.",
    "You translate product descriptions from English into plain French for an online shop. Keep brand names, "
    "sizes and prices exactly as written, and do not add anything the original does not say.",
    "You are a tutor for secondary-school physics. Explain the idea behind the student's question with one "
    "everyday example, then give the formula, then check their arithmetic step by step.",
    "You summarise meeting transcripts for a busy manager: three bullet points of decisions, then every action "
    "item with its owner and date, and nothing about who said what unless it changes a decision.",
]
LLM_SECONDS_PER_CHAR = 0.00005  # 300 characters: 15 ms


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion's messages, as Ray's prefix-aware router reads them (`messages`)."""

    messages: List[Dict[str, str]]

    @property
    def prompt_chars(self) -> int:
        """The prompt's length as the router reads it: the messages' contents, one after another."""
        return sum(len(message["content"]) for message in self.messages)


def chat_request(system_prompt: str, question: str) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": system_prompt}, {"role": "user", "content": question}])


@serve.deployment(num_replicas=3, max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class FakeLLM:
    """No model: a sleep in proportion to the prompt's length."""

    def __init__(self):
        self.replica_id = _replica_id()

    async def __call__(self, request: ChatRequest) -> str:
        await asyncio.sleep(LLM_SECONDS_PER_CHAR * request.prompt_chars)
        return self.replica_id


@dataclass(frozen=True)
class DemoApp:
    name: str
    deployment: Any
    router: str
    config: Dict[str, Any] = field(default_factory=dict)  # more RequestRouterConfig fields
    router_kwargs: Dict[str, Any] = field(default_factory=dict)  # the router's own, beside the tracer's
    http: bool = True  # routed to over HTTP too (else through handles only, and no route)

    def bind(self, router_kwargs: Dict[str, Any]):
        from ray.serve.config import RequestRouterConfig

        config = RequestRouterConfig(request_router_class=self.router,
                                     request_router_kwargs={**router_kwargs, **self.router_kwargs}, **self.config)
        return self.deployment.options(request_router_config=config).bind()

    @property
    def replicas(self) -> int:
        return self.deployment.num_replicas


_STAMPED_STATS = {"request_routing_stats_period_s": STATS_PERIOD_S,
                  "request_routing_stats_timeout_s": STATS_TIMEOUT_S}

APPS: List[DemoApp] = [
    DemoApp("uniform", UniformRequestRouterApp, "routelens.routers.examples:TracedUniformRequestRouter"),
    DemoApp("throughput", ThroughputAwareRequestRouterApp,
            "routelens.routers.examples:TracedThroughputAwareRequestRouter", _STAMPED_STATS),
    DemoApp("backend", Backend, "routelens.routers.examples:TracedPowerOfTwoChoicesRequestRouter"),
    DemoApp("models", ModelServer, "routelens.routers.examples:TracedModelAwareRequestRouter", _STAMPED_STATS),
    # Queue lengths 2 apart count as imbalanced (Ray's default, never), so that the busiest system
    # prompt's replica now and then sends its requests elsewhere: every branch of the router shows.
    DemoApp("llm", FakeLLM, "routelens.routers.llm:TracedPrefixCacheAffinityRouter",
            router_kwargs={"imbalanced_threshold": 2}, http=False),
]
