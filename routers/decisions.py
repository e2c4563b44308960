"""Recording decisions: each `choose_replicas` ranking and what it ranked on.

A request's first decision gives it a RequestTrace (kept on the
PendingRequest, which Ray reuses across retries, and gone with it), and
with it its sampling, decided from its internal request id so that every
process keeps or drops the request whole.

Each routing task's latest decision is kept (`_decision_by_task`): Ray
fulfils from the task that found a replica, in the step after it chose it
from that decision's ranking, so that is where FIFO attribution
(routers.attribution) finds the decision that supplied a replica, even
when two tasks route one retried request at once. Nothing else is kept per
decision: a request backing off for minutes, or cancelled, holds no chain
of them.

A sampled-out decision is counted as sampled out when it is made; if it
then supplies a replica to a sampled request, it is exported after all and
taken off that count.
"""

from __future__ import annotations

from asyncio import current_task
from typing import Any, Callable, Dict, List, Optional, Tuple

from .explanations import Explanation
from .exporter import Source
from .faults import faults
from .ids import is_sampled
from .ray_contract import queue_len_cache
from .records import D_EXPORTED, DECISION, RequestTrace

# Routing tasks whose latest decision is kept before those of finished
# tasks are let go (Ray runs at most 50 routing tasks per router).
MAX_KEPT_TASKS = 64


def routing_task() -> Any:
    """The asyncio task running now: on Ray's router loop, a routing task.
    None on a loop asyncio no longer knows as running (a forked child's)."""
    try:
        return current_task()
    except RuntimeError:
        return None


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
        # Private in Ray 2.60 (routers.ray_contract): without it, queue lengths are unknown.
        cache = queue_len_cache(router)
        self._queue_len_copy = None if cache is None else cache.copy
        # The routing task -> the decision it made last (a decision record).
        self._decision_by_task: Dict[Any, list] = {}

    def on_decision(self, candidates: List[Any], pending_request: Any, ranks: List[List[Any]],
                    started: float, now: float, explanation: Optional[Explanation]) -> None:
        # The hot path: runs for every choose_replicas call. Kept to plain
        # references (no copies, no formatting, one list for the record, which
        # is also the queued item) so it costs about a microsecond.
        source = self.source
        if source is None:
            self._configure_from_env()
            source = self.source
        if pending_request is None:  # not called by Ray's routing loop: nothing to sample by
            trace, attempt, sampled = None, 0, True
        else:
            trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
            attempt = trace.decisions
            trace.decisions = attempt + 1
            sampled = trace.sampled
        copy = self._queue_len_copy
        # The decision record (routers.records, slots D_*), built here only; D_EXPORTED is
        # whether it is queued now, D_ID is drawn by the exporter thread.
        decision = [source, DECISION, now, trace, attempt, now - started, len(candidates), ranks,
                    None if copy is None else copy(), self._stats_seen, sampled, None, explanation]
        if trace is not None:
            trace.last_decision = decision
        tasks = self._decision_by_task
        task = routing_task()
        if task not in tasks and len(tasks) >= MAX_KEPT_TASKS:
            for finished in [t for t in tasks if t.done()]:
                del tasks[finished]
        tasks[task] = decision
        if sampled:
            self._submit(decision)
        else:
            source.count_unqueued("sampled_out")

    def _new_trace(self, pending_request: Any) -> RequestTrace:
        metadata = pending_request.metadata
        rate = self.config.sample_rate
        trace = RequestTrace(
            metadata,
            rate >= 1.0 or is_sampled(metadata.internal_request_id, rate),
            self._request_attributes(pending_request) if self._records_attributes else None,
        )
        pending_request._routelens = trace
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
        decision[0].uncount_unqueued("sampled_out")
        self._submit(decision)
