"""Unit-test a Ray Serve request router, traced or not, without a cluster.

The router is your real class, built and initialized as Ray builds it, on
a real event loop; only the replicas are stand-ins (`FakeReplica`) that
answer the attributes routers read, and can be given routing stats, queue
lengths, models and a will to refuse. Requests are real `PendingRequest`s.

    router = make_router(MyRouter, n_replicas=3)          # inside a running event loop
    replicas = replicas_of(router)
    ranks = await router.choose_replicas(replicas, make_request())

To go through every hook Ray calls, in Ray's order and through Ray's own
sending and completion code, send with `RayRouter(router).send(request)`
and finish the result with `result.finish(value)`. A traced router given
`record_to=path` writes what it records to that JSON Lines file, which
`recorded_events(router)` reads back, event by event as on the wire.

docs/testing-routers.md has a worked example. Ray's private functions this
module borrows are listed in routers.ray_contract, and checked against the
installed Ray by the project's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from ray.exceptions import TaskCancelledError
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    ReplicaQueueLengthInfo,
    RequestMetadata,
)
from ray.serve._private.request_router.common import ReplicaQueueLengthCacheEntry
from ray.serve._private.router import AsyncioRouter
from ray.serve.request_router import PendingRequest

from .config import TracerConfig
from .exporter import Exporter

__all__ = [
    "FakeReplica",
    "FakeResult",
    "RayRouter",
    "make_replica",
    "make_replicas",
    "make_request",
    "make_router",
    "prime_queue_len_cache",
    "recorded_events",
    "replicas_of",
    "route_one",
]

_request_numbers = itertools.count()


class FakeReplica:
    """Stands in for Ray's `RunningReplica`: the attributes routers read, no actor.

    Change them at will (`routing_stats`, `queue_len`, `is_cross_language`,
    `refuses`, ...), then call `router.update_replicas(replicas_of(router))`
    as Ray does when a replica's state changes.
    """

    def __init__(self, replica_id: ReplicaID, *, node_id: str = "node-0", availability_zone: Optional[str] = None,
                 max_ongoing_requests: int = 5, model_ids: Set[str] = frozenset(),
                 routing_stats: Optional[Dict[str, Any]] = None, queue_len: int = 0):
        self.replica_id = replica_id
        self.node_id = node_id
        self.availability_zone = availability_zone
        self.max_ongoing_requests = max_ongoing_requests
        self.multiplexed_model_ids = set(model_ids)
        self.routing_stats = routing_stats if routing_stats is not None else {}
        self.is_cross_language = False  # a Java replica: Ray sends to it without asking first
        self.queue_len = queue_len  # what it answers when probed or sent a request
        self.actor_id = None
        self.refuses = False  # with the rejection protocol: whether it refuses what it is sent

    def try_send_request(self, pr: PendingRequest, with_rejection: bool) -> "FakeResult":
        return FakeResult(accepted=not (with_rejection and self.refuses), queue_len=self.queue_len)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_replicas(n: int, deployment: str = "offline", app: str = "offline", **replica_kwargs) -> List[FakeReplica]:
    """`n` fake replicas of one deployment, ids "replica000", "replica001", ...

    `replica_kwargs` (node_id, availability_zone, max_ongoing_requests,
    model_ids, routing_stats, queue_len) apply to every one of them.
    """
    return [make_replica(f"replica{i:03d}", deployment, app, **replica_kwargs) for i in range(n)]


def make_replica(unique_id: str, deployment: str = "offline", app: str = "offline", **replica_kwargs) -> FakeReplica:
    """One fake replica of a deployment, with the id `unique_id` (`replica_kwargs` as for `make_replicas`)."""
    return FakeReplica(ReplicaID(unique_id=unique_id, deployment_id=DeploymentID(name=deployment, app_name=app)),
                       **replica_kwargs)


_recording_exporters: Dict[str, Exporter] = {}  # JSON Lines path -> the exporter writing it


def make_router(router_cls: type, n_replicas: int = 16, *, deployment: str = "offline", app: str = "offline",
                router_kwargs: Optional[Dict[str, Any]] = None, record_to: Optional[str] = None,
                exporter: Optional[Exporter] = None, use_replica_queue_len_cache: bool = True,
                traced: bool = True, router_init: Optional[Dict[str, Any]] = None, **replica_kwargs) -> Any:
    """A router of `router_cls`, built and initialized as Ray would, with
    `n_replicas` fake replicas (`replica_kwargs` as for `make_replicas`).

    Call it from inside a running event loop (an `async def` test, or one
    run by `asyncio.run`), as Ray does. `router_kwargs` are the deployment's
    `request_router_kwargs`, given to `initialize_state`.

    Traced routers only:
    - `record_to`: a JSON Lines file the router's records are written to,
      for `recorded_events`. Routers given one path share one exporter.
    - `exporter`: the exporter to send to instead (by default, the
      process-wide one, configured by `router_kwargs` or ROUTELENS_*
      environment variables as in a Ray process).

    `traced=False`: a traced class records nothing and ships nothing: its
    tracer is switched off before `initialize_state`, so it never makes an
    exporter (whatever the kwargs or ROUTELENS_* variables say). The router
    routes exactly as without the tracer.

    `use_replica_queue_len_cache=False` builds the router as Ray does inside
    Ray Client, where requests are sent without asking the replica first.
    `router_init`: more keyword arguments for the constructor, as Ray passes
    them (`self_node_id`, `prefer_local_node_routing`,
    `prefer_local_az_routing`, `self_availability_zone`, ...).
    """
    router_kwargs = dict(router_kwargs or {})
    router = router_cls(**{
        "deployment_id": DeploymentID(name=deployment, app_name=app),
        "handle_source": DeploymentHandleSource.UNKNOWN,
        "self_actor_id": "OFFLINE",
        "self_node_id": "node-0",
        "use_replica_queue_len_cache": use_replica_queue_len_cache,
        **(router_init or {}),
    })
    if not traced:
        if record_to is not None or exporter is not None:
            raise ValueError("record_to and exporter record what a traced router does: not with traced=False")
        if getattr(router, "_routelens", None) is not None:
            router._routelens = None  # the mixin's hooks then only call the wrapped router
    if record_to is not None or exporter is not None:
        tracer = getattr(router, "_routelens", None)
        if tracer is None:
            raise ValueError(f"record_to and exporter are for traced routers; {router_cls.__name__} is not traced"
                             " (class Traced(TracingMixin, YourRouter): pass)")
        if record_to is not None:
            router_kwargs["jsonl_path"] = record_to
            exporter = exporter or _recording_exporter(record_to)
        tracer.configure(router_kwargs, exporter)
    router.initialize_state(**router_kwargs)
    router.update_replicas(make_replicas(n_replicas, deployment, app, **replica_kwargs))
    return router


def _recording_exporter(path: str) -> Exporter:
    exporter = _recording_exporters.get(path)
    if exporter is None:
        exporter = _recording_exporters[path] = Exporter(TracerConfig(jsonl_path=path, flush_interval_s=0.1))
    return exporter


def prime_queue_len_cache(router: Any, queue_lens: Mapping[Any, Tuple[int, float]], now: Optional[float] = None,
                          replace: bool = True) -> None:
    """Sets what the router's queue-length cache holds, as Ray's routing would
    have left it: replica (its `unique_id`, or its `ReplicaID`) -> (queue
    length, age in seconds), for the router's current replicas; with
    `replace` (the default) the others have no entry, else only the entries
    given change. `now`: the time on the cache's clock (the router's
    `get_curr_time_s`, by default `time.time()`, Ray's). Entries older than
    Ray's cache timeout (10 s) read as missing, as in Ray. Routers that
    consult the cache (`select_available_replicas`, Ray's choice within a
    rank) then see these lengths and do not probe.

    Ray keeps its cache's dict for the router's lifetime (the tracer holds
    its `get`), so the entries are changed in place."""
    cache = router.replica_queue_len_cache._cache
    if replace:
        cache.clear()
    now = time.time() if now is None else now
    current = router.curr_replicas
    by_unique_id = None
    for replica_id, (queue_len, age_s) in queue_lens.items():
        if isinstance(replica_id, str):
            if by_unique_id is None:
                by_unique_id = {known.unique_id: known for known in current}
            replica_id = by_unique_id.get(replica_id)
        if replica_id in current:
            cache[replica_id] = ReplicaQueueLengthCacheEntry(queue_len, now - age_s)


def replicas_of(router: Any) -> List[FakeReplica]:
    """The router's current replicas, in the order they were last given."""
    return list(router.curr_replicas.values())


def make_request(model_id: str = "", request_id: Optional[str] = None,
                 internal_request_id: Optional[str] = None) -> PendingRequest:
    """A request as Ray queues it for routing: no arguments, fresh ids
    ("request-N", "internal-N") unless given, the multiplexed model `model_id`."""
    number = next(_request_numbers)
    return PendingRequest(
        args=[],
        kwargs={},
        metadata=RequestMetadata(
            request_id=request_id if request_id is not None else f"request-{number}",
            internal_request_id=internal_request_id if internal_request_id is not None else f"internal-{number}",
            multiplexed_model_id=model_id,
        ),
    )


def recorded_events(router: Any, timeout_s: float = 10.0) -> List[Dict[str, Any]]:
    """What a traced router made with `record_to` recorded so far: its wire
    events (docs/design.md, "Wire format v3"), oldest first. Waits until
    everything queued is written. Call it outside the event loop (after
    `asyncio.run`), or between requests: it blocks."""
    tracer = router._routelens
    if not tracer.exporter.flush(timeout_s):
        raise TimeoutError(f"the router's events were not written within {timeout_s} s")
    path = tracer.config.jsonl_path.format(pid=os.getpid(), hostname=socket.gethostname())
    events = []
    with open(path) as f:
        for line in f:
            batch = json.loads(line)
            if batch["source"]["source_id"] == tracer.source.id:
                events.extend(batch["events"])
    return events


class _Metrics:
    def dec_num_running_requests_for_replica(self, replica_id: Any) -> None:
        pass

    def inc_num_running_requests_for_replica(self, replica_id: Any) -> None:
        pass

    @contextlib.contextmanager
    def wrap_queued_request(self, is_retry: bool, num_curr_replicas: int):
        yield


class RayRouter:
    """Ray's AsyncioRouter around a request router, reduced to what its
    sending and done-callback code read: that code itself is Ray's own.

        result = await RayRouter(router).send(make_request())

    routes the request (Ray's routing queue, `choose_replicas`, the FIFO
    hand-off), sends it to a fake replica and calls the router's hooks as
    Ray does: with the rejection protocol if the router uses the
    queue-length cache (it does, but inside Ray Client) and the replica is
    not a Java one. `result.finish(value)` then completes it through Ray's
    done-callback (`on_request_completed`), which reaches the loop as in
    Ray, but from the loop's own thread rather than a worker's. Call it from
    inside a running event loop.
    """

    _process_finished_request = AsyncioRouter._process_finished_request
    _get_actor_died_error = AsyncioRouter._get_actor_died_error
    _route_and_send_request_once = AsyncioRouter._route_and_send_request_once
    _register_completion_callback = AsyncioRouter._register_completion_callback
    _register_decrement_queue_len_cache_callback = AsyncioRouter._register_decrement_queue_len_cache_callback
    # Read by the functions above only when a replica died, which a fake
    # replica never does (routers.ray_contract checks the rest is provided).
    LEFT_OUT = frozenset({"_handle_actor_died_error", "_make_upstream_crash_error"})

    def __init__(self, request_router: Any):
        self.request_router = self._active_request_router = request_router
        self._metrics_manager = _Metrics()
        # One flag in Ray: the router's queue-length cache is on exactly when sends ask first.
        self._enable_strict_max_ongoing_requests = request_router._use_replica_queue_len_cache
        self._event_loop = None  # bound by send()

    async def _resolve_args_with_metrics(self, pr: PendingRequest) -> None:
        pass

    async def send(self, pr: PendingRequest) -> Optional["FakeResult"]:
        """One attempt, as Ray makes it: the result, or None if the replica refused."""
        self._event_loop = asyncio.get_running_loop()
        return await self._route_and_send_request_once(pr, "response", is_retry=False)


class FakeResult:
    """Stands in for the `ReplicaResult` of one send attempt: completes when the test says so.

    `RayRouter.send` returns one. To drive the hooks by hand instead, make
    one with `FakeResult.sent(router, replica_id, request)`, which registers
    Ray's own done-callback first, as Ray does when it sends (it calls the
    router's on_request_completed with the result); callbacks registered
    later (a tracer's) run after it.
    """

    _UNSET = object()

    def __init__(self, accepted: bool = True, queue_len: int = 0):
        self._callbacks = []
        self._value = self._UNSET
        self._answer = ReplicaQueueLengthInfo(accepted=accepted, num_ongoing_requests=queue_len)

    @classmethod
    def sent(cls, router: Any, replica_id: ReplicaID, pending_request: PendingRequest) -> "FakeResult":
        """The result of sending `pending_request` to the replica, with Ray's done-callback registered."""
        result = cls()
        ray_router = RayRouter(router)
        internal_request_id = pending_request.metadata.internal_request_id
        result.add_done_callback(
            lambda value: ray_router._process_finished_request(replica_id, internal_request_id, None, value))
        return result

    def add_done_callback(self, callback) -> None:
        if self._value is self._UNSET:
            self._callbacks.append(callback)
        else:  # as Ray does for a result that is already complete
            callback(self._value)

    def finish(self, value: Any = None) -> None:
        """Complete the attempt with `value` (an exception: it failed)."""
        self._value = value
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(value)

    async def get_rejection_response(self) -> ReplicaQueueLengthInfo:
        return self._answer

    def cancel(self) -> None:
        if self._value is self._UNSET:
            self.finish(TaskCancelledError())


async def route_one(router: Any) -> None:
    """One request through the three hooks a traced router records, in
    Ray's order for an accepted request that completes at once:
    choose_replicas (called directly, without Ray's routing queue),
    on_request_routed, then on_request_completed through Ray's done-callback."""
    pr = make_request()
    ranks = await router.choose_replicas(router._replicas_list, pr)  # the list Ray itself passes
    replica_id = ranks[0][0].replica_id
    result = FakeResult.sent(router, replica_id, pr)
    router.on_request_routed(pr, replica_id, result)
    result.finish("done")
