"""Routers with bugs of their own, plain and traced: tracing must not make
them behave any worse, nor its figures depend on them."""

from __future__ import annotations

import random
import time

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import RequestRouter

from routelens.routers import TracingMixin


class FlakyChooseRouter(RequestRouter):
    """choose_replicas raises for requests for the model "boom".

    In Ray 2.60 the routing task then dies with the request it was routing,
    which is never routed: the caller waits forever.
    """

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None and pending_request.metadata.multiplexed_model_id == "boom":
            raise RuntimeError("choose_replicas cannot route model boom")
        return [[random.choice(candidate_replicas)]]


class RaisingHooksRouter(RequestRouter):
    """on_request_routed and on_request_completed raise."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [[random.choice(candidate_replicas)]]

    def on_request_routed(self, pending_request, replica_id, result):
        raise RuntimeError("broken on_request_routed")

    def on_request_completed(self, replica_id, internal_request_id):
        raise RuntimeError("broken on_request_completed")


class TracedFlakyChooseRouter(TracingMixin, FlakyChooseRouter):
    def routelens_request_attributes(self, pending_request):
        # The tracer's own extension hook fails too: logged, never raised.
        raise KeyError("no such field")


class TracedRaisingHooksRouter(TracingMixin, RaisingHooksRouter):
    pass


class LoopBlockingRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's pow-2 router, blocking the router loop in choose_replicas and in
    on_request_routed, as Ray's PrefixCacheAffinityRouter does with its
    blocking ray.get calls (issue 27: 6-11 ms a decision). Every hook of
    the process then waits: a replica's answer, a completion, other
    requests' routing."""

    BLOCK_S = 0.01

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        time.sleep(self.BLOCK_S)
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result):
        time.sleep(self.BLOCK_S)
        return super().on_request_routed(pending_request, replica_id, result)


class TracedLoopBlockingRouter(TracingMixin, LoopBlockingRouter):
    pass
