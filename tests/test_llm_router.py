"""The traced prefix-aware router's parts that need no cluster
(routers.llm, routers.prefix_aware): prefix groups and their key, its configuration, the prompt
attributes it records, what it imports and what it relies on in Ray.
Its decisions' reasons, on real Serve: tests/test_ground_truth.py."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from types import SimpleNamespace

import httpx
import pytest
from ray import cloudpickle
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.config import RequestRouterConfig
from sqlalchemy import select

from routelens.collector.query import prefixes
from routelens.collector.query.figures import scope
from routelens.collector.query.filters import Filters
from routelens.collector.settings import Settings
from routelens.collector.store.models import PREFIX_BLOCK_S, PREFIX_GRAINS, PREFIX_ROLLUP_VALUES, prefix_rollups
from routelens.dashboard.components import number, percent
from routelens.dashboard.up import create_up_app
from routelens.routers import llm, prefix_aware
from routelens.routers.faults import faults
from routelens.routers.prefix_aware import PrefixGroups
from routelens.routers.testing import make_request
from tests.support.browser import downloaded, shown_rows, shown_text
from tests.support.collector_app import Collector
from tests.support.collector_server import CollectorServer
from tests.support.wire_source import WireSource

SYSTEM = "You are a careful assistant. Answer in one paragraph, cite nothing, and say when you do not know. " * 2


def build_router(router_class=llm.TracedPrefixCacheAffinityRouter, **router_kwargs):
    """The traced router as Ray builds it, untraced (no exporter), its tree actor a stand-in:
    initialize_state then reaches no cluster."""
    router = router_class(
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
    groups = PrefixGroups(chars=len(SYSTEM))
    first = groups.attributes(SYSTEM + "What is a prefix cache?")
    second = groups.attributes(SYSTEM + "Why route by prefix?")
    other = groups.attributes(SYSTEM.replace("careful", "cheerful") + "What is a prefix cache?")
    assert first["prefix_group"] == second["prefix_group"] != other["prefix_group"]
    assert first["prompt_chars"] == len(SYSTEM) + len("What is a prefix cache?")
    assert len(first["prefix_group"]) == prefix_aware.PREFIX_GROUP_HEX_DIGITS
    assert all(word not in first["prefix_group"] for word in ("careful", "assistant"))
    # Shorter prefixes group more: past the first N characters nothing counts.
    assert PrefixGroups(chars=5).group("Hello there") == PrefixGroups(chars=5).group("Hello world")


def test_the_key_changes_every_group():
    assert PrefixGroups().group(SYSTEM) != PrefixGroups(key="a secret of the cluster's").group(SYSTEM)


def test_imports_stay_light_and_every_process_groups_alike_by_default():
    """In a fresh process (another proxy, the driver, a replica): `routelens.routers` imports no `ray.llm`,
    the LLM routers' module no vLLM nor SGLang, and with no key given a prompt gets the same group."""
    code = ("import sys, routelens.routers; print('ray.llm' in sys.modules); "
            "from routelens.routers import llm, prefix_aware; "
            "print(any(m in sys.modules for m in ('vllm', 'sglang'))); "
            f"print(prefix_aware.PrefixGroups().group({SYSTEM!r}))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.split() == ["False", "False", PrefixGroups().group(SYSTEM)]


def test_kwargs_win_over_the_environment_and_bad_values_fall_back_to_the_defaults():
    environ = {prefix_aware.PREFIX_KEY_ENV: "cluster key", prefix_aware.PREFIX_CHARS_ENV: "12"}
    from_env = prefix_aware.prefix_groups(environ=environ)
    assert (from_env.chars, from_env.group(SYSTEM)) == (12, PrefixGroups("cluster key", 12).group(SYSTEM))
    from_kwargs = prefix_aware.prefix_groups("router key", 40, environ=environ)
    assert (from_kwargs.chars, from_kwargs.group(SYSTEM)) == (40, PrefixGroups("router key", 40).group(SYSTEM))
    for key, chars in (("", -1), (12, "twelve"), (None, 2.5), (None, True)):
        before = faults.total
        fallback = prefix_aware.prefix_groups(key, chars, environ={})
        assert faults.total > before, (key, chars)
        assert fallback.chars == prefix_aware.DEFAULT_PREFIX_CHARS
        assert fallback.group(SYSTEM) == PrefixGroups().group(SYSTEM)


def test_the_router_takes_its_own_kwargs_and_records_prompt_length_and_group():
    async def check():  # as Ray builds routers and requests: on a running loop
        router, tree = build_router(prefix_key="router key", prefix_chars=len(SYSTEM), match_rate_threshold=0.25)
        # The rest reached Ray's router (which takes no prefix_key: it would have raised).
        assert router._match_rate_threshold == 0.25 and router._tree_actor._actor is tree
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
        attributes = router.routelens_request_attributes(request_with(messages=messages))
        assert attributes == {"prompt_chars": len(SYSTEM) + 2,
                              "prefix_group": PrefixGroups("router key", len(SYSTEM)).group(SYSTEM)}
        # The same text as a prompt: the router reads both alike, and so do the groups.
        assert router.routelens_request_attributes(request_with(prompt=SYSTEM + "hi")) == attributes
        # Without arguments a request has no prompt (Ray's router routes it by pow-2).
        assert router.routelens_request_attributes(make_request()) is None

    asyncio.run(check())


def test_prefix_chars_zero_records_prompt_lengths_only():
    async def check():
        router, _ = build_router(prefix_chars=0)
        assert router.routelens_request_attributes(request_with(prompt=SYSTEM)) == {"prompt_chars": len(SYSTEM)}

    asyncio.run(check())


def test_ray_can_ship_it_as_it_ships_routers():
    """Ray pickles a router's class with its module by value, globals and all (RequestRouterConfig), and
    every process that routes builds it from that. (In this process the load gives back the class itself.)"""
    config = RequestRouterConfig(request_router_class="routelens.routers.llm:TracedPrefixCacheAffinityRouter")
    shipped = cloudpickle.loads(config.get_serialized_request_router_cls())

    async def check():
        router, _ = build_router(shipped, prefix_key="router key", prefix_chars=len(SYSTEM))
        assert router.routelens_request_attributes(request_with(prompt=SYSTEM)) == {
            "prompt_chars": len(SYSTEM), "prefix_group": PrefixGroups("router key", len(SYSTEM)).group(SYSTEM)}

    asyncio.run(check())


def test_the_branches_taken_before_the_prefix_tree_is_asked():
    """The fallbacks that never reach the tree (the others, on real Serve: tests/test_ground_truth.py)."""
    assert prefix_aware.branch({}, 0.1, 2) == (prefix_aware.POW2_UNCONSULTED, {})
    assert prefix_aware.branch({"consulted": True, "prompt": False, "chosen": False}, 0.1, 2) == (
        prefix_aware.POW2_NO_PROMPT, {})
    assert prefix_aware.branch({"consulted": True, "prompt": True, "chosen": False}, 0.1, 2) == (
        prefix_aware.POW2_IMBALANCED, {"imbalanced_threshold": 2})


def test_everything_it_relies_on_in_rays_router_is_there():
    problems = {item.qualname: item.problems() for item in prefix_aware.CONTRACT if item.problems()}
    assert not problems, problems
    assert prefix_aware.REASONS and prefix_aware.PROMPTS


# --- the Prefix affinity figures (collector.query.prefixes), on each backend ---

REPLICAS = ("llm-r1", "llm-r2", "llm-r3")
T0 = 1_779_998_400.0  # a whole hour: the window below is two whole minutes from here


def prefix_scenario(t0: float = T0):
    """Requests of three prefix groups over two minutes from `t0` (a whole minute), as the traced router
    records them: (the batch, the truth of what was routed where per group and per minute, the match rates
    recorded per group)."""
    source = WireSource("llm-source", app="llm", deployment="FakeLLM",
                        router_class="routelens.routers.llm.TracedPrefixCacheAffinityRouter")
    placements = {  # group -> the replica of each of its requests, minute by minute
        "group-a": [["llm-r1"] * 5, ["llm-r1"] * 4 + ["llm-r2"]],
        "group-b": [["llm-r2", "llm-r3", "llm-r2"], ["llm-r3"]],
        "group-c": [[], ["llm-r3"]],
    }
    events, truth, rates = [source.replicas(t0, REPLICAS)], defaultdict(Counter), defaultdict(list)
    number = 0
    for group, minutes in placements.items():
        for minute, replicas in enumerate(minutes):
            for replica in replicas:
                number += 1
                ts = t0 + 60 * minute + number * 0.1
                rate = (number % 4) / 4
                reason = prefix_aware.PREFIX_MATCH if rate >= 0.1 else prefix_aware.SMALLEST_TENANT
                decision = source.decision(ts, [[replica]], request_id=f"r{number}", internal_request_id=f"i{number}",
                                           reason=reason, scores={"match_rate": rate, "match_rate_threshold": 0.1})
                decision["attributes"] = {"prompt_chars": 300 + number, "prefix_group": group}
                events += [decision, source.routed(ts + 0.01, replica, decision)]
                truth[group, minute][replica] += 1
                rates[group].append(rate)
    # Left out: a request without a group, one handed a replica another request's decision found,
    # and one outside the window.
    plain = source.decision(t0 + 1, [["llm-r1"]], request_id="plain", internal_request_id="plain")
    handed = source.decision(t0 + 2, [["llm-r2"]], request_id="handed", internal_request_id="handed")
    handed["attributes"] = {"prompt_chars": 10, "prefix_group": "group-a"}
    late = source.decision(t0 + 200, [["llm-r3"]], request_id="late", internal_request_id="late")
    late["attributes"] = {"prompt_chars": 10, "prefix_group": "group-a"}
    events += [plain, source.routed(t0 + 1.01, "llm-r1", plain), handed,
               source.routed(t0 + 2.01, "llm-r2", handed, own_ranking=False, request_id="other",
                             internal_request_id="other"), late, source.routed(t0 + 200.01, "llm-r3", late)]
    return source.batch(events), truth, rates


def _backend_collector(request, tmp_path_factory, batches):
    """A collector on the backend of the fixture's parameter, holding `batches`; closed (and its PostgreSQL
    database dropped) once the generator resumes."""
    if request.param == "sqlite":
        url, server = f"sqlite:///{tmp_path_factory.mktemp('prefixes') / 'routelens.db'}", None
    else:
        server = request.getfixturevalue("postgres")
        url = server.new_database()
    collector = Collector(url)
    for batch in batches:
        collector.store(batch)
    yield collector
    collector.close()
    if server is not None:
        server.drop(url)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def prefix_api(request, tmp_path_factory):
    batch, truth, rates = prefix_scenario()
    for collector in _backend_collector(request, tmp_path_factory, [batch]):
        yield collector, truth, rates


def test_prefix_affinity_per_group_per_deployment_and_over_time(prefix_api):
    api, truth, rates = prefix_api
    got = api.get("/v1/prefix-affinity", since=T0, until=T0 + 120)
    by_group = defaultdict(Counter)
    for (group, _minute), counts in truth.items():
        by_group[group].update(counts)
    assert [g["prefix_group"] for g in got["groups"]] == sorted(by_group, key=lambda g: -sum(by_group[g].values()))
    for group in got["groups"]:
        counts = by_group[group["prefix_group"]]
        top_replica, top = counts.most_common(1)[0]
        assert (group["app"], group["deployment"]) == ("llm", "FakeLLM")
        assert group["requests"] == sum(counts.values()) and group["replicas"] == len(counts)
        assert (group["top_replica_id"], group["top_share"]) == (top_replica, top / sum(counts.values()))
        assert {r["replica_id"]: r["routed"] for r in group["by_replica"]} == dict(counts)
        group_rates = rates[group["prefix_group"]]
        assert group["match_rate_mean"] == pytest.approx(sum(group_rates) / len(group_rates))
    (deployment,) = got["deployments"]
    shares = [max(c.values()) / sum(c.values()) for c in by_group.values()]
    assert deployment["concentration"] == pytest.approx(sum(shares) / len(shares))
    assert (deployment["groups"], deployment["split_groups"]) == (3, sum(len(c) > 1 for c in by_group.values()))
    assert deployment["requests"] == sum(sum(c.values()) for c in by_group.values())
    all_rates = [r for group_rates in rates.values() for r in group_rates]
    assert deployment["match_rate_mean"] == pytest.approx(sum(all_rates) / len(all_rates))
    assert got["total"] == {k: v for k, v in deployment.items() if k not in ("app", "deployment")}  # one deployment
    # Per minute: the groups seen in it, and those split across replicas within it.
    assert got["step_s"] == 60
    for point in got["over_time"]:
        minute = int((point["t"] - T0) // 60)
        in_minute = [counts for (group, m), counts in truth.items() if m == minute and counts]
        assert (point["groups"], point["split_groups"]) == (len(in_minute), sum(len(c) > 1 for c in in_minute))
        assert point["requests"] == sum(sum(c.values()) for c in in_minute)
    assert [p["t"] for p in got["over_time"]] == [T0, T0 + 60]


def test_prefix_affinity_follows_the_filters(prefix_api):
    api, truth, rates = prefix_api
    on_r3 = api.get("/v1/prefix-affinity", since=T0, until=T0 + 120, replica="llm-r3")
    assert {g["prefix_group"]: g["requests"] for g in on_r3["groups"]} == {
        group: n for group in ("group-a", "group-b", "group-c")
        if (n := sum(truth[group, m]["llm-r3"] for m in (0, 1)))}
    # By the routers' reasons: only the requests their decisions of that reason routed (rate 0: smallest tenant).
    by_tenant = api.get("/v1/prefix-affinity", since=T0, until=T0 + 120, reason=prefix_aware.SMALLEST_TENANT)
    assert by_tenant["total"]["requests"] == sum(rate == 0 for group_rates in rates.values() for rate in group_rates)
    assert by_tenant["total"]["match_rate_mean"] == 0
    nothing = api.get("/v1/prefix-affinity", since=T0, until=T0 + 120, app="another")
    assert nothing["groups"] == nothing["deployments"] == nothing["over_time"] == []
    assert api.http.get("/v1/prefix-affinity", params={"since": "yesterday"}).status_code == 422


# --- Prefix affinity from `prefix_rollups`, against the same figures from raw rows ---

T1 = T0 + 86_400  # a whole hour, a day after the scenario above
WEEK_EDGE = (T1 // PREFIX_BLOCK_S + 1) * PREFIX_BLOCK_S  # where a block of quarter days ends, 5.2 days after T1
SPREAD = 300  # requests spread over 9 days, across WEEK_EDGE


def rollup_scenario():
    """Three hours of requests of six prefix groups, and a few more over nine days, in shuffled batches, as a
    collector may receive them: some routed events in a batch before their decision's, a batch sent twice,
    decisions without a group or a match rate, hand-offs. (batches, the reasons every decision has)."""
    rng = random.Random(7)
    source = WireSource("llm-rollups", app="llm", deployment="FakeLLM",
                        router_class="routelens.routers.llm.TracedPrefixCacheAffinityRouter")
    reasons = (prefix_aware.PREFIX_MATCH, prefix_aware.SMALLEST_TENANT)
    pairs = []
    for n in range(600 + SPREAD):
        ts = T1 - 1800 + rng.uniform(0, 3 * 3600) if n < 600 else T1 + rng.uniform(-3, 6) * 86400
        replica = rng.choice(REPLICAS)
        scores = {"match_rate": rng.random()} if n % 5 else None
        decision = source.decision(ts, [[replica]], request_id=f"q{n}", internal_request_id=f"q{n}",
                                   reason=reasons[n % 2], scores=scores)
        if n % 7:
            decision["attributes"] = {"prompt_chars": rng.randrange(10, 5000), "prefix_group": f"g{n % 6}"}
        routed_event = source.routed(ts + 0.01, replica, decision, own_ranking=n % 11 != 0)
        pairs.append((decision, routed_event))
    rng.shuffle(pairs)
    chunks = [pairs[start:start + 60] for start in range(0, len(pairs), 60)]
    batches = []
    for index, chunk in enumerate(chunks):
        events = [event for pair in chunk for event in pair]
        if index + 1 < len(chunks):  # a few of the next batch's routed events come before their decisions
            events += [routed_event for _, routed_event in chunks[index + 1][:5]]
        batches.append(source.batch(events))
    return [source.batch([source.replicas(T1 - 3600, REPLICAS)]), *batches, batches[3]], reasons


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def rollup_collector(request, tmp_path_factory):
    batches, reasons = rollup_scenario()
    for collector in _backend_collector(request, tmp_path_factory, batches):
        yield collector, reasons, batches


def _approx(value):
    """JSON-like figures, each float to be compared within a relative 1e-9: sums added in another order differ
    in their last digits (a rounding to fixed digits would not do: two such sums may round apart)."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-9)
    if isinstance(value, dict):
        return {key: _approx(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_approx(item) for item in value]
    return value


def _sums(rows) -> list:
    """Rows of sums, sorted (by their keys, which come first), a sum of no value (SQL's NULL) as 0, as the
    figures count it."""
    return sorted([0.0 if value is None else value for value in row] for row in rows)


@pytest.mark.parametrize("since, until", [
    (T1 - 1800, T1 + 3 * 3600),  # whole minutes: from the rollups alone
    (T1 + 17.5, T1 + 7000.25),  # seconds at both edges from raw rows
    (T1 - 20 * 3600 + 30, T1 + 4 * 3600),  # a day: steps of an hour, from hourly rows
    (T1 + 10, T1 + 50),  # within a minute: raw rows only
    (T1 + 600, T1 + 4200),  # steps of two minutes, from minute rows
    (WEEK_EDGE - 5 * 86400 - 61.5, WEEK_EDGE + 2 * 86400 - 3630.25),  # a week: quarter days, two blocks
    (T1 - 3 * 86400 + 7.5, T1 + 6 * 86400),  # nine days: steps of half a day, from quarter days
])
def test_prefix_affinity_from_rollups_is_what_raw_rows_give(rollup_collector, since, until):
    collector, reasons, _ = rollup_collector
    f = Filters(since=since, until=until)
    # Every decision has one of these reasons: filtered by them, the figures read raw rows throughout.
    raw = Filters(since=since, until=until, reasons=reasons)
    with collector.engine.connect() as connection:
        from_rollups = prefixes.prefix_affinity(connection, f)
        from_raw = prefixes.prefix_affinity(connection, raw)
        # The rollups' own rows, per minute, hour and quarter day, are the raw rows' sums.
        whole = Filters(since=T1 - 4 * 86400, until=T1 + 7 * 86400)
        sc = scope(connection, whole)
        for grain in PREFIX_GRAINS:
            own = select(*(prefix_rollups.c[name] for name in ("router_pk", "prefix_group", "replica_pk", "start",
                                                                *PREFIX_ROLLUP_VALUES)))
            assert _sums(connection.execute(own.where(prefix_rollups.c.grain == grain))) == _approx(_sums(
                prefixes._raw_rows(connection, whole, sc, grain)))
    assert from_rollups["total"]["requests"] > 0 or until - since < 60
    from_raw["window"] = from_rollups["window"]  # the reasons filter aside, the same window
    assert from_rollups == _approx(from_raw)


def test_prefix_rollups_count_a_resent_batch_once(rollup_collector):
    collector, _, batches = rollup_collector
    whole = {"since": T1 - 4 * 86400, "until": T1 + 7 * 86400}
    before = collector.get("/v1/prefix-affinity", **whole)
    for batch in batches:  # every batch again
        assert collector.store(batch)["stored"] == 0
    assert collector.get("/v1/prefix-affinity", **whole) == before
    # Requests with a group, not handed another request's replica, whose decision is stored: all counted.
    assert before["total"]["requests"] == sum(1 for n in range(600 + SPREAD) if n % 7 and n % 11)


def two_routers_scenario():
    """A deployment whose router changed class during a week (two routers of one deployment), both routing
    the same three prefix groups over the same replicas, as they may in a rollout."""
    rng = random.Random(11)
    batches = []
    for name, router_class in (("old", "routelens.routers.llm.TracedPrefixCacheAffinityRouter"),
                               ("new", "my_routers.KVAwareRouter")):
        source = WireSource(f"llm-{name}", app="llm", deployment="FakeLLM", router_class=router_class)
        events = []
        for n in range(200):
            ts = T1 + rng.uniform(0, 6) * 86400
            decision = source.decision(ts, [[rng.choice(REPLICAS)]], request_id=f"{name}{n}",
                                       reason=prefix_aware.PREFIX_MATCH, scores={"match_rate": rng.random()})
            decision["attributes"] = {"prompt_chars": 100, "prefix_group": f"g{n % 3}"}
            events += [decision, source.routed(ts + 0.01, decision["ranks"][0][0], decision)]
        batches.append(source.batch(events))
    return batches


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def two_routers_collector(request, tmp_path_factory):
    yield from _backend_collector(request, tmp_path_factory, two_routers_scenario())


@pytest.mark.parametrize("since, until", [
    (T1 - 3600, T1 + 7 * 86400 - 3600),  # a week: steps of a quarter day, read as stored
    (T1 - 2 * 86400, T1 + 7 * 86400),  # nine days: steps of half a day
])
def test_a_groups_requests_under_two_routers_of_its_deployment_add_up_per_step(two_routers_collector,
                                                                                 since, until):
    raw = Filters(since=since, until=until, reasons=(prefix_aware.PREFIX_MATCH,))  # raw rows throughout
    with two_routers_collector.engine.connect() as connection:
        from_rollups = prefixes.prefix_affinity(connection, Filters(since=since, until=until))
        from_raw = prefixes.prefix_affinity(connection, raw)
        assert len(scope(connection, raw).routers) == 2 and from_rollups["total"]["groups"] == 3
    from_raw["window"] = from_rollups["window"]
    assert from_rollups == _approx(from_raw)


def groups_of_one_name_in_two_deployments():
    """Group "g" in deployments A and B, a request each (A's in the seconds at the edge of the window below,
    B's in a whole minute), and 99 more groups of two requests each under a second router of B."""
    batches = []
    for name, ts in (("A", T1 + 40), ("B", T1 + 90)):
        source = WireSource(f"src-{name}", app="llm", deployment=name)
        decision = source.decision(ts, [[f"{name}-r1"]], request_id=name, reason=prefix_aware.PREFIX_MATCH)
        decision["attributes"] = {"prompt_chars": 100, "prefix_group": "g"}
        batches.append(source.batch([source.replicas(T1, [f"{name}-r1"]), decision,
                                     source.routed(ts + 0.01, f"{name}-r1", decision)]))
    source = WireSource("src-B2", app="llm", deployment="B", router_class="x.Other")
    events = [source.replicas(T1, ["B-r1"])]
    for n in range(99):
        for k in range(2):
            ts = T1 + 60 + n * 0.5 + k * 0.2
            decision = source.decision(ts, [["B-r1"]], request_id=f"h{n}-{k}", reason=prefix_aware.PREFIX_MATCH)
            decision["attributes"] = {"prompt_chars": 100, "prefix_group": f"h{n:03}"}
            events += [decision, source.routed(ts + 0.01, "B-r1", decision)]
    return batches + [source.batch(events)]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def tied_groups_collector(request, tmp_path_factory):
    yield from _backend_collector(request, tmp_path_factory, groups_of_one_name_in_two_deployments())


def test_groups_with_as_many_requests_are_listed_in_one_order_whichever_rows_count_them(tied_groups_collector):
    with tied_groups_collector.engine.connect() as connection:
        got = [prefixes.prefix_affinity(connection, Filters(since=T1 + 30, until=T1 + 150, reasons=reasons))
               for reasons in ((), (prefix_aware.PREFIX_MATCH,))]  # from the rollups, from raw rows
    assert got[0]["total"]["groups"] == got[1]["total"]["groups"] == 101
    listed = [[(g["deployment"], g["prefix_group"], g["requests"]) for g in answer["groups"]] for answer in got]
    # The most requested first, then by app, deployment and group: of the two groups "g", B's is left out.
    assert listed[0] == listed[1] == [("B", f"h{n:03}", 2) for n in range(99)] + [("A", "g", 1)]


@pytest.mark.browser
def test_the_prefix_affinity_view_shows_the_api_figures_and_downloads_them(tmp_path, page):
    t0 = (time.time() - 1800) // 60 * 60
    with CollectorServer(Settings(db_url=f"sqlite:///{tmp_path / 'routelens.db'}"), app_factory=create_up_app) as up:
        batch, _, _ = prefix_scenario(t0)
        assert httpx.post(f"{up.url}/v1/events", json=batch).status_code == 200
        page.goto(up.url + "/prefix-affinity?window=1h")
        page.wait_for_selector("#prefix-affinity-groups-table")
        # The API's answer for the window the view was drawn for (the JSON download's link).
        figures = httpx.get(up.url + page.get_attribute("#prefix-affinity-download-json", "href")).json()
        assert figures["total"]["groups"] == 3
        total = figures["total"]
        assert shown_text(page, "#prefix-affinity-groups") == number(total["groups"])
        assert shown_text(page, "#prefix-affinity-concentration") == number(total["concentration"], 3)
        assert shown_text(page, "#prefix-affinity-split") == number(total["split_groups"])
        assert shown_text(page, "#prefix-affinity-match-rate") == percent(total["match_rate_mean"])
        rows = shown_rows(page, "#prefix-affinity-groups-table")
        assert [(row[0], row[2], row[4], row[5]) for row in rows] == [
            (g["prefix_group"], number(g["requests"]), g["top_replica_id"], percent(g["top_share"]))
            for g in figures["groups"]]
        page.wait_for_selector("#prefix-affinity-split-over-time .scatterlayer .trace")
        assert page.locator("#prefix-affinity-split-over-time .scatterlayer .trace").count() == 1  # one deployment
        # The downloads: the tables as shown, and the API's answer for the window shown.
        shown_csv = list(csv.reader(io.StringIO(downloaded(page, "#prefix-affinity-download-csv"))))
        assert [row[1:] for row in shown_csv if row[0] == "groups"] == rows
        assert [row[1:] for row in shown_csv if row[0] == "deployments"] == shown_rows(
            page, "#prefix-affinity-deployments")
        assert json.loads(downloaded(page, "#prefix-affinity-download-json")) == figures
    assert not page.console_errors
