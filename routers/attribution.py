"""FIFO attribution: which decision supplied a routed request's replica.

With FIFOMixin (which Ray's default pow-2 router uses) a replica found by
request A's routing task is often given to request B, the head of the
queue. `TracingMixin` hooks the fulfilment (`on_fulfil_start`, then
`on_recipient` for whichever request receives the replica; both private
RequestRouter methods, routers.ray_contract), so each `routed` record
names the decision that really supplied its replica, its rank in that
decision, and whether that decision was made for this request
(`own_ranking`): attribution "exact".

The fulfilment runs in the routing task that found the replica, in the
step after it selected it from the ranking of the task's latest decision
(routers.decisions keeps it per task). A's latest decision would not do: a
retried request can be routed by two tasks at once, and one of them may
still fulfil after A was routed and completed.

When Ray lacks those methods, or a request was routed without a
fulfilment the tracer could place, the routed record names the request's
own last decision ("last_decision").
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

from .decisions import routing_task
from .exporter import Source
from .ids import next_seq
from .records import D_EXPORTED, D_TRACE, ROUTED, RequestTrace, rank_of


class FifoAttribution:
    # Provided by the composed RouterTracer.
    source: Optional[Source]
    _submit: Callable[[Any], None]
    _configure_from_env: Callable[[], None]
    _loop: Any  # routers.tracer
    _loop_or_bind: Callable[[], Any]  # routers.tracer
    _decision_by_task: Dict[Any, list]  # routers.decisions
    _new_trace: Callable[[Any], RequestTrace]  # routers.decisions
    _export_decision: Callable[[list], None]  # routers.decisions
    _track_attempt: Callable[..., None]  # routers.completions

    def __init__(self, router: Any, init_kwargs: Any, **options: Any):
        super().__init__(router, init_kwargs, **options)
        # (replica, the decision that ranked it or None, its rank there) during a fulfilment.
        self.fulfilling: Optional[Tuple[Any, Optional[list], Optional[int]]] = None
        # The request a replica just accepted, the count of ongoing requests it reported and when it was
        # sent (monotonic, None if unknown), set by the mixin as Ray's sender reads the answer
        # (on_new_queue_len_info); on_routed, which Ray calls next in the same step, takes them.
        # Attributes rather than a tuple: nothing to build per request.
        self.accepted_request: Any = None
        self.accepted_queue_len: Optional[int] = None
        self.accepted_sent_at: Optional[float] = None

    def on_fulfil_start(self, replica: Any, request_metadata: Any) -> None:
        # Ray fulfils from the routing task that found the replica, with the
        # metadata of the request that task was routing.
        decision = self._decision_by_task.get(routing_task())
        rank = None
        if decision is not None and decision[D_TRACE] is not None and (
                decision[D_TRACE].metadata is request_metadata):
            rank = rank_of(decision, replica.replica_id)
        # on_routed takes the rank from here; without one, the fulfilment could not be placed.
        self.fulfilling = (replica, decision, rank) if rank is not None else (replica, None, None)

    def on_recipient(self, pending_request: Any) -> None:
        if self.fulfilling is not None:
            trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
            trace.handoff = self.fulfilling
            trace.handed_at = time.monotonic()  # see CompletionPairing._track_attempt
            decision = self.fulfilling[1]
            if trace.sampled and decision is not None and not decision[D_EXPORTED]:
                # A sampled request got a replica from a sampled-out request's
                # decision: export it now, before that request decides again
                # and settles it as sampled out.
                self._export_decision(decision)

    def on_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        """The replica accepted the request (or Ray sent it without asking):
        record it, naming the decision that supplied the replica, and wait
        for its completion."""
        if self._loop is None:
            if self.source is None:
                self._configure_from_env()
            self._loop_or_bind()
        now = time.time()
        reported = sent_at = None
        if self.accepted_request is pending_request:  # else Ray sent it without asking the replica
            reported, sent_at, self.accepted_request = self.accepted_queue_len, self.accepted_sent_at, None
        trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
        handoff, trace.handoff = trace.handoff, None
        if handoff is not None and handoff[1] is not None and (
                handoff[0].replica_id is replica_id or handoff[0].replica_id == replica_id):
            decision, rank, attribution = handoff[1], handoff[2], "exact"
        else:
            decision, rank, attribution = trace.last_decision, None, "last_decision"
        if not trace.sampled:
            self.source.count_unqueued("sampled_out")
            return
        own = None
        if decision is not None:  # exported already: by its own request, or by on_recipient
            if rank is None:
                rank = rank_of(decision, replica_id)
            own = decision[D_TRACE] is trace
        seq = next_seq()
        routed_at = time.monotonic()
        # The routed record (routers.records, slots R_*), built here only.
        self._submit((self.source, ROUTED, now, seq, trace, replica_id, decision, rank, own, trace.decisions,
                      (now - pending_request.created_at) * 1000.0, attribution, reported,
                      None if sent_at is None else (routed_at - sent_at) * 1000.0))
        self._track_attempt(trace, replica_id, now, seq, routed_at if sent_at is None else sent_at,
                            handoff is not None, result)

    def answered_decision(self, trace: RequestTrace, replica_id: Any) -> Optional[list]:
        """The decision that supplied the replica a request was sent to, as
        on_routed finds it, for an answer other than an acceptance (a refusal):
        the hand-off's, else the request's own last decision. Consumes the hand-off."""
        handoff, trace.handoff = trace.handoff, None
        if handoff is not None and handoff[1] is not None and (
                handoff[0].replica_id is replica_id or handoff[0].replica_id == replica_id):
            return handoff[1]
        return trace.last_decision
