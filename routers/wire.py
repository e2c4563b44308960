"""Wire format v1: what the hot path queues, and how it becomes JSON.

The hot path queues tuples of references (replica ids, cache entries, stats
dicts, request metadata): no formatting, no copying. `encode` runs on the
exporter thread and turns one queued item into one event dict. Every item
starts with `(source, kind, ts, seq, ...)`, except decisions, whose record is
shared with the attribution logic and carries its own ts and seq.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from routers.ids import event_id, next_seq
from routers.stats import STATS_TIMESTAMP_KEY, collected_at

SCHEMA_VERSION = 1

DECISION = "decision"
ROUTED = "routed"
COMPLETED = "completed"
REPLICAS = "replicas"
STATS = "stats"


class RequestTrace:
    """What the tracer keeps on a PendingRequest (as `pr._routelens`)."""

    __slots__ = ("metadata", "sampled", "decisions", "last_decision", "handoff", "attributes")

    def __init__(self, metadata: Any, sampled: bool, attributes: Optional[Dict[str, Any]]):
        self.metadata = metadata
        self.sampled = sampled
        self.decisions = 0  # choose_replicas calls made for this request
        self.last_decision: Optional[Decision] = None
        # (replica, decision) set when a fulfilment hands this request a replica.
        self.handoff: Optional[tuple] = None
        self.attributes = attributes


class Decision:
    """One `choose_replicas` call: its ranking and the inputs it ranked on."""

    __slots__ = (
        "ts", "trace", "attempt", "duration_s", "n_candidates", "ranks", "queue_lens", "stats_seen",
        "exported", "previous", "_id",
    )

    def __init__(self, ts, trace, attempt, duration_s, n_candidates, ranks, queue_lens, stats_seen,
                 previous, exported):
        self.ts = ts
        self.trace: Optional[RequestTrace] = trace
        self.attempt = attempt
        self.duration_s = duration_s
        self.n_candidates = n_candidates
        self.ranks = ranks  # the list of lists of RunningReplica returned by the router
        # Queue-length cache entries of the ranked replicas, in rank order (None: unknown).
        self.queue_lens = queue_lens
        # The tracer's ReplicaID -> (routing_stats, first seen) snapshot at decision time.
        self.stats_seen = stats_seen
        # Queued for export (or counted as sampled out, once settled).
        self.exported = exported
        # The same request's decision before this one, until the request completes.
        self.previous: Optional[Decision] = previous
        self._id: Optional[str] = None

    @property
    def id(self) -> str:
        # Drawn on the exporter thread, the first time the decision or a routed
        # event naming it is encoded: the hot path never pays for an id.
        if self._id is None:
            self._id = event_id(self.ts, next_seq())
        return self._id

    def rank_of(self, replica_id: Any) -> Optional[int]:
        for index, rank in enumerate(self.ranks):
            for replica in rank:
                if replica.replica_id == replica_id:
                    return index
        return None


def plain_stats(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The replica's routing_stats as it reported them, without our stamp."""
    if not stats:
        return {}
    return {str(k): v for k, v in stats.items() if k != STATS_TIMESTAMP_KEY}


def _encode_decision(d: Decision) -> Dict[str, Any]:
    ts = d.ts
    stats_seen = d.stats_seen
    queue_lens = d.queue_lens
    replicas: Dict[str, Dict[str, Any]] = {}
    ranks = []
    position = 0  # queue_lens follows the ranked replicas in rank order
    for rank in d.ranks:
        keys = []
        for replica in rank:
            replica_id = replica.replica_id
            key = replica_id.unique_id
            keys.append(key)
            entry = queue_lens[position] if queue_lens is not None else None
            position += 1
            if key in replicas:
                continue
            seen = stats_seen.get(replica_id)
            stats = seen[0] if seen is not None else None
            stamp = collected_at(stats)
            if stamp is not None:
                stats_age, age_source = ts - stamp, "stamped"
            elif seen is not None:
                stats_age, age_source = ts - seen[1], "observed"
            else:
                stats_age, age_source = None, None
            replicas[key] = {
                "queue_len": entry.queue_len if entry is not None else None,
                "queue_len_age_s": ts - entry.timestamp if entry is not None else None,
                "stats": plain_stats(stats),
                "stats_age_s": stats_age,
                "stats_age_source": age_source,
            }
        ranks.append(keys)
    meta = d.trace.metadata if d.trace is not None else None
    event = {
        "type": DECISION,
        "id": d.id,
        "ts": ts,
        "request_id": meta.request_id if meta is not None else None,
        "internal_request_id": meta.internal_request_id if meta is not None else None,
        "model_id": (meta.multiplexed_model_id or None) if meta is not None else None,
        "attempt": d.attempt,
        "duration_us": int(d.duration_s * 1e6),
        "n_candidates": d.n_candidates,
        "ranks": ranks,
        "replicas": replicas,
    }
    if d.trace is not None and d.trace.attributes:
        event["attributes"] = d.trace.attributes
    return event


def encode(item: tuple) -> Dict[str, Any]:
    """One queued item -> one wire-format event."""
    kind = item[1]
    if kind == DECISION:
        return _encode_decision(item[2])
    if kind == ROUTED:
        _, _, ts, seq, trace, replica_id, decision, rank, own, attempts, wait_ms, attribution = item
        meta = trace.metadata
        return {
            "type": ROUTED, "id": event_id(ts, seq), "ts": ts,
            "request_id": meta.request_id,
            "internal_request_id": meta.internal_request_id,
            "model_id": meta.multiplexed_model_id or None,
            "replica_id": replica_id.unique_id,
            "decision_id": decision.id if decision is not None else None,
            "rank": rank,
            "own_ranking": own,
            "attempts": attempts,
            "queue_wait_ms": wait_ms,
            "attribution": attribution,
        }
    if kind == COMPLETED:
        _, _, ts, seq, internal_request_id, replica_id, latency_ms, ok, rejected, routed = item
        return {
            "type": COMPLETED, "id": event_id(ts, seq), "ts": ts,
            "internal_request_id": internal_request_id,
            "replica_id": replica_id.unique_id,
            "latency_ms": latency_ms,
            "ok": ok,
            "rejected": rejected,
            "routed_id": event_id(*routed) if routed is not None else None,
        }
    if kind == REPLICAS:
        _, _, ts, seq, members = item
        return {"type": REPLICAS, "id": event_id(ts, seq), "ts": ts, "replicas": members}
    if kind == STATS:
        _, _, ts, seq, replica_id, stats, stamp = item
        return {"type": STATS, "id": event_id(ts, seq), "ts": ts, "replica_id": replica_id.unique_id,
                "stats": plain_stats(stats), "collected_at": stamp}
    raise ValueError(f"unknown event kind {kind!r}")


# One encoder for every chunk. Events are trees of fresh dicts and lists built
# by `encode`, never circular, so the circularity check is skipped.
_JSON = json.JSONEncoder(default=str, allow_nan=False, separators=(",", ":"), check_circular=False)


def events_json(events: List[Dict[str, Any]]) -> Tuple[str, int]:
    """Events as the comma-separated inside of a JSON array, and how many made it.

    Non-finite floats (a replica reporting NaN in its stats) become null:
    strict JSON has no NaN, and dropping the event would lose the decision.
    An event that still cannot be encoded (say, a stats dict with tuple keys)
    is left out; the caller counts it as dropped.
    """
    try:
        return _JSON.encode(events)[1:-1], len(events)
    except Exception:
        pass
    parts = []
    for event in events:
        try:
            parts.append(_JSON.encode(_finite(event)))
        except Exception:
            continue
    return ",".join(parts), len(parts)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def batch_json(source: Dict[str, Any], seq: int, dropped: Dict[str, int], produced: int,
               event_parts: List[str]) -> bytes:
    """The body of one POST /v1/events (and one line of the JSON Lines sink),
    from events already encoded by `events_json`.

    `produced` (events this source generated, dropped ones included) is an
    addition to v1 that the collector keeps as an unknown field: it makes
    produced == stored + dropped checkable.
    """
    head = json.dumps(
        {"schema_version": SCHEMA_VERSION, "source": source, "seq": seq, "dropped": dropped, "produced": produced},
        default=str, separators=(",", ":"),
    )
    return (head[:-1] + ',"events":[' + ",".join(event_parts) + "]}").encode()
