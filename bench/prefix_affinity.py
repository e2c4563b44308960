"""The traced prefix-aware router against the untraced one on real Serve (issue 27, "How to show it").

Each run deploys the demo's fake LLM twice, fresh (so each has a fresh prefix
tree), `--replicas` replicas each: one routed by Ray's PrefixCacheAffinityRouter,
one by routelens' TracedPrefixCacheAffinityRouter over a copy of Ray's router
that writes down each branch it takes (tests/support/prefix_counting.py).
Both are sent the same `--requests` chat requests (shared system prompts in
Zipf proportions, through handles), `--concurrency` at a time to both at once,
so that both route under the same load (their routers share this process's
router loop). Queue lengths `--imbalanced-threshold` apart count as
imbalanced (Ray's default, never, would leave only the prefix branches).

Prints per run: each router's prefix concentration (the mean share of a
prefix group's requests on its top replica, from the replicas' own answers),
their difference; whether the traced router's per-replica routed counts equal
the replicas' own counts; whether every decision has a reason, and whether
the reasons' counts equal the branches the router counted. Then the mean
difference over the runs (target: within 0.03).

    PYTHONPATH=... .venv/bin/python bench/prefix_affinity.py [--runs 5] [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ray  # noqa: E402
from ray import cloudpickle, serve  # noqa: E402
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (  # noqa: E402
    PrefixCacheAffinityRouter,
)
from ray.serve.config import RequestRouterConfig  # noqa: E402

from routelens.collector.demo.apps import FakeLLM  # noqa: E402
from routelens.routers import prefix_aware  # noqa: E402
from tests.support import prefix_counting, prefix_traffic  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.serve_apps import delete_apps  # noqa: E402
from tests.support.trace_checks import read_events, wait_for  # noqa: E402
from tests.test_ground_truth import accounting_holds  # noqa: E402


def deploy(name: str, router: type, kwargs: dict, replicas: int):
    config = RequestRouterConfig(request_router_class=router, request_router_kwargs=kwargs)
    app = FakeLLM.options(name=name, num_replicas=replicas, request_router_config=config).bind()
    return serve.run(app, name=name, route_prefix=None)


def run_once(number: int, args, workdir: str) -> dict:
    sink, branches = os.path.join(workdir, f"sink-{number}"), os.path.join(workdir, f"branches-{number}.txt")
    threshold = {"imbalanced_threshold": args.imbalanced_threshold}
    traced_name, plain_name = f"traced-{number}", f"plain-{number}"
    handles = {
        "traced": deploy(traced_name, prefix_counting.TracedCountingPrefixRouter,
                         {"jsonl_path": os.path.join(sink, "events-{pid}.jsonl"), "flush_interval_s": 0.2,
                          "branches_path": branches, **threshold}, args.replicas),
        "untraced": deploy(plain_name, PrefixCacheAffinityRouter, threshold, args.replicas),
    }
    requests = prefix_traffic.prompts(args.requests, args.groups, seed=number)
    answered = prefix_traffic.send(handles, requests, args.concurrency)
    wait_for(lambda: accounting_holds(sink) and sum(e["type"] == "routed" for e in read_events(sink, traced_name))
             >= len(answered["traced"]), what="the traced router's events")
    events = read_events(sink, traced_name)
    decisions = [e for e in events if e["type"] == "decision"]
    routed = Counter(e["replica_id"] for e in events if e["type"] == "routed")
    with open(branches) as f:
        counted = Counter(line.strip() for line in f)
    made = counted.pop(prefix_counting.DECISION)
    counted[prefix_aware.POW2_UNCONSULTED] = made - sum(counted.values())
    reasons = Counter(d.get("reason") for d in decisions)
    delete_apps([traced_name, plain_name])
    return {
        "traced": prefix_traffic.prefix_concentration(answered["traced"]),
        "untraced": prefix_traffic.prefix_concentration(answered["untraced"]),
        "routed_equals_replicas": routed == Counter(replica for _, replica in answered["traced"]),
        "every_decision_has_a_reason": None not in reasons and len(decisions) == made,
        "reasons_equal_counted": reasons == +counted,
        "reasons": dict(reasons),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=400, help="per run and router")
    parser.add_argument("--groups", type=int, default=5, help="shared system prompts (at most 5)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--imbalanced-threshold", type=float, default=2)
    args = parser.parse_args()
    cloudpickle.register_pickle_by_value(prefix_counting)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    began = time.monotonic()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="prefix-affinity-") as workdir:
            print(f"{'run':>3} {'traced':>7} {'untraced':>8} {'diff':>7}  routed=replicas  reasons all  "
                  f"reasons=counted  reasons")
            for number in range(args.runs):
                r = run_once(number, args, workdir)
                results.append(r)
                print(f"{number:>3} {r['traced']:>7.3f} {r['untraced']:>8.3f} {r['traced'] - r['untraced']:>+7.3f}  "
                      f"{str(r['routed_equals_replicas']):>15}  {str(r['every_decision_has_a_reason']):>11}  "
                      f"{str(r['reasons_equal_counted']):>15}  {r['reasons']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    diffs = [r["traced"] - r["untraced"] for r in results]
    mean = statistics.fmean(diffs)
    print(f"\nconcentration: traced {statistics.fmean(r['traced'] for r in results):.3f}, untraced "
          f"{statistics.fmean(r['untraced'] for r in results):.3f}; difference mean {mean:+.3f} "
          f"(runs from {min(diffs):+.3f} to {max(diffs):+.3f}); within 0.03: {abs(mean) <= 0.03}")
    every = all(r["routed_equals_replicas"] and r["every_decision_has_a_reason"] and r["reasons_equal_counted"]
                for r in results)
    print(f"routed counts, reasons and counted branches hold in every run: {every}; "
          f"{time.monotonic() - began:.0f} s")
    return 0 if every and abs(mean) <= 0.03 else 1


if __name__ == "__main__":
    sys.exit(main())
