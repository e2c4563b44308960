"""Ray's prefix-cache-aware router, traced: why each decision went where it
went, and which requests share a prompt prefix.

    from routelens.routers.llm import TracedPrefixCacheAffinityRouter

Ray 2.60 ships `PrefixCacheAffinityRouter` in `ray.llm`. Its public name,
`ray.serve.llm.request_router`, cannot be imported without vLLM or SGLang;
the private module that defines it needs neither, so routelens imports it
from there (routers.prefix_aware declares what it relies on). These modules
are imported only by whoever names the router, so that `import
routelens.routers` never imports `ray.llm`.

`TracedPrefixCacheAffinityRouter` records, for each decision, the branch
Ray's router took (`routelens_explain`, docs/design.md) and its match rate;
and, per request, its prompt's length and prefix group
(`routelens_request_attributes`): a keyed hash of the prompt's first
`prefix_chars` characters, so that requests sharing a prefix can be grouped
without storing any text (docs/llm.md says what the key hides and what not).

Ray ships a router class by value together with this module's globals: this
module holds no state and refers to routers.prefix_aware, where the state
lives, as a module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from . import prefix_aware
from .mixin import TracingMixin


class PrefixAffinityReasons:
    """Mixed in between TracingMixin and a PrefixCacheAffinityRouter (or a
    subclass of it): records each decision's branch and match rate, and each
    request's prompt length and prefix group. Takes `prefix_key` and
    `prefix_chars` from `request_router_kwargs`; the rest goes to the router."""

    _routelens_prefixes = prefix_aware.PrefixGroups()

    def initialize_state(self, prefix_key: Any = None, prefix_chars: Any = None, **kwargs: Any):
        self._routelens_prefixes = prefix_aware.prefix_groups(prefix_key, prefix_chars)
        result = super().initialize_state(**kwargs)
        if prefix_aware.REASONS:
            self._tree_actor = prefix_aware.NotedTree(self._tree_actor)
        return result

    def routelens_prompt_attributes(self, pending_request: Any) -> Optional[Dict[str, Any]]:
        """The request's prompt length and prefix group; None for a request
        without arguments, which has no prompt (the router routes it by pow-2)."""
        if not prefix_aware.PROMPTS or not pending_request.args:
            return None
        return self._routelens_prefixes.attributes(self._extract_text_from_request(pending_request))

    if prefix_aware.REASONS:

        async def choose_replicas(self, candidate_replicas: List[Any], pending_request: Any = None):
            seen: Dict[str, Any] = {}
            token = prefix_aware.SEEN.set(seen)
            try:
                ranks = await super().choose_replicas(candidate_replicas, pending_request)
            finally:
                prefix_aware.SEEN.reset(token)
            prefix_aware.explain(self, seen)
            return ranks

        async def _prefix_match_best_replicas(self, pending_request: Any, candidate_replicas: List[Any]):
            chosen = await super()._prefix_match_best_replicas(pending_request, candidate_replicas)
            prefix_aware.note_chosen(pending_request, chosen)
            return chosen


class TracedPrefixCacheAffinityRouter(TracingMixin, PrefixAffinityReasons, PrefixCacheAffinityRouter):
    """Ray's PrefixCacheAffinityRouter, traced, each decision with its branch
    and match rate, each request with its prompt length and prefix group.

    To trace a subclass of PrefixCacheAffinityRouter alike:
    `class Traced(TracedPrefixCacheAffinityRouter, YourSubclass): pass`."""

    # Here rather than in the mixin: TracingMixin, first in the MRO, has its own (which records nothing).
    def routelens_request_attributes(self, pending_request: Any) -> Optional[Dict[str, Any]]:
        return self.routelens_prompt_attributes(pending_request)
