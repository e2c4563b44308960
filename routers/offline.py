"""Run a RequestRouter without a Ray cluster: fake replicas, a real event loop.

Useful to unit-test a router (traced or not) and to measure the tracer's own
cost with no Ray I/O in the way. The router is the real class; only the
replicas are stand-ins that answer the attributes routers read.

    router = make_router(TracedPowerOfTwoChoicesRequestRouter, n_replicas=16)
    ranks = await router.choose_replicas(router._replicas_list, make_request())
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Set

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
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


class _RayRouter:
    """Ray's AsyncioRouter around a request router, reduced to what its
    done-callback reads: the callback itself is Ray's own code."""

    _process_finished_request = AsyncioRouter._process_finished_request
    _get_actor_died_error = AsyncioRouter._get_actor_died_error

    def __init__(self, request_router: Any):
        self.request_router = self._active_request_router = request_router
        self._metrics_manager = _Metrics()


class FakeResult:
    """Stands in for the `ReplicaResult` of one send attempt: completes when the test says so.

    Made by `sent`, which registers Ray's own done-callback first, as Ray
    does when it sends (it calls the router's on_request_completed with the
    result); callbacks registered later (a tracer's) run after it.
    """

    _UNSET = object()

    def __init__(self):
        self._callbacks = []
        self._value = self._UNSET

    @classmethod
    def sent(cls, router: Any, replica_id: ReplicaID, pending_request: PendingRequest) -> "FakeResult":
        result = cls()
        ray_router = _RayRouter(router)
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
