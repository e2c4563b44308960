"""Wire format v3 (docs/design.md): how a queued record becomes JSON.

`encode` runs on the exporter thread and turns one record (routers.records:
tuples of plain references the hooks queued) into the JSON text of one
event; `batch_json` wraps a source's encoded events into one batch.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from .ids import event_id
from .records import (
    C_DECISION,
    C_INTERNAL_REQUEST_ID,
    C_LATENCY_MS,
    C_OK,
    C_REJECTED,
    C_REPLICA_ID,
    C_REPORTED_QUEUE_LEN,
    C_ROUTED,
    COMPLETED,
    D_ATTEMPT,
    D_DURATION_S,
    D_EXPLANATION,
    D_N_CANDIDATES,
    D_QUEUE_LENS,
    D_RANKS,
    D_STATS_SEEN,
    D_TRACE,
    DECISION,
    KIND,
    M_MEMBERS,
    R_ATTEMPTS,
    R_ATTRIBUTION,
    R_DECISION,
    R_OWN_RANKING,
    R_QUEUE_WAIT_MS,
    R_RANK,
    R_REPLICA_ID,
    R_REPORTED_QUEUE_LEN,
    R_TRACE,
    REPLICAS,
    ROUTED,
    S_COLLECTED_AT,
    S_REPLICA_ID,
    S_STATS,
    SEQ,
    STATS,
    TS,
    RequestTrace,
    decision_id,
    queue_len_entry,
)
from .stats import STATS_TIMESTAMP_KEY, collected_at

WIRE_SCHEMA_VERSION = 3  # v2 and decisions' reasons and scores (docs/design.md)


def plain_stats(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The replica's routing_stats as it reported them, without our stamp."""
    if not stats:
        return {}
    return {str(k): v for k, v in stats.items() if k != STATS_TIMESTAMP_KEY}


# Events are written as JSON text directly, not built as dicts and then
# encoded: on the exporter thread every container allocated is work for the
# cyclic GC, whose collections pause the whole process (the router loop
# included) and, in a Ray driver with a large heap, cost several times the
# encoding itself. Strings and numbers are not tracked by the GC.
_quote = json.encoder.encode_basestring_ascii  # C: a str as a JSON string literal
_JSON = json.JSONEncoder(default=str, allow_nan=False, separators=(",", ":"), check_circular=False)


def _string(value: Any) -> str:
    if value is None:
        return "null"
    return _quote(value if isinstance(value, str) else str(value))


# Durations, ages and stamps are written to the microsecond (seconds) or the
# nanosecond (milliseconds): finer than the clocks they come from mean, and
# a third the cost of the shortest round-trip repr (17 digits for most small
# differences of two clock readings). Event timestamps keep the full repr.
_FIXED = "%.6f"


def _number(value: Any) -> str:
    # Strict JSON has no NaN or infinity: a replica reporting one is recorded as null.
    kind = type(value)
    if kind is float:  # the common cases first, without a call
        return _FIXED % value if value - value == 0.0 else "null"  # inf - inf and nan - nan are nan
    if kind is int:
        return repr(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "null"
    return _FIXED % float(value) if isinstance(value, float) else str(int(value))


def _flag(value: Optional[bool]) -> str:
    return "null" if value is None else ("true" if value else "false")


def _object(value: Any) -> str:
    """Arbitrary JSON-able data (stats, attributes); raises if it cannot be encoded."""
    try:
        return _JSON.encode(value)
    except ValueError:  # a non-finite float somewhere inside
        return _JSON.encode(_finite(value))


class _StatsText:
    """The JSON of each replica's current stats dict and its stamp, read once
    per change: the same dict object is ranked in many decisions. Used by the
    exporter thread only."""

    def __init__(self) -> None:
        self._cache: Dict[int, Tuple[Any, str, Optional[float]]] = {}

    def of(self, stats: Dict[str, Any]) -> Tuple[str, Optional[float]]:
        """(the stats as JSON, without our stamp; the stamp, if any) of a non-empty stats dict."""
        hit = self._cache.get(id(stats))
        if hit is not None and hit[0] is stats:
            return hit[1], hit[2]
        text, stamp = _object(plain_stats(stats)), collected_at(stats)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[id(stats)] = (stats, text, stamp)  # holding the dict keeps its id from being reused
        return text, stamp


_stats_text = _StatsText()


def _encode_decision(d: list) -> str:
    ts = d[TS]
    stats_seen = d[D_STATS_SEEN]
    queue_lens = d[D_QUEUE_LENS]
    candidates = []
    written = set()
    ranks = []
    for rank in d[D_RANKS]:
        keys = []
        for replica in rank:
            replica_id = replica.replica_id
            unique_id = replica_id.unique_id
            key = _quote(unique_id)
            keys.append(key)
            if key in written:
                continue
            written.add(key)
            seen = stats_seen.get(unique_id)
            stats = seen[0] if seen is not None else None
            if not stats:  # `{}` is Ray's "no stats (yet)": there is no value to be stale
                stats_text, stats_age, age_source = "{}", "null", "null"
            else:
                stats_text, stamp = _stats_text.of(stats)
                if stamp is not None:
                    stats_age, age_source = _number(ts - stamp), '"stamped"'
                else:
                    stats_age, age_source = _number(ts - seen[1]), '"observed"'
            entry = queue_lens.get(replica_id) if queue_lens is not None else None
            if entry is not None:
                queue_len, queue_age = _number(entry.queue_len), _number(ts - entry.timestamp)
            else:
                queue_len = queue_age = "null"
            candidates.append(
                f'{key}:{{"queue_len":{queue_len},"queue_len_age_s":{queue_age},"stats":{stats_text},'
                f'"stats_age_s":{stats_age},"stats_age_source":{age_source}}}'
            )
        ranks.append(f"[{','.join(keys)}]")
    trace = d[D_TRACE]
    attributes = ""
    if trace is None:
        request_ids = '"request_id":null,"internal_request_id":null,"model_id":null'
    else:
        request_ids = trace.wire_ids or request_ids_json(trace)
        if trace.attributes:
            attributes = f',"attributes":{_object(trace.attributes)}'
    explanation = d[D_EXPLANATION]
    if explanation is not None:
        attributes += _explanation(explanation)
    # ts, attempt, duration and n_candidates come from our clock and counters: finite numbers.
    return (
        f'{{"type":"decision","id":"{decision_id(d)}","ts":{ts!r},{request_ids},'
        f'"attempt":{d[D_ATTEMPT]},"duration_us":{int(d[D_DURATION_S] * 1e6)},'
        f'"n_candidates":{d[D_N_CANDIDATES]},'
        f'"ranks":[{",".join(ranks)}],"replicas":{{{",".join(candidates)}}}{attributes}}}'
    )


def _explanation(explanation: Tuple[str, Dict[str, float]]) -> str:
    """A decision's `reason` and `scores` members: routers.explanations bounded them, the scores to finite
    floats, written in full (a match rate of 1e-7 is not 0)."""
    reason, scores = explanation
    members = ",".join(f"{_quote(name)}:{value!r}" for name, value in scores.items())
    return f',"reason":{_quote(reason)},"scores":{{{members}}}'


def _decision_quality(decision: Optional[list], replica_id: Any, reported_queue_len: Any) -> str:
    """An answer's decision-quality members (docs/design.md): the replica's
    queue length as the decision that supplied it saw it, the shortest the
    router saw at that decision, and the count the replica reported."""
    believed = shortest = None
    if decision is not None:
        entry = queue_len_entry(decision, replica_id)
        believed = None if entry is None else entry.queue_len
        queue_lens = decision[D_QUEUE_LENS]
        if queue_lens:
            shortest = min(other.queue_len for other in queue_lens.values())
    # Values from Ray and the replica: written through the checks numbers from outside go through.
    return (f'"believed_queue_len":{_number(believed)},"shortest_queue_len":{_number(shortest)},'
            f'"reported_queue_len":{_number(reported_queue_len)}')


def _decision_ref(decision: Optional[list]) -> str:
    return "null" if decision is None else f'"{decision_id(decision)}"'


def request_ids_json(trace: RequestTrace) -> str:
    """The request's ids as JSON members, formatted once per request: its
    decisions and routed events all carry them."""
    meta = trace.metadata
    trace.wire_ids = (f'"request_id":{_string(meta.request_id)},'
                      f'"internal_request_id":{_string(meta.internal_request_id)},'
                      f'"model_id":{_string(meta.multiplexed_model_id or None)}')
    return trace.wire_ids


def encode(item: tuple) -> str:
    """One queued record -> one wire-format event, as JSON text."""
    kind = item[KIND]
    if kind == DECISION:
        return _encode_decision(item)
    # Times, latencies and waits come from our clocks (finite floats), ints
    # from our counters, attribution from our constants and replica ids are
    # ReplicaID.unique_id (a str): written as they are, without the checks
    # that values from Ray or a replica go through.
    ts = item[TS]
    head = f'"id":"{event_id(ts, item[SEQ])}","ts":{ts!r}'
    if kind == ROUTED:
        trace, decision, rank = item[R_TRACE], item[R_DECISION], item[R_RANK]
        return (
            f'{{"type":"routed",{head},'
            f'{trace.wire_ids or request_ids_json(trace)},"replica_id":{_quote(item[R_REPLICA_ID].unique_id)},'
            f'"decision_id":{_decision_ref(decision)},"rank":{"null" if rank is None else rank},'
            f'"own_ranking":{_flag(item[R_OWN_RANKING])},"attempts":{item[R_ATTEMPTS]},'
            f'"queue_wait_ms":{_number(item[R_QUEUE_WAIT_MS])},"attribution":"{item[R_ATTRIBUTION]}",'
            f'{_decision_quality(decision, item[R_REPLICA_ID], item[R_REPORTED_QUEUE_LEN])}}}'
        )
    if kind == COMPLETED:
        latency_ms, routed = item[C_LATENCY_MS], item[C_ROUTED]
        routed_ref = "null" if routed is None else f'"{event_id(*routed)}"'
        answer = ""
        if item[C_REJECTED]:
            # A refusal is an answer: like a routed event, it names the decision that supplied the replica
            # and carries the decision-quality members.
            decision = item[C_DECISION]
            answer = (f',"decision_id":{_decision_ref(decision)},'
                      f'{_decision_quality(decision, item[C_REPLICA_ID], item[C_REPORTED_QUEUE_LEN])}')
        return (
            f'{{"type":"completed",{head},'
            f'"internal_request_id":{_string(item[C_INTERNAL_REQUEST_ID])},'
            f'"replica_id":{_quote(item[C_REPLICA_ID].unique_id)},'
            f'"latency_ms":{"null" if latency_ms is None else _FIXED % latency_ms},"ok":{_flag(item[C_OK])},'
            f'"rejected":{_flag(item[C_REJECTED])},"routed_id":{routed_ref}{answer}}}'
        )
    if kind == REPLICAS:
        return f'{{"type":"replicas",{head},"replicas":{_object(item[M_MEMBERS])}}}'
    if kind == STATS:
        return (f'{{"type":"stats",{head},'
                f'"replica_id":{_quote(item[S_REPLICA_ID].unique_id)},"stats":{_object(plain_stats(item[S_STATS]))},'
                f'"collected_at":{_number(item[S_COLLECTED_AT])}}}')
    raise ValueError(f"unknown event kind {kind!r}")


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
    from events already encoded by `encode`.

    `produced` (events this source generated, dropped ones included) is an
    addition to v1 that the collector keeps as an unknown field: it makes
    produced == stored + dropped checkable.
    """
    head = json.dumps(
        {"schema_version": WIRE_SCHEMA_VERSION, "source": source, "seq": seq, "dropped": dropped, "produced": produced},
        default=str, separators=(",", ":"),
    )
    return (head[:-1] + ',"events":[' + ",".join(event_parts) + "]}").encode()
