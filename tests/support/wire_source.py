"""Wire-format batches as the tracer builds them, for tests that drive the collector.

Batches are of the current version (2) unless told otherwise; events carry
the fields of v1, and the fields v2 added (a refusal's decision, the
answers' queue lengths) only when given, so that a batch of version 1 is
one with `schema_version=1` and none of them."""

from __future__ import annotations

from routelens.routers.ids import event_id, next_seq


class WireSource:
    """One traced router instance: builds its events (shapes as in
    `routers.wire.encode`, ids from the tracer's own `routers.ids`) and
    numbers its batches from 1, as the exporter does."""

    def __init__(self, source_id: str, app: str = "shop", deployment: str = "Checkout",
                 router_class: str = "routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter",
                 labels: dict = None, **info):
        self.info = {"source_id": source_id, "app": app, "deployment": deployment, "router_class": router_class,
                     "handle_source": "proxy", "node_id": "node-1", "hostname": "host-1", "pid": 4242,
                     "tracer_version": "0.1.0", "labels": dict(labels or {}), **info}
        self.seq = 0

    def batch(self, events, seq: int = None, dropped: dict = None, produced: int = None,
              schema_version: int = 3) -> dict:
        if seq is None:
            self.seq += 1
            seq = self.seq
        body = {"schema_version": schema_version, "source": dict(self.info), "seq": seq, "dropped": dropped or {},
                "events": list(events)}
        if produced is not None:
            body["produced"] = produced
        return body

    @staticmethod
    def _id(ts: float) -> str:
        return event_id(ts, next_seq())

    def decision(self, ts: float, ranks, candidates: dict = None, request_id: str = None,
                 internal_request_id: str = None, attempt: int = 0, duration_us: int = 120,
                 model_id: str = None, reason: str = None, scores: dict = None) -> dict:
        """`candidates`: replica id -> the inputs it was ranked on (default: none known); `reason` and
        `scores`: what the router said of the decision (v3; left out without a reason)."""
        candidates = candidates or {}
        replicas = {}
        for rank in ranks:
            for replica_id in rank:
                given = candidates.get(replica_id, {})
                replicas[replica_id] = {"queue_len": given.get("queue_len"),
                                        "queue_len_age_s": given.get("queue_len_age_s"),
                                        "stats": given.get("stats", {}),
                                        "stats_age_s": given.get("stats_age_s"),
                                        "stats_age_source": given.get("stats_age_source")}
        return {"type": "decision", "id": self._id(ts), "ts": ts, "request_id": request_id,
                "internal_request_id": internal_request_id, "model_id": model_id, "attempt": attempt,
                "duration_us": duration_us, "n_candidates": len(replicas), "ranks": [list(r) for r in ranks],
                "replicas": replicas, **({} if reason is None else {"reason": reason, "scores": scores or {}})}

    def routed(self, ts: float, replica_id: str, decision: dict = None, rank=0, own_ranking: bool = True,
               attempts: int = 1, request_id: str = None, internal_request_id: str = None,
               queue_wait_ms: float = 0.5, quality: tuple = None) -> dict:
        """`quality`: (believed, shortest, reported) queue lengths of the answer (v2)."""
        if decision is not None:
            request_id = request_id or decision["request_id"]
            internal_request_id = internal_request_id or decision["internal_request_id"]
        return {"type": "routed", "id": self._id(ts), "ts": ts, "request_id": request_id,
                "internal_request_id": internal_request_id, "model_id": None, "replica_id": replica_id,
                "decision_id": decision["id"] if decision is not None else None, "rank": rank,
                "own_ranking": own_ranking, "attempts": attempts, "queue_wait_ms": queue_wait_ms,
                "attribution": "exact", **_quality(quality)}

    def completed(self, ts: float, replica_id: str, routed: dict = None, latency_ms: float = 12.5,
                  ok: bool = True, rejected: bool = False, internal_request_id: str = None,
                  decision: dict = None, quality: tuple = None) -> dict:
        """A refusal's (v2): `decision`, the one that supplied the replica, and `quality`,
        the answer's (believed, shortest, reported) queue lengths."""
        if routed is not None:
            internal_request_id = internal_request_id or routed["internal_request_id"]
        return {"type": "completed", "id": self._id(ts), "ts": ts, "internal_request_id": internal_request_id,
                "replica_id": replica_id, "latency_ms": None if rejected else latency_ms,
                "ok": None if rejected else ok, "rejected": rejected,
                "routed_id": routed["id"] if routed is not None else None,
                **({"decision_id": decision["id"]} if decision is not None else {}), **_quality(quality)}

    def replicas(self, ts: float, replica_ids) -> dict:
        members = [{"replica_id": r, "node_id": f"node-{r}", "availability_zone": "az-1",
                    "max_ongoing_requests": 5, "model_ids": []} for r in replica_ids]
        return {"type": "replicas", "id": self._id(ts), "ts": ts, "replicas": members}

    def stats(self, ts: float, replica_id: str, stats: dict, collected_at: float = None) -> dict:
        return {"type": "stats", "id": self._id(ts), "ts": ts, "replica_id": replica_id, "stats": stats,
                "collected_at": collected_at}


def _quality(quality: tuple = None) -> dict:
    """An answer's decision-quality fields (wire format v2), when given."""
    if quality is None:
        return {}
    return dict(zip(("believed_queue_len", "shortest_queue_len", "reported_queue_len"), quality))
