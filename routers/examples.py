"""The routers our users start from (the Ray Serve custom-routing guide), and
their traced versions.

`UniformRequestRouter` and `ThroughputAwareRequestRouter` are the guide's
code with one change: its `print` calls on every request became
`logger.debug`, so that tracing them does not also flood the proxy's log.
Routing logic is untouched, including the guide's `min()` over an empty set
when every replica is full (Ray logs it and retries).

Ray ships a router class by value together with this module's globals, so
this module holds no state: the exporter lives in `routers.exporter`.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, List, Optional

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from .mixin import TracingMixin

logger = logging.getLogger("ray.serve")


class UniformRequestRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        logger.debug("UniformRequestRouter routing request")
        index = random.randint(0, len(candidate_replicas) - 1)
        return [[candidate_replicas[index]]]

    def on_request_routed(
        self,
        pending_request: PendingRequest,
        replica_id: ReplicaID,
        result: ReplicaResult,
    ):
        logger.debug("on_request_routed callback is called!!")


class ThroughputAwareRequestRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        """
        This method chooses the best replica for the request based on
        multiplexed, locality, and custom throughput stats. The algorithm
        works as follows:

        1. Populate top_ranked_replicas based on available replicas based on
          multiplex_id
        2. Populate and override top_ranked_replicas info based on locality
         information of replicas (we want to prefer replicas that are in the
          same vicinity to this deployment)
        3. Select the replica with minimum throughput.
        """

        # Dictionary to hold the top-ranked replicas
        top_ranked_replicas: Dict[ReplicaID, RunningReplica] = {}
        # Take the best set of replicas for the multiplexed model
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ranked_replicas_multiplex: List[RunningReplica] = (
                self.rank_replicas_via_multiplex(
                    replicas=candidate_replicas,
                    multiplexed_model_id=pending_request.metadata.multiplexed_model_id,
                )
            )[0]

            # Filter out replicas that are not available (queue length exceed max ongoing request)
            ranked_replicas_multiplex = self.select_available_replicas(
                candidates=ranked_replicas_multiplex
            )

            for replica in ranked_replicas_multiplex:
                top_ranked_replicas[replica.replica_id] = replica

        # Take the best set of replicas in terms of locality
        ranked_replicas_locality: List[RunningReplica] = self.rank_replicas_via_locality(
            replicas=candidate_replicas
        )[0]

        # Filter out replicas that are not available (queue length exceed max ongoing request)
        ranked_replicas_locality = self.select_available_replicas(candidates=ranked_replicas_locality)

        for replica in ranked_replicas_locality:
            top_ranked_replicas[replica.replica_id] = replica

        logger.debug("ThroughputAwareRequestRouter routing request")

        # Take the replica with minimum throughput.
        min_throughput_replicas = min(
            [replica for replica in top_ranked_replicas.values()],
            key=lambda r: r.routing_stats.get("throughput", 0),
        )
        return [[min_throughput_replicas]]


class ModelAwareRequestRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    """Model first, then locality: the replicas that hold the request's
    multiplexed model, then those holding the fewest models, then the rest
    (MultiplexMixin's ranks); within each, same node before same availability
    zone before the others (LocalityMixin's ranks). Requests without a model id
    are ranked by locality alone. Ray tries the ranks in order and, within a
    rank, takes the replica with the shortest queue that accepts.

    Not in the guide: the guide's throughput-aware router merges the model's
    replicas with the local ones into one set, so on a single node (where
    every replica is local) it ignores the model id. This one keeps them apart.
    """

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if model_id:
            by_model = self.rank_replicas_via_multiplex(replicas=candidate_replicas, multiplexed_model_id=model_id)
        else:
            by_model = [candidate_replicas]
        return [near for group in by_model for near in self.rank_replicas_via_locality(replicas=group) if near]


class TracedUniformRequestRouter(TracingMixin, UniformRequestRouter):
    pass


class TracedThroughputAwareRequestRouter(TracingMixin, ThroughputAwareRequestRouter):
    pass


class TracedModelAwareRequestRouter(TracingMixin, ModelAwareRequestRouter):
    pass


class TracedPowerOfTwoChoicesRequestRouter(TracingMixin, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router, traced."""
