"""Deployments for the integration tests: the seed's apps, plus a count of the
requests each replica served, written by the replica itself to `count_dir`."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict
from typing import Any, Dict, Iterable

from ray import serve
from ray.serve.context import _get_internal_replica_context

from routelens.routers import stamp_routing_stats


class ReplicaCounter:
    """Each replica writes how many requests it served to <dir>/<app>.<replica>.count."""

    def __init__(self, count_dir: str):
        context = _get_internal_replica_context()
        self.replica_id = context.replica_id
        self.served = 0
        self._lock = threading.Lock()
        self._path = os.path.join(count_dir, f"{context.app_name}.{self.replica_id.unique_id}.count")

    def count(self) -> None:
        # Sync handlers run on a thread pool: count and write under one lock.
        with self._lock:
            self.served += 1
            tmp = self._path + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(self.served))
            os.replace(tmp, self._path)


def read_counts(count_dir: str, app: str) -> Dict[str, int]:
    counts = {}
    for name in os.listdir(count_dir):
        if name.startswith(app + ".") and name.endswith(".count"):
            with open(os.path.join(count_dir, name)) as f:
                counts[name[len(app) + 1 : -len(".count")]] = int(f.read())
    return counts


@serve.deployment(ray_actor_options={"num_cpus": 0})
class UniformRequestRouterApp:
    """The seed's app for the uniform router, counting."""

    def __init__(self, count_dir: str):
        self.counter = ReplicaCounter(count_dir)

    async def __call__(self, *args: Any) -> str:
        self.counter.count()
        return self.counter.replica_id.unique_id


def _time_ms() -> int:
    return int(time.time() * 1000)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ThroughputAwareRequestRouterApp:
    """The seed's app for the throughput-aware router, with stamped stats, counting."""

    def __init__(self, count_dir: str):
        self.throughput_buckets: Dict[int, int] = defaultdict(int)
        self.last_throughput_buckets = _time_ms()
        self.counter = ReplicaCounter(count_dir)

    def __call__(self, *args: Any) -> str:
        self.update_throughput()
        self.counter.count()
        return self.counter.replica_id.unique_id

    def update_throughput(self):
        current_timestamp_ms = _time_ms()
        if current_timestamp_ms < self.last_throughput_buckets - 1000:
            return
        self.throughput_buckets[current_timestamp_ms] += 1
        self.last_throughput_buckets = current_timestamp_ms

    @stamp_routing_stats
    def record_routing_stats(self) -> Dict[str, Any]:
        current_timestamp_ms = _time_ms()
        throughput = 0
        for t, c in list(self.throughput_buckets.items()):
            if t < current_timestamp_ms - 1000:
                self.throughput_buckets.pop(t)
            else:
                throughput += c
        return {"throughput": throughput}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2)
class SlowApp:
    """Takes 50 ms a request and holds at most 2: concurrent load gets rejections."""

    def __init__(self, count_dir: str):
        self.counter = ReplicaCounter(count_dir)

    async def __call__(self, *args: Any) -> str:
        self.counter.count()
        await asyncio.sleep(0.05)
        return self.counter.replica_id.unique_id

    async def replica_name(self) -> str:
        """Not counted: what the broadcast test calls on every replica."""
        return self.counter.replica_id.unique_id


def delete_apps(names: Iterable[str], timeout_s: float = 120.0) -> None:
    """Deletes Serve applications side by side, rather than one after another
    (each waits for its replicas' graceful shutdown); returns once all are gone."""
    names = set(names)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while remaining := names & set(serve.status().applications):
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications still deployed after {timeout_s} s: {sorted(remaining)}")
        time.sleep(0.2)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BriefApp:
    """Takes `work_s` a request, never less: with one or two slots a replica,
    concurrent load gets refusals, retries and FIFO hand-offs. Returns the
    time it took, by its own clock."""

    def __init__(self, work_s: float):
        self.work_s = work_s

    async def __call__(self, *args: Any) -> float:
        started = time.monotonic()
        # The replica's loop (uvloop) keeps time in whole milliseconds: one sleep can end up to 1 ms early.
        while (left := started + self.work_s - time.monotonic()) > 0:
            await asyncio.sleep(left)
        return time.monotonic() - started
