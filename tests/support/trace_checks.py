"""Reading what the tracer wrote, and the invariants every trace must hold."""

from __future__ import annotations

import glob
import json
import os
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List


def read_batches(directory: str) -> List[Dict[str, Any]]:
    batches = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        with open(path) as f:
            batches.extend(json.loads(line) for line in f if line.strip())
    return batches


def read_events(directory: str, deployment: str) -> List[Dict[str, Any]]:
    """Events of one deployment's routers, each with its batch's `source` attached."""
    events = []
    for b in read_batches(directory):
        if b["source"]["deployment"] == deployment:
            events.extend({**e, "source": b["source"]} for e in b["events"])
    return events


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.25)


def routed_count(directory: str, deployment: str) -> int:
    return sum(e["type"] == "routed" for e in read_events(directory, deployment))


def check_trace(events: List[Dict[str, Any]], n_requests: int, replica_counts: Dict[str, int]) -> Dict[str, int]:
    """Assert the invariants of issue #2 on one deployment's events.

    Returns figures the caller may assert more on: rejections, hand-offs.
    """
    by_type = defaultdict(list)
    for e in events:
        by_type[e["type"]].append(e)
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "event ids must be unique"

    routed = by_type["routed"]
    # Every request has exactly one routed event.
    per_request = Counter(e["internal_request_id"] for e in routed)
    assert len(routed) == n_requests, f"{len(routed)} routed events for {n_requests} requests"
    assert all(n == 1 for n in per_request.values()), "a request was routed twice"

    # Every routed event names a decision of its own router holding the replica at that rank.
    decisions = {(e["source"]["source_id"], e["id"]): e for e in by_type["decision"]}
    handoffs = 0
    for r in routed:
        d = decisions.get((r["source"]["source_id"], r["decision_id"]))
        assert d is not None, f"routed {r['id']} names a missing decision {r['decision_id']}"
        assert r["rank"] is not None and r["replica_id"] in d["ranks"][r["rank"]], (r, d["ranks"])
        assert r["attribution"] == "exact"
        # own_ranking is true exactly when the decision was made for this request.
        assert r["own_ranking"] == (d["internal_request_id"] == r["internal_request_id"]), (r, d)
        handoffs += not r["own_ranking"]
        for replica_id, inputs in d["replicas"].items():
            assert set(inputs) >= {"queue_len", "queue_len_age_s", "stats", "stats_age_s", "stats_age_source"}

    # completed pairs with routed: one accepted completion per routed event.
    completed = by_type["completed"]
    accepted = {(c["internal_request_id"], c["replica_id"]): c for c in completed if not c["rejected"]}
    assert len(accepted) == len([c for c in completed if not c["rejected"]]), "a routed attempt completed twice"
    for r in routed:
        c = accepted.get((r["internal_request_id"], r["replica_id"]))
        assert c is not None, f"no completion for routed {r['id']}"
        assert c["routed_id"] == r["id"] and c["ok"] is True and c["latency_ms"] >= 0
    assert len(accepted) == len(routed)

    # Per-replica routed counts equal what the replicas counted themselves.
    traced_counts = Counter(r["replica_id"] for r in routed)
    assert dict(traced_counts) == replica_counts

    # Membership is recorded and covers every routed replica.
    members = {m["replica_id"] for e in by_type["replicas"] for m in e["replicas"]}
    assert set(traced_counts) <= members
    return {"rejections": sum(c["rejected"] for c in completed), "handoffs": handoffs}
