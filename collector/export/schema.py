"""The export's tables and their columns: schema version `EXPORT_SCHEMA_VERSION`,
documented in docs/export.md (a test holds the two together).

- `decisions` (default): one row per decision, with its outcome joined: the
  `routed` event that names it (the replica its ranking supplied; the
  request may be another one, a FIFO hand-off) and that routing's
  `completed` event. A decision whose replica refused the request has no
  routed event: the rejection of its request that followed it is joined
  instead (`rejected` true);
- `candidates`: one row per ranked replica of each decision, with the inputs
  it was ranked on;
- `routed`: one row per routed event, with its completion;
- `completed`: one row per completion, rejections included;
- `events` (JSON Lines only): the raw events of each source as wire-format
  batches of this version, one per line, the form the tracer's local sink
  writes and `routelens import` loads: a lossless copy from one database to
  another (see `collector.export.wire_batches`). It has no columns of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import pyarrow as pa

EXPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Column:
    name: str
    arrow: pa.DataType  # its Parquet type; CSV and JSON Lines follow from it (see the writers)
    doc: str


TIME = pa.timestamp("us", tz="UTC")
LABELS = pa.map_(pa.string(), pa.string())
SCORES = pa.map_(pa.string(), pa.float64())
CANDIDATE = pa.struct([
    ("replica_id", pa.string()), ("rank", pa.int32()), ("queue_len", pa.int64()),
    ("queue_len_age_s", pa.float64()), ("stats_age_s", pa.float64()), ("stats_age_source", pa.string()),
    ("stats", pa.string()),
])

_ROUTER = [
    Column("app", pa.string(), "Serve application"),
    Column("deployment", pa.string(), "deployment"),
    Column("router_class", pa.string(), "router class, module.QualName"),
    Column("source_id", pa.string(), "the traced router instance that recorded the event"),
    Column("labels", LABELS, "the router's labels (CSV: a JSON object)"),
]
DECISION = [  # a decision's own columns, first in `decisions` and repeated per candidate in `candidates`
    Column("decision_id", pa.string(), "the decision's event id (UUIDv7)"),
    Column("time", TIME, "when choose_replicas ran (CSV, JSON Lines: ISO-8601 UTC)"),
    *_ROUTER,
    Column("request_id", pa.string(), "Ray's request id"),
    Column("internal_request_id", pa.string(), "Ray's internal request id"),
    Column("model_id", pa.string(), "multiplexed model id"),
    Column("attempt", pa.int32(), "0-based choose_replicas call for this request"),
    Column("duration_us", pa.int64(), "time spent in the wrapped choose_replicas"),
    Column("n_candidates", pa.int32(), "candidates the router was given"),
]
ANSWER = [  # the decision quality of a replica's answer (a routing or a refusal), last in the tables that have it
    Column("believed_queue_len", pa.int64(),
           "the replica's queue length as the router saw it at the decision (null: unknown)"),
    Column("shortest_queue_len", pa.int64(),
           "the shortest queue length among all the candidates, as the router saw them (null: unknown)"),
    Column("regret", pa.int64(), "believed_queue_len minus shortest_queue_len"),
    Column("reported_queue_len", pa.int64(),
           "ongoing requests the replica reported as it answered (accepting: this one included)"),
    Column("belief_error", pa.int64(),
           "the queue length the router saw minus the replica's before this request (positive: overestimated)"),
]
COLUMNS: Dict[str, List[Column]] = {
    "decisions": [
        *DECISION,
        Column("ranks", pa.list_(pa.list_(pa.string())), "replica ids per rank, rank 0 first (CSV: JSON)"),
        Column("candidates", pa.list_(CANDIDATE), "each ranked replica's inputs (CSV: JSON)"),
        Column("chosen_replica", pa.string(), "the replica the request went to"),
        Column("rank", pa.int32(), "the rank it came from (null: unknown)"),
        Column("own_ranking", pa.bool_(), "false: FIFO gave this ranking's replica to another request"),
        Column("queue_wait_ms", pa.float64(), "time from the request's arrival to its routing"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "the request completed without error"),
        Column("rejected", pa.bool_(), "the chosen replica refused the request"),
        *ANSWER,
        Column("reason", pa.string(), "the router's reason for the decision (routelens_explain; null: none given)"),
        Column("scores", SCORES, "the numbers the router gave with it (CSV: a JSON object; null: no reason)"),
    ],
    "candidates": [
        *DECISION,
        Column("candidate_rank", pa.int32(), "the rank this replica was in"),
        Column("replica_id", pa.string(), "the ranked replica"),
        Column("node_id", pa.string(), "its node"),
        Column("availability_zone", pa.string(), "its availability zone"),
        Column("queue_len", pa.int64(), "its queue length as the router saw it"),
        Column("queue_len_age_s", pa.float64(), "age of that queue length"),
        Column("stats_age_s", pa.float64(), "age of its routing stats"),
        Column("stats_age_source", pa.string(), "stamped (exact) or observed (an upper bound)"),
        Column("stats", pa.string(), "its routing stats, JSON"),
        Column("chosen", pa.bool_(), "the decision's request went to this replica"),
    ],
    "routed": [
        Column("routed_id", pa.string(), "the routed event's id"),
        Column("time", TIME, "when the request was routed"),
        *_ROUTER,
        Column("request_id", pa.string(), "Ray's request id"),
        Column("internal_request_id", pa.string(), "Ray's internal request id"),
        Column("model_id", pa.string(), "multiplexed model id"),
        Column("replica_id", pa.string(), "the replica it went to"),
        Column("decision_id", pa.string(), "the decision whose ranking supplied the replica"),
        Column("rank", pa.int32(), "the rank the replica came from (null: unknown)"),
        Column("own_ranking", pa.bool_(), "false: a FIFO hand-off"),
        Column("attempts", pa.int32(), "decisions made for this request"),
        Column("queue_wait_ms", pa.float64(), "time from arrival to routing"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "completed without error"),
        *ANSWER,
    ],
    "completed": [
        Column("completed_id", pa.string(), "the completed event's id"),
        Column("time", TIME, "when the request completed"),
        *_ROUTER,
        Column("internal_request_id", pa.string(), "Ray's internal request id"),
        Column("replica_id", pa.string(), "the replica"),
        Column("routed_id", pa.string(), "the routed event it completes (null for a rejection)"),
        Column("latency_ms", pa.float64(), "time from routing to completion"),
        Column("ok", pa.bool_(), "completed without error"),
        Column("rejected", pa.bool_(), "the replica refused the request"),
        Column("decision_id", pa.string(), "a rejection's: the decision that supplied the replica (null: unknown)"),
        *ANSWER,  # a rejection's; null for the other completions
    ],
}


def arrow_schema(what: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow) for c in COLUMNS[what]],
                     metadata={"routelens.export": what, "routelens.export_schema_version": str(EXPORT_SCHEMA_VERSION)})


def record_batch(what: str, columns: Dict[str, pa.Array]) -> pa.RecordBatch:
    """A batch of table `what` from its columns' arrays, by name."""
    schema = arrow_schema(what)
    return pa.record_batch([columns[name] for name in schema.names], schema=schema)
