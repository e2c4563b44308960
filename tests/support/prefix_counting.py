"""Ray's prefix-aware router, counting its own branches: the ground truth
the traced router's reasons are checked against (tests/test_ground_truth.py).

`_prefix_match_best_replicas` is Ray 2.60's, line for line, with one line
written to `branches_path` where each branch is taken, named as
routelens.routers.llm names its reasons; `choose_replicas` writes one line
per decision, so that decisions that never reached the prefix tree are
counted too. Lines, not counters: Ray ships the class to the driver's router
by value (a copy of this module's globals), so only a file reaches the test.
"""

from __future__ import annotations

from typing import Any, List, Optional

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.common import ReplicaID

from routelens.routers import llm, prefix_aware

DECISION = "decision"


class CountingPrefixRouter(PrefixCacheAffinityRouter):
    def initialize_state(self, branches_path: Optional[str] = None, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._branches = open(branches_path, "a", buffering=1) if branches_path else None

    def _count(self, line: str) -> None:
        if self._branches is not None:
            self._branches.write(line + "\n")

    async def choose_replicas(self, candidate_replicas: List[Any], pending_request: Any = None):
        self._count(DECISION)
        return await super().choose_replicas(candidate_replicas, pending_request)

    async def _prefix_match_best_replicas(self, pending_request: Any, candidate_replicas: List[Any]):
        chosen_replica_id_strings = []
        if pending_request is not None and pending_request.args is not None and len(pending_request.args) > 0:
            input_text = self._extract_text_from_request(pending_request)
            if input_text is not None:
                highest_queue_len = 0
                lowest_queue_len = float("inf")
                not_in_cache: List[Any] = []
                if self._use_replica_queue_len_cache:
                    for r in candidate_replicas:
                        queue_len = self._replica_queue_len_cache.get(r.replica_id)
                        if queue_len is None or queue_len >= r.max_ongoing_requests:
                            not_in_cache.append(r)
                        else:
                            highest_queue_len = max(highest_queue_len, queue_len)
                            lowest_queue_len = min(lowest_queue_len, queue_len)
                else:
                    not_in_cache = candidate_replicas
                if len(not_in_cache) > 0:
                    for r, queue_len in await self._probe_queue_lens(not_in_cache, 0):
                        if queue_len is None:
                            continue
                        highest_queue_len = max(highest_queue_len, queue_len)
                        lowest_queue_len = min(lowest_queue_len, queue_len)
                is_imbalanced = highest_queue_len - lowest_queue_len > self._imbalanced_threshold
                if not is_imbalanced:
                    candidate_replica_ids_strings = [r.replica_id.to_full_id_str() for r in candidate_replicas]
                    matched_text, matched_tenant_id_strings = ray.get(
                        self._tree_actor.prefix_match.remote(input_text, candidate_replica_ids_strings))
                    match_rate = len(matched_text) / len(input_text)
                    if match_rate < self._match_rate_threshold:
                        smallest_tenants_id_strings = ray.get(self._tree_actor.get_smallest_tenants.remote())
                        if smallest_tenants_id_strings is not None and len(smallest_tenants_id_strings) > 0:
                            chosen_replica_id_strings = smallest_tenants_id_strings
                            self._count(prefix_aware.SMALLEST_TENANT)
                        else:
                            self._count(prefix_aware.POW2_LOW_MATCH_RATE)
                    else:
                        if matched_tenant_id_strings is not None and len(matched_tenant_id_strings) > 0:
                            chosen_replica_id_strings = matched_tenant_id_strings
                            self._count(prefix_aware.PREFIX_MATCH)
                        else:
                            self._count(prefix_aware.POW2_NO_MATCH)
                else:
                    self._count(prefix_aware.POW2_IMBALANCED)
        else:
            self._count(prefix_aware.POW2_NO_PROMPT)
        return [[self._replicas[ReplicaID.from_full_id_str(chosen_id_string)]
                 for chosen_id_string in chosen_replica_id_strings]]


class TracedCountingPrefixRouter(llm.TracedPrefixCacheAffinityRouter, CountingPrefixRouter):
    """The traced router over the counting one (C3 puts CountingPrefixRouter just above Ray's)."""
