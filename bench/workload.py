"""Synthetic wire-format v2 traffic (v3 for an LLM deployment) for the collector benchmarks.

The events have the shape `routers.wire` gives them for Ray's pow-2 router:
each decision ranks 2 candidates (one rank) drawn from the deployment's
replicas, with their queue lengths, a stamped `routing_stats` dict and its
age; request ids are uuid4 strings (as Ray makes them); event ids are the
tracer's own UUIDv7s (`routers.ids.event_id`). A request is a decision, then
its `routed` event, then its `completed` event; a few requests are rejected
by their first replica and decided again (attempt 1), a few are FIFO
hand-offs. Each answer (routed event, rejection) carries its queue lengths,
and a rejection its decision, as v2 has them. An LLM deployment's traffic
(`prefix_groups`) is v3's: each decision also carries its prompt's prefix
group and length, and its reason and scores, as `routers.llm` records them.

Everything is seeded, so two runs build the same bodies.
"""

from __future__ import annotations

import gzip
import random
import string
from typing import Dict, Iterator, List, Optional, Tuple

import msgspec

from routelens.routers.ids import event_id

ROUTER_CLASS = "routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter"
APP, DEPLOYMENT = "bench", "LLMServer"
STATS_PERIOD_S = 10.0  # the deployment's request_routing_stats_period_s
PREFIX_MATCH_SHARE = 0.9  # of an LLM deployment's decisions, routed by prefix; the rest by pow-2 (imbalance)

_encode = msgspec.json.Encoder().encode


def replica_ids(n: int, seed: int = 1) -> List[str]:
    """Ray's ReplicaID.unique_id: 8 random lowercase letters and digits."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase + string.digits, k=8)) for _ in range(n)]


def source_info(index: int) -> Dict[str, object]:
    return {
        "source_id": f"{index:032x}", "app": APP, "deployment": DEPLOYMENT, "router_class": ROUTER_CLASS,
        "handle_source": "PROXY", "node_id": f"{index:056x}", "actor_id": f"{index:032x}",
        "hostname": f"node-{index}", "pid": 1000 + index, "tracer_version": "0.1.0", "labels": {},
    }


def _uuid4(rng: random.Random) -> str:
    """str(uuid.uuid4()), drawn from `rng` so that runs repeat."""
    h = "%032x" % ((rng.getrandbits(128) & ~(0xF << 76) & ~(0x3 << 62)) | (0x4 << 76) | (0x2 << 62))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Traffic:
    """Requests of one traced router (one source), in time order."""

    def __init__(self, replicas: List[str], seed: int, rejection_rate: float = 0.02, handoff_rate: float = 0.03,
                 prefix_groups: int = 0):
        self.replicas = replicas
        self.rng = random.Random(seed)
        self.seq = 0
        self.rejection_rate = rejection_rate
        self.handoff_rate = handoff_rate
        # Each replica's routing_stats, as its last collection stamped them.
        self.stats = {r: ({"throughput": self.rng.randrange(0, 60)}, 0.0) for r in replicas}
        # An LLM deployment's: the replica holding each prefix group (none otherwise).
        self.prefix_homes = [self.rng.choice(replicas) for _ in range(prefix_groups)]

    def _id(self, ts: float) -> str:
        self.seq += 1
        return event_id(ts, self.seq)

    def _candidate(self, replica: str, ts: float) -> Dict[str, object]:
        rng = self.rng
        stats, stamp = self.stats[replica]
        return {
            "queue_len": rng.randrange(0, 8),
            "queue_len_age_s": rng.random() * 0.1,
            "stats": stats,
            "stats_age_s": max(ts - stamp, 0.0) if stamp else rng.random() * STATS_PERIOD_S,
            "stats_age_source": "stamped",
        }

    def decision(self, ts: float, request_id: str, internal_id: str, attempt: int) -> Dict[str, object]:
        rng = self.rng
        a, b = rng.sample(self.replicas, 2)
        explained: Dict[str, object] = {}
        if self.prefix_homes:
            a, b, explained = self._prefix_aware(a, b)
        return {
            "type": "decision", "id": self._id(ts), "ts": ts, "request_id": request_id,
            "internal_request_id": internal_id, "model_id": None, "attempt": attempt,
            "duration_us": rng.randrange(8, 60), "n_candidates": len(self.replicas), "ranks": [[a, b]],
            "replicas": {a: self._candidate(a, ts), b: self._candidate(b, ts)}, **explained,
        }

    def _prefix_aware(self, a: str, b: str) -> Tuple[str, str, Dict[str, object]]:
        """An LLM deployment's decision, first ranked `a` then `b` by pow-2: its prompt's prefix group and
        length; by prefix (the group's replica first), or else by pow-2 because load was imbalanced."""
        rng = self.rng
        group = rng.randrange(len(self.prefix_homes))
        explained: Dict[str, object] = {
            "attributes": {"prompt_chars": rng.randrange(200, 4000), "prefix_group": f"{group:016x}"}}
        if rng.random() < PREFIX_MATCH_SHARE:
            home = self.prefix_homes[group]
            a, b = home, (b if b != home else a)
            explained.update(reason="prefix_match",
                             scores={"match_rate": rng.uniform(0.5, 1.0), "match_rate_threshold": 0.1})
        else:
            explained.update(reason="pow2_imbalanced", scores={"imbalanced_threshold": 2.0})
        return a, b, explained

    def decisions_only(self, ts: float) -> Dict[str, object]:
        """One decision event (what the ingest benchmark sends)."""
        return self.decision(ts, _uuid4(self.rng), _uuid4(self.rng), 0)

    def request(self, ts: float) -> Tuple[int, List[Dict[str, object]]]:
        """The events of one request starting at `ts`: (decisions made, events)."""
        rng = self.rng
        request_id, internal_id = _uuid4(rng), _uuid4(rng)
        events = []
        attempt = 0
        while True:
            decision = self.decision(ts, request_id, internal_id, attempt)
            events.append(decision)
            chosen = decision["ranks"][0][0]
            if attempt < 3 and rng.random() < self.rejection_rate:
                ts += 0.002
                events.append({"type": "completed", "id": self._id(ts), "ts": ts, "internal_request_id": internal_id,
                               "replica_id": chosen, "latency_ms": None, "ok": None, "rejected": True,
                               "routed_id": None, "decision_id": decision["id"],
                               **self._answer(decision, chosen, accepted=False)})
                attempt += 1
                continue
            break
        handoff = rng.random() < self.handoff_rate
        routed_ts = ts + 0.0005
        routed_id = self._id(routed_ts)
        events.append({
            "type": "routed", "id": routed_id, "ts": routed_ts, "request_id": request_id,
            "internal_request_id": internal_id, "model_id": None, "replica_id": chosen,
            "decision_id": decision["id"], "rank": 0, "own_ranking": not handoff, "attempts": attempt + 1,
            "queue_wait_ms": round(rng.random() * 2, 3), "attribution": "fifo" if handoff else None,
            **self._answer(decision, chosen, accepted=True),
        })
        latency_ms = rng.lognormvariate(4.0, 0.8)
        done_ts = routed_ts + latency_ms / 1000.0
        events.append({
            "type": "completed", "id": self._id(done_ts), "ts": done_ts, "internal_request_id": internal_id,
            "replica_id": chosen, "latency_ms": latency_ms, "ok": rng.random() > 0.005, "rejected": False,
            "routed_id": routed_id,
        })
        return attempt + 1, events

    def _answer(self, decision: Dict[str, object], chosen: str, accepted: bool) -> Dict[str, object]:
        """An answer's queue lengths: the chosen replica's as the decision saw it, the shortest of the
        candidates (here the ranked two), and the replica's count (an acceptance counts the request)."""
        seen = [inputs["queue_len"] for inputs in decision["replicas"].values()]
        believed = decision["replicas"][chosen]["queue_len"]
        return {"believed_queue_len": believed, "shortest_queue_len": min(seen),
                "reported_queue_len": max(believed + self.rng.randrange(-2, 3), 0) + int(accepted)}

    def collect_stats(self, ts: float) -> List[Dict[str, object]]:
        """Every replica's routing_stats collected at `ts`: one `stats` event each."""
        out = []
        for replica in self.replicas:
            stats = {"throughput": self.rng.randrange(0, 60)}
            self.stats[replica] = (stats, ts)
            out.append({"type": "stats", "id": self._id(ts), "ts": ts, "replica_id": replica, "stats": stats,
                        "collected_at": ts})
        return out

    def membership(self, ts: float) -> Dict[str, object]:
        return {"type": "replicas", "id": self._id(ts), "ts": ts, "replicas": [
            {"replica_id": r, "node_id": f"node-{i % 4}", "availability_zone": f"az-{i % 2}",
             "max_ongoing_requests": 8, "model_ids": []} for i, r in enumerate(self.replicas)]}


def body(source: Dict[str, object], seq: int, events: List[Dict[str, object]], compress: bool = False,
         schema_version: int = 2) -> bytes:
    """One POST /v1/events body, as `routers.wire.batch_json` lays it out."""
    data = _encode({"schema_version": schema_version, "source": source, "seq": seq, "dropped": {}, "produced": None,
                    "events": events})
    return gzip.compress(data, compresslevel=6) if compress else data


def decision_batches(n_batches: int, per_batch: int = 1000, start_ts: Optional[float] = None,
                     replicas: int = 50, rate_per_s: float = 20_000.0, seed: int = 7,
                     compress: bool = True) -> Iterator[bytes]:
    """Bodies of `per_batch` decision events each, from one source, `rate_per_s` apart in time."""
    import time

    traffic = Traffic(replica_ids(replicas), seed)
    source = source_info(seed)
    ts = time.time() - n_batches * per_batch / rate_per_s if start_ts is None else start_ts
    step = 1.0 / rate_per_s
    for seq in range(1, n_batches + 1):
        events = []
        for _ in range(per_batch):
            events.append(traffic.decisions_only(ts))
            ts += step
        yield body(source, seq, events, compress)
