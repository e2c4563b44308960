"""The record against the ground truth, on real Serve (issue 23).

A FIFO router that ranks every replica in two tiers, traced, records beside
the tracer which of its decisions supplied each replica Ray handed out
(tests/support/ground_truth.py). Replicas of one or two slots under 8 and
60 concurrent requests give refusals, retries, two routing tasks for one
request and FIFO hand-offs; one request in 20 is cancelled as soon as it is
sent; and a driver in a child process returns without `serve.shutdown`.
Each run must hold:

- every routed event names the decision the ground truth names, at its
  rank, with attribution "exact";
- every routed request has exactly one accepted completion, which is its
  own (a request that returned completes ok, where a refused attempt's
  completion is an exception), and every refusal is recorded as one;
- a send that ended before its replica answered (a cancelled request's) is
  recorded as a failed attempt, naming no routed event;
- `produced == stored + dropped` for every source, the exiting driver's
  included;
- every decision carries the reason and scores the router explained it
  with, and each reason counts the decisions the router gave it.
- no latency is recorded below the replica's own work, whatever the router
  does with its loop (issue 27: one that blocks it, and Ray's pow-2).

Each run prints a FIGURES line (pytest -s): requests, routed, refusals,
hand-offs, routed events whose decision matched the ground truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from typing import Any, Dict, List, Tuple

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.collector.demo.apps import SYSTEM_PROMPTS, chat_request
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from routelens.routers.llm import TracedPrefixCacheAffinityRouter
from tests.support import misbehaving_routers, serve_apps
from tests.support.ground_truth import TracedGroundTruthRouter
from tests.support.trace_checks import read_batches, read_events, wait_for

pytestmark = pytest.mark.ray

REPLICAS = 4
WORK_S = 0.005  # each request's work at the replica
REQUESTS = 600  # per run
CANCEL_EVERY = 20  # one request in this many is cancelled as soon as it is sent
RUNS = [(1, 60), (1, 8), (2, 60), (2, 8)]  # (slots per replica, concurrent requests)


@pytest.fixture(scope="module")
def apps(serve_instance, tmp_path_factory):
    """One app per slot count, traced to JSON Lines files, with its ground truth."""
    tmp = tmp_path_factory.mktemp("ground-truth")
    deployed = {}
    for slots in sorted({slots for slots, _ in RUNS}):
        name = f"truth-{slots}"
        sink, truth = tmp / name, tmp / f"{name}.truth.jsonl"
        config = RequestRouterConfig(request_router_class=TracedGroundTruthRouter, request_router_kwargs={
            "jsonl_path": str(sink / "events-{pid}.jsonl"), "flush_interval_s": 0.2,
            "ground_truth_path": str(truth)})
        app = serve_apps.BriefApp.options(name=name, num_replicas=REPLICAS, max_ongoing_requests=slots,
                                         request_router_config=config).bind(WORK_S)
        deployed[slots] = {"name": name, "handle": serve.run(app, name=name, route_prefix=None),
                           "sink": str(sink), "truth": str(truth)}
    yield deployed
    serve_apps.delete_apps(app["name"] for app in deployed.values())


def send(handle, n: int, concurrency: int) -> Dict[str, str]:
    """`n` requests, `concurrency` at a time; every CANCEL_EVERY-th cancelled at once.
    Returns each request's outcome by request_id: 'ok' or 'cancelled'."""
    outcomes = {}
    for start in range(0, n, concurrency):
        responses = []
        for i in range(start, min(n, start + concurrency)):
            response = handle.remote()
            if i % CANCEL_EVERY == CANCEL_EVERY - 1:
                response.cancel()
            responses.append(response)
        for response in responses:
            try:
                response.result(timeout_s=60)
                outcomes[response.request_id] = "ok"
            except ray.exceptions.TaskCancelledError:  # Serve's RequestCancelledError is one
                outcomes[response.request_id] = "cancelled"
    return outcomes


def events_of(sink: str, request_ids) -> Dict[str, List[Dict[str, Any]]]:
    """The run's events by type: those of its requests (decisions, routed) and
    of their internal ids (completions)."""
    by_type = defaultdict(list)
    for batch in read_batches(sink):
        for event in batch["events"]:
            by_type[event["type"]].append({**event, "source_id": batch["source"]["source_id"]})
    internal = {e["internal_request_id"] for e in by_type["decision"] if e["request_id"] in request_ids}
    return {kind: [e for e in events if e.get("internal_request_id") in internal]
            for kind, events in by_type.items() if kind in ("decision", "routed", "completed")}


def ground_truth(path: str) -> Dict[str, dict]:
    """Each request's last fulfilment: the one its accepted attempt was sent after."""
    last = {}
    with open(path) as f:
        for line in f:
            fulfilment = json.loads(line)
            if "recipient" in fulfilment:
                last[fulfilment["recipient"]] = fulfilment
    return last


def explanations(path: str) -> Dict[Tuple[str, int], Tuple[str, dict]]:
    """What the router explained each decision with: (request, call) -> (reason, scores)."""
    out = {}
    with open(path) as f:
        for line in f:
            line = json.loads(line)
            if "explained" in line:
                out[(line["explained"], line["call"])] = (line["reason"], line["scores"])
    return out


def completions_reported(path: str, pid: int) -> int:
    """How many completions Ray reported to the routers of process `pid`."""
    with open(path) as f:
        return sum('"completed"' in line and json.loads(line)["pid"] == pid for line in f)


def books(batches: List[dict]) -> Dict[str, Tuple[dict, int]]:
    """Each source's last batch (its counters) and the events stored from it."""
    stored, last = Counter(), {}
    for batch in batches:
        source = batch["source"]["source_id"]
        stored[source] += len(batch["events"])
        if source not in last or batch["seq"] > last[source]["seq"]:
            last[source] = batch
    return {source: (batch, stored[source]) for source, batch in last.items()}


def balances(last: dict, stored: int) -> bool:
    """produced == stored + dropped, by a source's last batch."""
    return last["produced"] == stored + sum(last["dropped"].values())


def accounting_holds(sink: str) -> bool:
    """produced == stored + dropped for every source."""
    sources = books(read_batches(sink))
    return bool(sources) and all(balances(last, stored) for last, stored in sources.values())


def check_run(app: dict, outcomes: Dict[str, str], label: str) -> Dict[str, int]:
    ok = {request for request, outcome in outcomes.items() if outcome == "ok"}

    def complete() -> bool:
        events = events_of(app["sink"], outcomes)
        routed = {e["request_id"] for e in events.get("routed", ())}
        accepted = sum(not c["rejected"] and c["routed_id"] is not None for c in events.get("completed", ()))
        return routed >= ok and accepted >= len(routed) and accounting_holds(app["sink"])

    wait_for(complete, timeout_s=60, what=f"{label}: every routed event, its completion and the counters")
    events = events_of(app["sink"], outcomes)
    truth = ground_truth(app["truth"])
    decisions = {(e["source_id"], e["internal_request_id"], e["attempt"]): e for e in events["decision"]}
    routed = events["routed"]
    assert len({e["internal_request_id"] for e in routed}) == len(routed), "a request was routed twice"
    matched = 0
    for r in routed:
        fulfilment = truth[r["internal_request_id"]]
        named = decisions[(r["source_id"], fulfilment["decision_request"], fulfilment["decision_call"])]
        assert (r["decision_id"], r["rank"], r["replica_id"], r["attribution"]) == (
            named["id"], fulfilment["rank"], fulfilment["replica_id"], "exact"), (label, r, fulfilment)
        matched += 1
    completions = events["completed"]
    accepted = Counter(c["routed_id"] for c in completions if not c["rejected"] and c["routed_id"] is not None)
    assert all(accepted[r["id"]] == 1 for r in routed) and sum(accepted.values()) == len(routed), label
    # An attempt that ended before its replica answered (neither accepted nor
    # refused: no routed event names it) is recorded as a failure. Only a
    # cancelled request's send can end so here.
    request_of = {e["internal_request_id"]: e["request_id"] for e in events["decision"]}
    failed_sends = [c for c in completions if not c["rejected"] and c["routed_id"] is None]
    for c in failed_sends:
        assert c["ok"] is False and outcomes[request_of[c["internal_request_id"]]] == "cancelled", (label, c)
    outcome_of = {r["id"]: outcomes[r["request_id"]] for r in routed}
    for c in completions:
        if c["rejected"]:
            assert (c["ok"], c["routed_id"], c["latency_ms"]) == (False, None, None), c
        # Not a refusal's completion: that one is an exception.
        elif c["routed_id"] is not None and outcome_of[c["routed_id"]] == "ok":
            assert c["ok"] is True and c["latency_ms"] is not None, (label, c)
    # The router's explanations, each on its decision: every decision recorded has one, and the counts per
    # reason are the router's.
    explained = explanations(app["truth"])
    recorded = {(e["internal_request_id"], e["attempt"]): (e.get("reason"), e.get("scores"))
                for e in events["decision"]}
    assert recorded == {key: explained.get(key) for key in recorded}, label
    assert Counter(reason for reason, _ in recorded.values()) == Counter(
        reason for (request, _), (reason, _) in explained.items() if request in {key[0] for key in recorded}), label
    figures = {"requests": len(outcomes), "cancelled": len(outcomes) - len(ok), "routed": len(routed),
               "refusals": sum(c["rejected"] for c in completions),
               "handoffs": sum(e["own_ranking"] is False for e in routed), "failed_sends": len(failed_sends),
               "matched": matched, "reasons": dict(Counter(reason for reason, _ in recorded.values()))}
    print(f"\nFIGURES ground truth {label}: {json.dumps(figures)}", flush=True)
    return figures


@pytest.mark.parametrize("slots,concurrency", RUNS, ids=[f"{s}-slot-{c}-concurrent" for s, c in RUNS])
def test_every_routed_event_names_the_decision_that_found_its_replica(apps, slots, concurrency):
    app = apps[slots]
    outcomes = send(app["handle"], REQUESTS, concurrency)
    figures = check_run(app, outcomes, f"{slots} slot(s), {concurrency} concurrent")
    if concurrency > slots * REPLICAS:
        assert figures["refusals"] > 0 and figures["handoffs"] > 0, figures  # the hard cases did occur


DRIVER = textwrap.dedent("""
    import sys
    import ray
    from ray import serve

    ray.init(address=sys.argv[1], namespace="serve", log_to_driver=False)
    handle = serve.get_app_handle(sys.argv[2])
    for start in range(0, int(sys.argv[3]), 60):
        for response in [handle.remote() for _ in range(60)]:
            response.result(timeout_s=60)
        print(response.request_id, flush=True)
    # Returns without serve.shutdown(): the routers' state goes with the process.
""")


def test_a_driver_that_exits_without_shutting_down_loses_nothing_uncounted(apps):
    """The driver's own router refuses and retries; then the process ends.
    Refusals are recorded as the replica answers, and whatever the tracer
    still held is counted as dropped: the driver's source balances."""
    app = apps[1]
    before = {b["source"]["source_id"] for b in read_batches(app["sink"])}
    result = subprocess.run([sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address, app["name"],
                             str(REQUESTS)], capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    batches = [b for b in read_batches(app["sink"])
               if b["source"]["source_id"] not in before and b["source"]["pid"] != os.getpid()]
    drivers = books(batches)
    assert len(drivers) == 1, list(drivers)
    [(last, stored)] = drivers.values()
    assert balances(last, stored), (last["produced"], stored, last["dropped"])
    events = [e for b in batches for e in b["events"]]
    refusals = sum(e["type"] == "completed" and e["rejected"] for e in events)
    routed = sum(e["type"] == "routed" for e in events)
    completed = sum(e["type"] == "completed" for e in events)
    reported = completions_reported(app["truth"], last["source"]["pid"])
    figures = {"routed": routed, "refusals": refusals, "completed": completed,
               "completions_reported_by_ray": reported, "dropped": last["dropped"]}
    print(f"\nFIGURES ground truth exiting driver: {json.dumps(figures)}", flush=True)
    assert routed == REQUESTS and refusals > 0
    # Every attempt's completion is an event, stored or counted: none went missing uncounted.
    assert completed + last["dropped"].get("unsettled_at_exit", 0) == reported, figures


# A replica's fixed work, and the routers whose recorded latencies must never fall below it.
LATENCY_WORK_S = 0.05
LATENCY_REQUESTS = 64  # in 4 rounds of LATENCY_CONCURRENCY
LATENCY_CONCURRENCY = 16  # twice the slots: refusals and retries too
# Ray's prefix-aware router blocks its loop on its prefix tree's actor (issue 27); the first router here
# blocks it on purpose.
LATENCY_ROUTERS = [misbehaving_routers.TracedLoopBlockingRouter, TracedPowerOfTwoChoicesRequestRouter,
                   TracedPrefixCacheAffinityRouter]


@pytest.fixture(scope="module")
def latency_apps(serve_instance, tmp_path_factory):
    """Per router of LATENCY_ROUTERS, an app of two replicas that work LATENCY_WORK_S a request,
    traced to its own JSON Lines files: (app name, handle, sink directory)."""
    tmp = tmp_path_factory.mktemp("latency")
    deployed = {}
    for router in LATENCY_ROUTERS:
        name, sink = f"latency-{router.__name__.lower()}", str(tmp / router.__name__)
        config = RequestRouterConfig(request_router_class=router, request_router_kwargs={
            "jsonl_path": os.path.join(sink, "events-{pid}.jsonl"), "flush_interval_s": 0.2})
        app = serve_apps.BriefApp.options(name=name, num_replicas=2, max_ongoing_requests=4,
                                         request_router_config=config).bind(LATENCY_WORK_S)
        deployed[router] = (name, serve.run(app, name=name, route_prefix=None), sink)
    yield deployed
    serve_apps.delete_apps(name for name, _, _ in deployed.values())


@pytest.mark.parametrize("router", LATENCY_ROUTERS, ids=[r.__name__ for r in LATENCY_ROUTERS])
def test_no_latency_is_recorded_below_the_replicas_own_work(latency_apps, router):
    """A request's latency starts when it is sent: a router that holds its
    loop delays on_request_routed, which must not shorten the latency."""
    name, handle, sink = latency_apps[router]
    # A chat request, which the prefix-aware router needs and the others ignore.
    request = chat_request(SYSTEM_PROMPTS[0], "How long does this take?")
    for _ in range(0, LATENCY_REQUESTS, LATENCY_CONCURRENCY):
        for response in [handle.remote(request) for _ in range(LATENCY_CONCURRENCY)]:
            assert response.result(timeout_s=60) >= LATENCY_WORK_S  # the replica's own measure

    def accepted():
        return [e for e in read_events(sink, name)
                if e["type"] == "completed" and not e["rejected"] and e["routed_id"] is not None]

    wait_for(lambda: len(accepted()) >= LATENCY_REQUESTS, what="every request's completion")
    latencies = sorted(c["latency_ms"] for c in accepted())
    print(f"\nFIGURES latency {router.__name__}: {len(latencies)} requests, latency min {latencies[0]:.1f} ms,"
          f" p50 {latencies[len(latencies) // 2]:.1f} ms", flush=True)
    below = [latency for latency in latencies if latency < LATENCY_WORK_S * 1000.0]
    assert not below, f"{len(below)} of {len(latencies)} latencies below the replica's work: {below[:10]}"
    assert len(latencies) == LATENCY_REQUESTS
    # How long the router held its loop past the send is its own figure, on every routed event.
    held = sorted(e["send_to_routed_ms"] for e in read_events(sink, name) if e["type"] == "routed")
    print(f"FIGURES latency {router.__name__}: send to routed p50 {held[len(held) // 2]:.1f} ms,"
          f" max {held[-1]:.1f} ms", flush=True)
    assert len(held) == LATENCY_REQUESTS and held[0] >= 0.0


# --- Ray's prefix-aware router, traced: its reasons against its own count of its branches ---

PREFIX_REPLICAS = 3
PREFIX_REQUESTS = 120
PREFIX_GROUPS = 4  # system prompts
PREFIX_CONCURRENCY = 6


@pytest.fixture(scope="module")
def prefix_app(serve_instance, tmp_path_factory):
    """The demo's fake LLM behind the traced prefix-aware router, over one that writes down each branch
    it takes; queue lengths 1 apart count as imbalanced, so that the pow-2 fallback occurs too."""
    from ray import cloudpickle

    from routelens.collector.demo.apps import FakeLLM
    from tests.support import prefix_counting

    cloudpickle.register_pickle_by_value(prefix_counting)
    tmp = tmp_path_factory.mktemp("prefix-truth")
    sink, branches = tmp / "sink", tmp / "branches.txt"
    config = RequestRouterConfig(request_router_class=prefix_counting.TracedCountingPrefixRouter,
                                 request_router_kwargs={"jsonl_path": str(sink / "events-{pid}.jsonl"),
                                                        "flush_interval_s": 0.2, "branches_path": str(branches),
                                                        "imbalanced_threshold": 1})
    app = FakeLLM.options(name="prefix-truth", num_replicas=PREFIX_REPLICAS, request_router_config=config).bind()
    yield {"handle": serve.run(app, name="prefix-truth", route_prefix=None), "sink": str(sink),
           "branches": str(branches)}
    serve_apps.delete_apps(["prefix-truth"])


def test_the_traced_prefix_aware_router_gives_every_decision_the_branch_it_took(prefix_app):
    from routelens.routers import prefix_aware
    from tests.support import prefix_counting, prefix_traffic

    requests = prefix_traffic.prompts(PREFIX_REQUESTS, PREFIX_GROUPS, seed=27)
    answered = prefix_traffic.send({"traced": prefix_app["handle"]}, requests, PREFIX_CONCURRENCY)["traced"]
    wait_for(lambda: accounting_holds(prefix_app["sink"]) and sum(
        e["type"] == "routed" for b in read_batches(prefix_app["sink"]) for e in b["events"]) >= len(answered),
             what="every routed event and the counters")
    events = [e for b in read_batches(prefix_app["sink"]) for e in b["events"]]
    decisions = [e for e in events if e["type"] == "decision"]
    # The replicas' own counts are what was recorded as routed to each.
    assert Counter(e["replica_id"] for e in events if e["type"] == "routed") == Counter(r for _, r in answered)
    # Every decision has a reason, and they count what the router itself counted.
    with open(prefix_app["branches"]) as f:
        counted = Counter(line.strip() for line in f)
    made = counted.pop(prefix_counting.DECISION)
    assert len(decisions) == made and all(d.get("reason") in prefix_aware.REASONS_ALL for d in decisions), decisions[:3]
    counted[prefix_aware.POW2_UNCONSULTED] = made - sum(counted.values())
    assert Counter(d["reason"] for d in decisions) == +counted
    for d in decisions:
        if d["reason"] in (prefix_aware.PREFIX_MATCH, prefix_aware.SMALLEST_TENANT, prefix_aware.POW2_LOW_MATCH_RATE):
            assert 0 <= d["scores"]["match_rate"] <= 1, d
    # Each request's prompt length and prefix group: one group per system prompt, no text.
    prompt_of = {}
    for group, request in requests:
        prompt_of.setdefault(group, set()).add(request.prompt_chars)
    groups = {d["attributes"]["prefix_group"] for d in decisions}
    assert len(groups) == len({group for group, _ in requests})
    assert sorted({d["attributes"]["prompt_chars"] for d in decisions}) == sorted(set().union(*prompt_of.values()))
    print(f"\nFIGURES prefix-aware reasons: {json.dumps(dict(counted))}, concentration "
          f"{prefix_traffic.prefix_concentration(answered):.3f}", flush=True)


# --- Ray's prefix-aware router, traced and not: the same prompts routed alike ---

ALIKE_REQUESTS = 60  # sent one at a time
ALIKE_GROUPS = 5  # system prompts: more than replicas, so that later groups go by how much each replica holds


@pytest.fixture(scope="module")
def prefix_pair(serve_instance, tmp_path_factory):
    """Ray's prefix-aware router and the traced one, each over fresh replicas of the demo's fake LLM, at Ray's
    default imbalanced_threshold (never imbalanced): each request goes where the prompts before it put its
    prefix."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

    from routelens.collector.demo.apps import FakeLLM

    sink = tmp_path_factory.mktemp("prefix-alike")
    routers = {"traced": (TracedPrefixCacheAffinityRouter, {"jsonl_path": str(sink / "events-{pid}.jsonl")}),
               "untraced": (PrefixCacheAffinityRouter, {})}
    handles = {}
    for role, (router, kwargs) in routers.items():
        config = RequestRouterConfig(request_router_class=router, request_router_kwargs=kwargs)
        app = FakeLLM.options(name=f"alike-{role}", num_replicas=PREFIX_REPLICAS,
                              request_router_config=config).bind()
        handles[role] = serve.run(app, name=f"alike-{role}", route_prefix=None)
    yield handles
    serve_apps.delete_apps(f"alike-{role}" for role in routers)


def test_the_traced_prefix_aware_router_parts_the_same_prompts_as_rays(prefix_pair):
    """One request at a time, so that load decides nothing, Ray's router routes by its prefix tree alone: a
    group's first request to the replica holding the fewest characters, the rest to the replica holding its
    prefix. The traced router must part the same requests among its replicas the same way (the replicas'
    names aside). With this seed no two replicas hold equally many characters when a group's first request
    comes, so no tie is broken by the order of a set. (Under load, where the queue lengths of the moment
    count too, the two are compared by their prefix concentration over many runs: bench/prefix_affinity.py.)"""
    from tests.support import prefix_traffic

    requests = prefix_traffic.prompts(ALIKE_REQUESTS, ALIKE_GROUPS, seed=27)
    answered = prefix_traffic.send(prefix_pair, requests, concurrency=1)

    def parts(answers: List[Tuple[int, str]]) -> List[List[int]]:
        """The requests (their numbers) that shared a replica, for each replica, the replicas unnamed."""
        by_replica = defaultdict(list)
        for number, (_, replica) in enumerate(answers):
            by_replica[replica].append(number)
        return sorted(by_replica.values())

    assert parts(answered["traced"]) == parts(answered["untraced"])
    # Each group on one replica, and every replica holding some: the tree decided where each went.
    assert prefix_traffic.prefix_concentration(answered["traced"]) == 1.0
    assert len(parts(answered["traced"])) == PREFIX_REPLICAS
