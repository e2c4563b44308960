"""Run a RequestRouter without a Ray cluster: fake replicas, a real event loop.

Useful to unit-test a router (traced or not) and to measure the tracer's own
cost with no Ray I/O in the way. The router is the real class; only the
replicas are stand-ins that answer the attributes routers read.

    router = make_router(TracedPowerOfTwoChoicesRequestRouter, n_replicas=16)
    ranks = await router.choose_replicas(router._replicas_list, make_request())
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any, Dict, List, Optional, Set

from ray.exceptions import TaskCancelledError
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    ReplicaQueueLengthInfo,
    RequestMetadata,
)
from ray.serve._private.router import AsyncioRouter
from ray.serve.request_router import PendingRequest

_request_numbers = itertools.count()


class FakeReplica:
    """Stands in for `RunningReplica`: the attributes routers read, no actor."""

    def __init__(self, replica_id: ReplicaID, *, node_id: str = "node-0", availability_zone: Optional[str] = None,
                 max_ongoing_requests: int = 5, model_ids: Set[str] = frozenset(),
                 routing_stats: Optional[Dict[str, Any]] = None, queue_len: int = 0):
        self.replica_id = replica_id
        self.node_id = node_id
        self.availability_zone = availability_zone
        self.max_ongoing_requests = max_ongoing_requests
        self.multiplexed_model_ids = set(model_ids)
        self.routing_stats = routing_stats if routing_stats is not None else {}
        self.is_cross_language = False
        self.queue_len = queue_len
        self.actor_id = None
        self.refuses = False  # with the rejection protocol: whether it refuses what it is sent

    def try_send_request(self, pr: PendingRequest, with_rejection: bool) -> "FakeResult":
        return FakeResult(accepted=not (with_rejection and self.refuses), queue_len=self.queue_len)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_replicas(n: int, deployment: str = "offline", app: str = "offline", **kwargs) -> List[FakeReplica]:
    deployment_id = DeploymentID(name=deployment, app_name=app)
    return [FakeReplica(ReplicaID(unique_id=f"replica{i:03d}", deployment_id=deployment_id), **kwargs)
            for i in range(n)]


def make_router(router_cls: type, n_replicas: int = 16, *, deployment: str = "offline", app: str = "offline",
                router_kwargs: Optional[Dict[str, Any]] = None, exporter: Any = None,
                use_replica_queue_len_cache: bool = True, **replica_kwargs) -> Any:
    """A router of `router_cls`, initialized as Ray would, with fake replicas.

    Call it from inside a running event loop, as Ray does. A traced router
    sends to `exporter` when given, else to the process-wide exporter.
    Ray routes without the queue-length cache only inside Ray Client, where
    it sends without the rejection protocol.
    """
    router = router_cls(
        deployment_id=DeploymentID(name=deployment, app_name=app),
        handle_source=DeploymentHandleSource.UNKNOWN,
        self_actor_id="OFFLINE",
        self_node_id="node-0",
        use_replica_queue_len_cache=use_replica_queue_len_cache,
    )
    if exporter is not None:
        router._routelens.configure(router_kwargs or {}, exporter)
    router.initialize_state(**(router_kwargs or {}))
    router.update_replicas(make_replicas(n_replicas, deployment, app, **replica_kwargs))
    return router


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

    routes the request, sends it to a fake replica and calls the router's
    hooks as Ray does (with the rejection protocol if the router uses the
    queue-length cache, as it does but inside Ray Client, and the replica is
    not a Java one); `result.finish()` then completes it through Ray's
    done-callback, which reaches the loop as in Ray, but from the loop's own
    thread rather than a worker's. Call it from inside a running event loop.
    """

    _process_finished_request = AsyncioRouter._process_finished_request
    _get_actor_died_error = AsyncioRouter._get_actor_died_error
    _route_and_send_request_once = AsyncioRouter._route_and_send_request_once
    _register_completion_callback = AsyncioRouter._register_completion_callback
    _register_decrement_queue_len_cache_callback = AsyncioRouter._register_decrement_queue_len_cache_callback

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

    Made by `sent`, which registers Ray's own done-callback first, as Ray
    does when it sends (it calls the router's on_request_completed with the
    result); callbacks registered later (a tracer's) run after it.
    """

    _UNSET = object()

    def __init__(self, accepted: bool = True, queue_len: int = 0):
        self._callbacks = []
        self._value = self._UNSET
        self._answer = ReplicaQueueLengthInfo(accepted=accepted, num_ongoing_requests=queue_len)

    @classmethod
    def sent(cls, router: Any, replica_id: ReplicaID, pending_request: PendingRequest) -> "FakeResult":
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


def make_request(model_id: str = "") -> PendingRequest:
    number = next(_request_numbers)
    return PendingRequest(
        args=[],
        kwargs={},
        metadata=RequestMetadata(
            request_id=f"request-{number}",
            internal_request_id=f"internal-{number}",
            multiplexed_model_id=model_id,
        ),
    )


async def route_one(router: Any) -> None:
    """One request through every hook, in Ray's order for an accepted request
    that completes at once: choose_replicas, routed, completed."""
    pr = make_request()
    ranks = await router.choose_replicas(router._replicas_list, pr)
    replica_id = ranks[0][0].replica_id
    result = FakeResult.sent(router, replica_id, pr)
    router.on_request_routed(pr, replica_id, result)
    result.finish("done")
