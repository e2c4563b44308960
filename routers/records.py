"""The records the tracer queues for export: one layout and one builder each.

A record is what a hook hands the exporter's queue: a tuple (a list for a
decision) of plain references, such as replica ids, cache entries, stats
dicts and request metadata, with no formatting and no copying. The exporter
thread turns each record into the JSON text of one wire-format event
(`routers.wire.encode`), reading its slots by the names below.

Why tuples and index names rather than a class: a hook builds one or two
records per request on Ray's router loop, and a tuple (or list) is the
cheapest object CPython builds; a `__slots__` class or a NamedTuple costs a
Python-level constructor call more per record. Each record is built in one
place: by its builder below, or, for the two the hot path builds on every
request, in the one hook that makes it (decisions: DecisionRecording.on_decision;
routed: FifoAttribution.on_routed), because with Ray's work evicting the CPU
caches between hooks a builder's call costs each about a microsecond
(bench/tracer_ab.py). A layout and its slot names change together here;
tests/test_tracer_offline.py checks the two built in place against them.

Every record starts with SOURCE, KIND and TS: the Source that produced it
(the exporter groups by it), the event type and the event's wall-clock
time. All but decisions then have SEQ, the sequence number their event id
is made from; a decision draws its id only when it is first encoded
(`decision_id`), so the hot path never pays for one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .ids import event_id, next_seq

DECISION = "decision"
ROUTED = "routed"
COMPLETED = "completed"
REPLICAS = "replicas"
STATS = "stats"

# Slots every record has.
SOURCE = 0
KIND = 1
TS = 2
SEQ = 3  # all but decisions


class RequestTrace:
    """What the tracer keeps on a PendingRequest (as `pr._routelens`) while it
    is routed: its sampling, its decisions and how it was handed its replica."""

    __slots__ = ("metadata", "sampled", "decisions", "last_decision", "handoff", "handed_at", "attributes",
                 "wire_ids")

    def __init__(self, metadata: Any, sampled: bool, attributes: Optional[Dict[str, Any]]):
        self.metadata = metadata
        self.sampled = sampled
        self.decisions = 0  # choose_replicas calls made for this request
        self.last_decision: Optional[list] = None  # its latest decision record (D_* slots)
        # (replica, the decision that ranked it or None, its rank there), set
        # when a fulfilment hands this request a replica (routers.attribution).
        self.handoff: Optional[Tuple[Any, Optional[list], Optional[int]]] = None
        self.handed_at = 0.0  # monotonic time of the last hand-off
        self.attributes = attributes
        self.wire_ids: Optional[str] = None  # see wire.request_ids_json; written by the exporter thread only


# -- decision: one choose_replicas call, its ranking and the inputs it ranked on.
# A list, not a tuple: attribution marks it exported, and the exporter thread
# writes the id. The same list is the record attribution keeps and the item
# queued for export.
# Built in DecisionRecording.on_decision only: [SOURCE, KIND (DECISION), TS, D_TRACE ... D_EXPLANATION].
D_TRACE = 3  # the request's RequestTrace (None when choose_replicas got no request)
D_ATTEMPT = 4  # 0-based choose_replicas call for this request
D_DURATION_S = 5  # time spent in the wrapped choose_replicas
D_N_CANDIDATES = 6
D_RANKS = 7  # the list of lists of RunningReplica returned by the router
# A copy of the router's queue-length cache at decision time (ReplicaID -> entry; None: the router has
# none). Ray keeps an entry per replica it routes to, the candidates it gives choose_replicas, and replaces
# entries rather than changing them: the copy holds what the router saw of each, the ranked replicas' and
# the shortest of all (regret), which the exporter thread reads. One C-level copy costs less on the hot path
# than looking up the ranked replicas' entries, and less again than finding the minimum there.
D_QUEUE_LENS = 8
D_STATS_SEEN = 9  # the tracer's unique_id -> (routing_stats, first seen) snapshot at decision time
D_EXPORTED = 10  # queued for export (a sampled-out decision is not, unless it supplies a sampled request)
D_ID = 11  # drawn by decision_id() on the exporter thread
D_EXPLANATION = 12  # (reason, {score name: float}) from routelens_explain (routers.explanations), or None


def decision_id(decision: list) -> str:
    # Drawn on the exporter thread, the first time the decision or a routed
    # event naming it is encoded: the hot path never pays for an id.
    if decision[D_ID] is None:
        decision[D_ID] = event_id(decision[TS], next_seq())
    return decision[D_ID]


def queue_len_entry(decision: list, replica_id: Any) -> Any:
    """The queue-length cache entry the router had for the replica at `decision`, or None."""
    queue_lens = decision[D_QUEUE_LENS]
    return None if queue_lens is None else queue_lens.get(replica_id)


def rank_of(decision: list, replica_id: Any) -> Optional[int]:
    """The index of the rank of `decision` that holds the replica, or None."""
    for index, rank in enumerate(decision[D_RANKS]):
        for replica in rank:
            other = replica.replica_id
            # Ray passes the replica's own ReplicaID object: `is` spares the
            # dataclass's __eq__, a Python call, in the common case.
            if other is replica_id or other == replica_id:
                return index
    return None


# -- routed: a request's replica accepted it, and the decision that supplied the replica.
# Built in FifoAttribution.on_routed only: (SOURCE, KIND (ROUTED), TS, SEQ, R_TRACE ... R_SEND_TO_ROUTED_MS).
R_TRACE = 4  # the request's RequestTrace
R_REPLICA_ID = 5
R_DECISION = 6  # the decision record whose ranking supplied the replica (None: unknown)
R_RANK = 7  # the index of the rank the replica came from (None: unknown)
R_OWN_RANKING = 8  # whether that decision was made for this request (None: no decision)
R_ATTEMPTS = 9  # decisions made for this request
R_QUEUE_WAIT_MS = 10  # from the request's arrival to its routing
R_ATTRIBUTION = 11  # "exact" or "last_decision"
R_REPORTED_QUEUE_LEN = 12  # the replica's count of ongoing requests when it accepted, this one included (None: unknown)
# From the send to on_request_routed: the replica's answer, and how long the router's loop took to resume the
# sender after it (None: not sent by Ray's usual sender, which asks the replica first).
R_SEND_TO_ROUTED_MS = 13


# -- completed: one send attempt finished (accepted, refused, or sent unrouted).
C_INTERNAL_REQUEST_ID = 4
C_REPLICA_ID = 5
C_LATENCY_MS = 6  # None: unknown
C_OK = 7  # None: unknown
C_REJECTED = 8
C_ROUTED = 9  # (ts, seq) of the routed event this completes, its id's parts; None for a refusal or a broadcast
# A refusal's: the decision whose ranking supplied the replica, and the count of ongoing requests the replica
# reported as it refused (None: unknown, and for every other completion).
C_DECISION = 10
C_REPORTED_QUEUE_LEN = 11


def completed_record(source: Any, ts: float, internal_request_id: str, replica_id: Any,
                     latency_ms: Optional[float], ok: Optional[bool], rejected: bool,
                     routed: Optional[Tuple[float, int]], decision: Optional[list] = None,
                     reported_queue_len: Optional[int] = None) -> tuple:
    return (source, COMPLETED, ts, next_seq(), internal_request_id, replica_id, latency_ms, ok, rejected, routed,
            decision, reported_queue_len)


# -- replicas: the full membership, on each update_replicas that changed it.
M_MEMBERS = 4  # [{replica_id, node_id, availability_zone, max_ongoing_requests, model_ids}], sorted


def replicas_record(source: Any, ts: float, members: List[Dict[str, Any]]) -> tuple:
    return (source, REPLICAS, ts, next_seq(), members)


# -- stats: a replica's routing_stats changed as this router sees them.
S_REPLICA_ID = 4
S_STATS = 5  # the dict as Ray delivered it, our stamp included
S_COLLECTED_AT = 6  # the stamp (routers.stats), or None


def stats_record(source: Any, ts: float, replica_id: Any, stats: Dict[str, Any],
                 collected_at: Optional[float]) -> tuple:
    return (source, STATS, ts, next_seq(), replica_id, stats, collected_at)
