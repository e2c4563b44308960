"""Routers with bugs of their own, plain and traced: tracing must not make
them behave any worse."""

from __future__ import annotations

import random

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
