"""Recording decisions: each `choose_replicas` ranking and what it ranked on.

A request's first decision gives it a RequestTrace (kept on the
PendingRequest, which Ray reuses across retries), and with it its sampling,
decided from its internal request id so that every process keeps or drops
the request whole. A request's decisions are linked newest first
(D_PREVIOUS) until it completes, because FIFO attribution
(routers.attribution) may still find its replica in an older one. A
sampled-out decision is not queued, but stays linked: it is exported after
all if it supplies a replica to a sampled request, and counted as sampled
out once its request is done.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from .exporter import Source
from .faults import faults
from .ids import is_sampled
from .ray_contract import queue_len_lookup
from .records import D_EXPORTED, D_PREVIOUS, DECISION, RequestTrace

# Requests not yet routed, per router. Beyond this the oldest are forgotten,
# so requests that never complete (cancelled) cannot grow memory.
MAX_OPEN_REQUESTS = 100_000


class DecisionRecording:
    # Provided by the composed RouterTracer.
    _router: Any
    config: Any
    source: Optional[Source]
    _submit: Callable[[Any], None]
    _configure_from_env: Callable[[], None]
    _stats_seen: Dict[str, Tuple[Any, float]]  # routers.membership

    def __init__(self, router: Any, init_kwargs: Any, *, records_attributes: bool = False, **options: Any):
        super().__init__(router, init_kwargs, **options)
        self._records_attributes = records_attributes
        # Private in Ray 2.60 (routers.ray_contract): without it, queue_len is unknown.
        self._queue_len_get = queue_len_lookup(router)
        # id(RequestMetadata) -> the request's trace, until its accepted attempt
        # completes: how a fulfilment, which names only the metadata, finds
        # the decisions that may have supplied its replica.
        self._trace_by_metadata: Dict[int, RequestTrace] = {}

    def on_decision(self, candidates: List[Any], pending_request: Any, ranks: List[List[Any]],
                    started: float, now: float) -> None:
        # The hot path: runs for every choose_replicas call. Kept to plain
        # references (no copies, no formatting, one list for the record, which
        # is also the queued item) so it costs about a microsecond.
        source = self.source
        if source is None:
            self._configure_from_env()
            source = self.source
        if pending_request is None:  # not called by Ray's routing loop: nothing to sample by
            trace, attempt, previous, sampled = None, 0, None, True
        else:
            trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
            attempt = trace.decisions
            trace.decisions = attempt + 1
            previous, sampled = trace.last_decision, trace.sampled
        get = self._queue_len_get
        queue_lens = None
        if get is not None:
            if len(ranks) == 1:
                rank = ranks[0]
                if len(rank) == 2:  # pow-2's shape: unpacking is cheaper than a comprehension
                    first, second = rank
                    queue_lens = (get(first.replica_id), get(second.replica_id))
                else:
                    queue_lens = [get(replica.replica_id) for replica in rank]
            else:
                queue_lens = [get(replica.replica_id) for rank in ranks for replica in rank]
        # The decision record (routers.records, slots D_*), built here only; D_EXPORTED is
        # whether it is queued now, D_ID is drawn by the exporter thread.
        decision = [source, DECISION, now, trace, attempt, now - started, len(candidates), ranks, queue_lens,
                    self._stats_seen, previous, sampled, None]
        if trace is not None:
            trace.last_decision = decision
        if sampled:
            self._submit(decision)

    def _new_trace(self, pending_request: Any) -> RequestTrace:
        metadata = pending_request.metadata
        rate = self.config.sample_rate
        trace = RequestTrace(
            metadata,
            rate >= 1.0 or is_sampled(metadata.internal_request_id, rate),
            self._request_attributes(pending_request) if self._records_attributes else None,
        )
        pending_request._routelens = trace
        traces = self._trace_by_metadata
        traces[id(metadata)] = trace
        if len(traces) > MAX_OPEN_REQUESTS:  # requests that never completed (cancelled)
            self._forget_request(traces[next(iter(traces))])
        return trace

    def _request_attributes(self, pending_request: Any) -> Optional[Dict[str, Any]]:
        try:
            return self._router.routelens_request_attributes(pending_request)
        except Exception as exc:
            faults.record("routelens_request_attributes", exc)
            return None

    def _export_decision(self, decision: list) -> None:
        """Queue a sampled-out decision after all: it supplied a sampled request's replica."""
        decision[D_EXPORTED] = True
        self._submit(decision)

    def _forget_request(self, trace: RequestTrace) -> None:
        """The request decides no more: drop it from the index, settle its decisions."""
        key = id(trace.metadata)
        if self._trace_by_metadata.get(key) is trace:
            del self._trace_by_metadata[key]
        # Once its request was routed (or forgotten), none of its decisions can
        # supply a replica: those never exported are counted as sampled out.
        last = trace.last_decision
        trace.last_decision = None
        while last is not None:
            if not last[D_EXPORTED]:
                self.source.count_unqueued("sampled_out")
            previous = last[D_PREVIOUS]
            last[D_PREVIOUS] = None  # unlink: the chain lives only until its request completes
            last = previous
