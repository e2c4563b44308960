"""The traced prefix-aware router's parts that need no cluster
(routers.llm): prefix groups and their key, its configuration, the prompt
attributes it records, what it imports and what it relies on in Ray.
Its decisions' reasons, on real Serve: tests/test_ground_truth.py."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from routelens.routers import llm
from routelens.routers.faults import faults
from routelens.routers.testing import make_request

SYSTEM = "You are a careful assistant. Answer in one paragraph, cite nothing, and say when you do not know. " * 2


def build_router(**router_kwargs):
    """The traced router as Ray builds it, untraced (no exporter), its tree actor a stand-in:
    initialize_state then reaches no cluster."""
    router = llm.TracedPrefixCacheAffinityRouter(
        deployment_id=DeploymentID(name="llm", app_name="llm"), handle_source=DeploymentHandleSource.UNKNOWN,
        self_actor_id="OFFLINE", self_node_id="node-0", use_replica_queue_len_cache=True)
    router._routelens = None
    tree = object()
    router.initialize_state(tree_actor=tree, **router_kwargs)
    return router, tree


def request_with(**fields):
    """A request whose first argument carries a prompt or messages, as an OpenAI-style request does."""
    pr = make_request()
    pr.args.append(SimpleNamespace(**fields))
    return pr


def test_requests_sharing_their_first_n_characters_share_a_group_and_no_text_is_kept():
    groups = llm.PrefixGroups(chars=len(SYSTEM))
    first = groups.attributes(SYSTEM + "What is a prefix cache?")
    second = groups.attributes(SYSTEM + "Why route by prefix?")
    other = groups.attributes(SYSTEM.replace("careful", "cheerful") + "What is a prefix cache?")
    assert first["prefix_group"] == second["prefix_group"] != other["prefix_group"]
    assert first["prompt_chars"] == len(SYSTEM) + len("What is a prefix cache?")
    assert len(first["prefix_group"]) == llm.PREFIX_GROUP_HEX_DIGITS
    assert all(word not in first["prefix_group"] for word in ("careful", "assistant"))
    # Shorter prefixes group more: past the first N characters nothing counts.
    assert llm.PrefixGroups(chars=5).group("Hello there") == llm.PrefixGroups(chars=5).group("Hello world")


def test_the_key_changes_every_group():
    assert llm.PrefixGroups().group(SYSTEM) != llm.PrefixGroups(key="a secret of the cluster's").group(SYSTEM)


def test_imports_stay_light_and_every_process_groups_alike_by_default():
    """In a fresh process (another proxy, the driver, a replica): `routelens.routers` imports no `ray.llm`,
    the LLM routers' module no vLLM nor SGLang, and with no key given a prompt gets the same group."""
    code = ("import sys, routelens.routers; print('ray.llm' in sys.modules); "
            "from routelens.routers.llm import PrefixGroups; print(any(m in sys.modules for m in ('vllm', 'sglang'))); "
            f"print(PrefixGroups().group({SYSTEM!r}))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.split() == ["False", "False", llm.PrefixGroups().group(SYSTEM)]


def test_kwargs_win_over_the_environment_and_bad_values_fall_back_to_the_defaults():
    environ = {llm.PREFIX_KEY_ENV: "cluster key", llm.PREFIX_CHARS_ENV: "12"}
    from_env = llm.prefix_groups(environ=environ)
    assert (from_env.chars, from_env.group(SYSTEM)) == (12, llm.PrefixGroups("cluster key", 12).group(SYSTEM))
    from_kwargs = llm.prefix_groups("router key", 40, environ=environ)
    assert (from_kwargs.chars, from_kwargs.group(SYSTEM)) == (40, llm.PrefixGroups("router key", 40).group(SYSTEM))
    for key, chars in (("", -1), (12, "twelve"), (None, 2.5), (None, True)):
        before = faults.total
        fallback = llm.prefix_groups(key, chars, environ={})
        assert faults.total > before, (key, chars)
        assert fallback.chars == llm.DEFAULT_PREFIX_CHARS
        assert fallback.group(SYSTEM) == llm.PrefixGroups().group(SYSTEM)


def test_the_router_takes_its_own_kwargs_and_records_prompt_length_and_group():
    router, tree = build_router(prefix_key="router key", prefix_chars=len(SYSTEM), match_rate_threshold=0.25)
    # The rest reached Ray's router (which takes no prefix_key: it would have raised).
    assert router._match_rate_threshold == 0.25 and router._tree_actor._actor is tree
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    attributes = router.routelens_request_attributes(request_with(messages=messages))
    assert attributes == {"prompt_chars": len(SYSTEM) + 2,
                          "prefix_group": llm.PrefixGroups("router key", len(SYSTEM)).group(SYSTEM)}
    # The same text as a prompt: the router reads both alike, and so do the groups.
    assert router.routelens_request_attributes(request_with(prompt=SYSTEM + "hi")) == attributes
    # Without arguments a request has no prompt (Ray's router routes it by pow-2).
    assert router.routelens_request_attributes(make_request()) is None


def test_prefix_chars_zero_records_prompt_lengths_only():
    router, _ = build_router(prefix_chars=0)
    assert router.routelens_request_attributes(request_with(prompt=SYSTEM)) == {"prompt_chars": len(SYSTEM)}


def test_everything_it_relies_on_in_rays_router_is_there():
    problems = {item.qualname: item.problems() for item in llm.CONTRACT if item.problems()}
    assert not problems, problems
    assert llm.REASONS and llm.PROMPTS
