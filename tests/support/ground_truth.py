"""A router that knows, beside whatever traces it, which of its decisions
supplied each replica Ray handed out: the ground truth the tracer's FIFO
attribution is checked against on real Serve (tests/test_ground_truth.py).

It ranks every replica in two tiers (a random half, then the rest), so that
under refusals most replicas appear in most decisions: the case where the
request's latest decision that ranked a replica is often not the one that
found it. Ray selects a replica from one tier, the very list object the
decision returned, and fulfils a request with it in the same step; the
router notes the tier's list at the selection and writes one line per
fulfilment: who received the replica, from which decision (the request it
was made for and its 0-based call) and which rank. It also writes a line
for each completion Ray reports (one per send attempt, refused ones
included): what the tracer's `completed` events, stored or counted as
dropped, must add up to. And it explains each decision (`routelens_explain`:
a request's first call or a retry, with the tiers' sizes), writing a line
for each explanation: what the decisions recorded must carry.

The class is shipped to Ray by value (tests/conftest.py), so it imports
nothing from `tests`.
"""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict, defaultdict
from typing import Any, Dict, List, Optional, Tuple

from ray.serve.request_router import FIFOMixin, RequestRouter

from routelens.routers import TracingMixin

MAX_TIERS_KEPT = 100_000  # tiers of recent decisions, to name the one a selection came from


class GroundTruthRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, ground_truth_path: Optional[str] = None, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._truth = open(ground_truth_path, "a", buffering=1) if ground_truth_path else None
        self._calls: Dict[str, int] = defaultdict(int)  # internal_request_id -> choose_replicas calls
        # id(tier) -> (the tier, the decision's request, its call, the rank)
        self._tiers: "OrderedDict[int, Tuple[list, str, int, int]]" = OrderedDict()
        self._selected: Optional[Tuple[Tuple[list, str, int, int], Any]] = None

    async def choose_replicas(self, candidate_replicas: List[Any], pending_request: Any = None) -> List[List[Any]]:
        request = pending_request.metadata.internal_request_id
        call = self._calls[request]
        self._calls[request] = call + 1
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        tiers = [shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2:]]
        for rank, tier in enumerate(tiers):
            self._tiers[id(tier)] = (tier, request, call, rank)
        while len(self._tiers) > MAX_TIERS_KEPT:
            self._tiers.popitem(last=False)
        reason, scores = "first call" if call == 0 else "retry", {"tier_0": len(tiers[0]), "tier_1": len(tiers[1])}
        self.routelens_explain(reason, **scores)
        if self._truth is not None:
            self._truth.write(json.dumps({"pid": os.getpid(), "explained": request, "call": call, "reason": reason,
                                          "scores": scores}) + "\n")
        return tiers

    async def _select_from_candidate_replicas(self, candidates: List[Any], backoff_index: int) -> Any:
        replica = await super()._select_from_candidate_replicas(candidates, backoff_index)
        entry = self._tiers.get(id(candidates))
        # Ray fulfils with this replica in the same step, before any other task runs.
        self._selected = (entry, replica) if entry is not None and entry[0] is candidates else None
        return replica

    def _record_queue_wait_time(self, pending_request: Any) -> None:
        # Called by the fulfilment with the request that receives the replica.
        super()._record_queue_wait_time(pending_request)
        if self._truth is not None and self._selected is not None:
            (_tier, request, call, rank), replica = self._selected
            self._truth.write(json.dumps({
                "pid": os.getpid(), "recipient": pending_request.metadata.internal_request_id,
                "decision_request": request, "decision_call": call, "rank": rank,
                "replica_id": replica.replica_id.unique_id}) + "\n")
        self._selected = None

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        if self._truth is not None:
            self._truth.write(json.dumps({"pid": os.getpid(), "completed": internal_request_id}) + "\n")


class TracedGroundTruthRouter(TracingMixin, GroundTruthRouter):
    pass
