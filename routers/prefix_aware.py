"""What the traced prefix-aware router (routers.llm) runs on: prefix groups
and their key, what it relies on in Ray's router, and how a decision's
branch is learnt. Here rather than in routers.llm because Ray pickles a
router's module by value, its globals with it (RequestRouterConfig): this
module is pickled by reference, so that its state (a ContextVar, the fault
log) stays in each process, and routers.llm refers to it as a module.

How a branch is known without changing Ray's code: the router's prefix-tree
actor handle is wrapped (NotedTree) so that, within the decision being made
(SEEN, set per choose_replicas call), the calls that decide a branch
(`prefix_match`, `get_smallest_tenants`) are noted; once the wrapped router
has chosen, its branch follows from which of them it made, what it chose,
and the prefix match it saw (`branch`). That match is read back with
`ray.get(ref, timeout=0)`: the router has already fetched it, so this
returns at once and can never wait.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from .faults import faults
from .ray_contract import PrivateFunction

# -- prefix groups ------------------------------------------------------------
# The default key: published here and in docs/llm.md, so that every process of
# a cluster (proxies, driver, replicas) groups alike without being told one.
# Anyone can hash a guessed prompt with it: a secret key is `prefix_key`.
DEFAULT_PREFIX_KEY = "routelens-prefix-groups"
DEFAULT_PREFIX_CHARS = 128
PREFIX_GROUP_HEX_DIGITS = 16  # 64 bits: no two of a deployment's prefixes collide in practice
PREFIX_KEY_ENV = "ROUTELENS_PREFIX_KEY"
PREFIX_CHARS_ENV = "ROUTELENS_PREFIX_CHARS"


class PrefixGroups:
    """Prefix groups: the keyed hash (HMAC-BLAKE2b) of a prompt's first `chars`
    characters, as 16 hex digits. `chars` 0: no groups, prompt lengths only."""

    def __init__(self, key: Union[str, bytes] = DEFAULT_PREFIX_KEY, chars: int = DEFAULT_PREFIX_CHARS):
        self._key = key.encode() if isinstance(key, str) else bytes(key)
        self.chars = chars

    def group(self, text: str) -> str:
        prefix = text[:self.chars].encode("utf-8", "surrogatepass")
        return hmac.digest(self._key, prefix, hashlib.blake2b).hex()[:PREFIX_GROUP_HEX_DIGITS]

    def attributes(self, text: str) -> Dict[str, Any]:
        """What is recorded of a prompt: its length, and its prefix group unless groups are off."""
        if not self.chars:
            return {"prompt_chars": len(text)}
        return {"prompt_chars": len(text), "prefix_group": self.group(text)}


def prefix_groups(prefix_key: Any = None, prefix_chars: Any = None,
                  environ: Optional[Mapping[str, str]] = None) -> PrefixGroups:
    """PrefixGroups from `request_router_kwargs` (first) or ROUTELENS_PREFIX_*
    (second), else the defaults. A bad value is logged and replaced by its
    default, never raised: this runs in initialize_state."""
    environ = os.environ if environ is None else environ
    key = prefix_key if prefix_key is not None else environ.get(PREFIX_KEY_ENV)
    if key is not None and (not isinstance(key, (str, bytes)) or not key):
        faults.record("reading the prefix key", ValueError(f"prefix_key must be a non-empty string, not {key!r}"))
        key = None
    given = prefix_chars if prefix_chars is not None else environ.get(PREFIX_CHARS_ENV)
    chars = None
    if given is not None:
        try:
            if isinstance(given, (bool, float)) or int(given) < 0:
                raise ValueError
            chars = int(given)
        except (TypeError, ValueError):
            faults.record("reading prefix_chars", ValueError(
                f"prefix_chars must be a whole number of characters, 0 or more, not {given!r}"))
    return PrefixGroups(DEFAULT_PREFIX_KEY if key is None else key,
                        DEFAULT_PREFIX_CHARS if chars is None else chars)


# -- what this module relies on in Ray's router (docs/design.md, "Ray's private contract") --
# The helper each decision's branch is taken in, and the tree calls that decide it.
PREFIX_MATCH_BEST = PrivateFunction(
    PrefixCacheAffinityRouter, "PrefixCacheAffinityRouter._prefix_match_best_replicas",
    parameters=("pending_request", "candidate_replicas"),
    uses=("_tree_actor", "prefix_match", "get_smallest_tenants", "_match_rate_threshold", "_imbalanced_threshold"))
CHOOSE = PrivateFunction(PrefixCacheAffinityRouter, "PrefixCacheAffinityRouter.choose_replicas",
                         uses=("_prefix_match_best_replicas",))
INITIALIZE = PrivateFunction(PrefixCacheAffinityRouter, "PrefixCacheAffinityRouter.initialize_state",
                             uses=("_tree_actor", "_match_rate_threshold", "_imbalanced_threshold"))
EXTRACT_TEXT = PrivateFunction(PrefixCacheAffinityRouter, "PrefixCacheAffinityRouter._extract_text_from_request",
                               parameters=("pending_request",))
CONTRACT = (PREFIX_MATCH_BEST, CHOOSE, INITIALIZE, EXTRACT_TEXT)
# Without it (another Ray), decisions carry no reason; prompt attributes need only EXTRACT_TEXT.
REASONS = PREFIX_MATCH_BEST.holds() and CHOOSE.holds() and INITIALIZE.holds()
PROMPTS = EXTRACT_TEXT.holds()

# The branches of PrefixCacheAffinityRouter (the reasons recorded), in its order.
PREFIX_MATCH = "prefix_match"  # load balanced, match rate at the threshold or above: the replicas holding the prefix
SMALLEST_TENANT = "smallest_tenant"  # load balanced, match rate below the threshold: the replicas holding least
POW2_IMBALANCED = "pow2_imbalanced"  # queue lengths further apart than imbalanced_threshold: power of two
POW2_LOW_MATCH_RATE = "pow2_low_match_rate"  # match rate below the threshold and no smallest tenant: power of two
POW2_NO_MATCH = "pow2_no_match"  # match rate at the threshold or above, yet no candidate holds it: power of two
POW2_NO_PROMPT = "pow2_no_prompt"  # a request without arguments: power of two
POW2_UNCONSULTED = "pow2_unconsulted"  # the prefix tree was not consulted (no candidate left): power of two
REASONS_ALL = (PREFIX_MATCH, SMALLEST_TENANT, POW2_IMBALANCED, POW2_LOW_MATCH_RATE, POW2_NO_MATCH, POW2_NO_PROMPT,
               POW2_UNCONSULTED)

# What the decision being made saw: set per choose_replicas call. A ContextVar
# because Ray runs many routing tasks at once on one loop, and each task's
# awaits interleave with the others'; asyncio gives each task its own context.
SEEN: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar("routelens_prefix_seen",
                                                                                 default=None)


class _NotedCall:
    """One of the tree actor's methods whose calls are noted in the decision being made."""

    def __init__(self, method: Any, name: str):
        self._method, self._name = method, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        ref = self._method.remote(*args, **kwargs)
        seen = SEEN.get()
        if seen is not None:
            seen[self._name] = (ref, args)
        return ref


class NotedTree:
    """The router's prefix-tree actor handle, the two calls that decide a
    branch noted; everything else passes through."""

    NOTED = ("prefix_match", "get_smallest_tenants")

    def __init__(self, actor: Any):
        self._actor = actor

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._actor, name)
        return _NotedCall(attribute, name) if name in self.NOTED else attribute


def note_chosen(pending_request: Any, chosen: List[List[Any]]) -> None:
    """The router's helper ran for the decision being made, and chose `chosen`."""
    seen = SEEN.get()
    if seen is not None:
        seen["consulted"] = True
        seen["prompt"] = pending_request is not None and bool(pending_request.args)
        seen["chosen"] = bool(chosen and chosen[0])


def branch(seen: Dict[str, Any], match_rate_threshold: float,
           imbalanced_threshold: float) -> Tuple[str, Dict[str, float]]:
    """The branch the router took in the decision that saw `seen`, and its scores."""
    if not seen.get("consulted"):
        return POW2_UNCONSULTED, {}
    if not seen["prompt"]:
        return POW2_NO_PROMPT, {}
    if "prefix_match" not in seen:  # it looked at the queue lengths and went no further
        return POW2_IMBALANCED, {"imbalanced_threshold": imbalanced_threshold}
    ref, (text, *_) = seen["prefix_match"]
    matched_text, _tenants = ray.get(ref, timeout=0)  # fetched already by the router: never waits
    scores = {"match_rate": len(matched_text) / len(text), "match_rate_threshold": match_rate_threshold}
    if "get_smallest_tenants" in seen:  # below the threshold
        return (SMALLEST_TENANT if seen["chosen"] else POW2_LOW_MATCH_RATE), scores
    return (PREFIX_MATCH if seen["chosen"] else POW2_NO_MATCH), scores


def explain(router: Any, seen: Dict[str, Any]) -> None:
    """Attach the decision's branch and scores to it (routelens_explain); never raises."""
    try:
        reason, scores = branch(seen, router._match_rate_threshold, router._imbalanced_threshold)
        router.routelens_explain(reason, **scores)
    except Exception as exc:
        faults.record("explaining a prefix-aware decision", exc)
