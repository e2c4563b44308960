"""TracingMixin: trace any RequestRouter in one line.

    class TracedRouter(TracingMixin, MyRouter):
        pass

The mixin goes first so that its hooks wrap the router's. Each hook calls the
wrapped router exactly as Ray would, so routing behaves as without the mixin:
the wrapped router's return values are returned and its exceptions propagate
unchanged. The tracer's own work is fenced off: it never raises into Ray (an
exception in `__init__`, `initialize_state` or `update_replicas` would freeze
replica updates for the whole process) and never blocks the router loop.

Hooks for subclasses:
- `routelens_request_attributes(pending_request)`: return a small dict of
  request fields worth recording with each decision (say, a prompt length).
  The default records nothing from the payload (docs/design.md, rule 4).

For routers:
- `self.routelens_explain(reason, **scores)`, called while deciding (in
  `choose_replicas` or anything it awaits or calls): a short reason and a few
  numbers recorded with that decision (routers.explanations).
"""

from __future__ import annotations

import sys
from time import monotonic, time
from typing import Any, Dict, List, Optional

from . import explanations, ray_contract
from .completions import MAX_UNANSWERED_SENDS, NO_RESULT
from .config import passthrough_kwargs
from .faults import faults
from .ray_contract import (
    BROADCAST_CODE,
    FINISHED_CODE,
    RELEASE_CODE,
    RESERVE_CODE,
    RESULT_LOCAL,
    ROUTE_AND_SEND_CODE,
    ray_frame,
)
from .tracer import RouterTracer

_explaining = explanations.current  # read on every choose_replicas call


class TracingMixin:
    # Each hook fences its call into the tracer itself (a try around it,
    # failures to `faults`) rather than through one shared helper: Ray calls
    # seven of these per request on its router loop, and the helper's extra
    # calls cost the loop about 3 us per request (bench/tracer_ab.py).
    _routelens: Optional[RouterTracer] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The wrapped router's choose_replicas, bound once: cheaper per call
        # than super(), and the same method (the next one in this class's MRO).
        self._routelens_choose = super().choose_replicas
        try:
            overridden = type(self).routelens_request_attributes is not TracingMixin.routelens_request_attributes
            # Read at each router's construction, so a test can switch them off.
            results_from_ray = ray_contract.RESULTS_FROM_RAY
            # Sends that skip the rejection protocol pair with their
            # completions only when the tracer reads the results from Ray.
            self._routelens = RouterTracer(self, kwargs, records_attributes=overridden,
                                           results_from_ray=results_from_ray,
                                           records_refusals=ray_contract.REFUSALS,
                                           records_unrouted_sends=ray_contract.UNROUTED_SENDS and results_from_ray)
        except Exception as exc:
            faults.record("setting up the tracer", exc)

    def routelens_request_attributes(self, pending_request: Any) -> Optional[Dict[str, Any]]:
        """Fields of a request to record with its decisions. Override to opt in."""
        return None

    def routelens_explain(self, reason: str, **scores: float) -> None:
        """Record why the decision being made was made: a reason of at most 64
        characters and at most 8 finite scores named in at most 32 (docs/design.md).
        The last call of a decision wins; a call outside a decision is ignored.
        Never raises."""
        try:
            explanations.explain(reason, scores)
        except Exception as exc:
            faults.record("routelens_explain", exc)

    def initialize_state(self, **kwargs):
        passthrough = passthrough_kwargs(kwargs)
        tracer = self._routelens
        if tracer is not None:
            try:
                passthrough = tracer.configure(kwargs)
            except Exception as exc:
                faults.record("configuring the tracer", exc)
                self._routelens = None
        return super().initialize_state(**passthrough)

    async def choose_replicas(self, candidate_replicas: List[Any], pending_request: Any = None):
        # Wall-clock at both ends: the decision's timestamp and its duration
        # from one clock, which is cheaper than reading two.
        started = time()
        # This call's slot for routelens_explain (routers.explanations says why a ContextVar).
        explanation = [None]
        token = _explaining.set(explanation)
        try:
            ranks = await self._routelens_choose(candidate_replicas, pending_request)
        finally:
            _explaining.reset(token)
        tracer = self._routelens
        if tracer is not None:
            try:
                tracer.on_decision(candidate_replicas, pending_request, ranks, started, time(), explanation[0])
            except Exception as exc:
                faults.record("recording a decision", exc)
        return ranks

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any):
        tracer = self._routelens
        if tracer is not None:
            try:
                tracer.on_routed(pending_request, replica_id, result)
            except Exception as exc:
                faults.record("recording a routed request", exc)
        return super().on_request_routed(pending_request, replica_id, result)

    def on_request_completed(self, replica_id: Any, internal_request_id: str):
        tracer = self._routelens
        if tracer is not None:
            try:
                result = NO_RESULT
                if tracer.results_from_ray:
                    # Ray's done-callback called this hook with the result in a local.
                    caller = sys._getframe(1)
                    if caller.f_code is not FINISHED_CODE:  # a subclass's override sits between
                        caller = ray_frame(caller, FINISHED_CODE)
                    if caller is not None:
                        result = caller.f_locals.get(RESULT_LOCAL, NO_RESULT)
                tracer.on_completed(replica_id, internal_request_id, result)
            except Exception as exc:
                faults.record("recording a completed request", exc)
        return super().on_request_completed(replica_id, internal_request_id)

    def on_new_queue_len_info(self, replica_id: Any, num_ongoing_requests: int):
        # Called by Ray's usual sender with the replica's answer (the common
        # case: its frame is the caller, and an accepted answer only leaves
        # its count and send time for on_request_routed), and on the paths of
        # DeploymentHandle.choose_replica(): after a reservation, and when a
        # reservation is released.
        tracer = self._routelens
        if tracer is not None and tracer.records_refusals:
            try:
                caller = sys._getframe(1)
                sending = caller if caller.f_code is ROUTE_AND_SEND_CODE else ray_frame(caller, ROUTE_AND_SEND_CODE)
                if sending is not None:
                    pending_request, accepted = ray_contract.answer(sending)
                    sent_at = tracer.send_times.pop(id(sending), None)  # noted by on_send_request
                    if accepted:  # Ray calls on_request_routed next: on_routed takes these
                        tracer.accepted_request, tracer.accepted_queue_len, tracer.accepted_sent_at = (
                            pending_request, num_ongoing_requests, sent_at)
                    else:
                        tracer.on_refused(pending_request, replica_id, num_ongoing_requests)
                elif tracer.records_unrouted_sends:
                    _record_reservation_answer(tracer, caller, replica_id, num_ongoing_requests)
            except Exception as exc:
                faults.record("recording a replica's answer", exc)
        return super().on_new_queue_len_info(replica_id, num_ongoing_requests)

    def on_send_request(self, replica_id: Any):
        # Called as each request is sent: by Ray's usual sender (which asks
        # the replica first, but inside Ray Client and to Java replicas), and
        # by broadcast(). In the common case, the usual sender asking the
        # replica, the request's latency starts now: the time is noted
        # against the sender's frame (one per request in flight), whose
        # locals (the request) are read once, with the answer, in
        # on_new_queue_len_info.
        tracer = self._routelens
        if tracer is not None and tracer.records_refusals:  # the send time is taken with the answer
            try:
                caller = sys._getframe(1)
                if caller.f_code is ROUTE_AND_SEND_CODE and not tracer.sends_unasked:
                    _note_send(tracer, caller)
                else:
                    _record_other_send(tracer, caller, replica_id)
            except Exception as exc:
                faults.record("recording a send", exc)
        return super().on_send_request(replica_id)

    def update_replicas(self, replicas: List[Any]):
        result = super().update_replicas(replicas)
        tracer = self._routelens
        if tracer is not None:
            try:
                tracer.on_replicas(replicas)
            except Exception as exc:
                faults.record("recording replica membership", exc)
        return result

    # Exact attribution of FIFO hand-offs (routers.attribution) overrides two
    # private RequestRouter methods. Without them (another Ray) these are not
    # defined and routed records fall back to the request's last decision.
    if ray_contract.EXACT_ATTRIBUTION:

        def _fulfill_next_pending_request(self, replica: Any, request_metadata: Any = None):
            tracer = self._routelens
            if tracer is not None:
                try:
                    tracer.on_fulfil_start(replica, request_metadata)
                except Exception as exc:
                    faults.record("attributing a fulfilment", exc)
            try:
                return super()._fulfill_next_pending_request(replica, request_metadata)
            finally:
                if self._routelens is not None:
                    self._routelens.fulfilling = None

        def _record_queue_wait_time(self, pending_request: Any):
            result = super()._record_queue_wait_time(pending_request)
            tracer = self._routelens
            if tracer is not None:
                try:
                    tracer.on_recipient(pending_request)
                except Exception as exc:
                    faults.record("attributing a fulfilment", exc)
            return result


def _note_send(tracer: RouterTracer, sending: Any) -> None:
    """Ray's usual sender, running `sending`, sent its request asking the
    replica: the request's latency starts now."""
    send_times = tracer.send_times
    send_times[id(sending)] = monotonic()
    if len(send_times) > MAX_UNANSWERED_SENDS:  # answers that never came (the replica died)
        del send_times[next(iter(send_times))]


def _record_other_send(tracer: RouterTracer, caller: Any, replica_id: Any) -> None:
    """Any send but the common case: under a subclass's override of the
    hook, without asking the replica (routed at the send), or broadcast()."""
    if (sending := ray_frame(caller, ROUTE_AND_SEND_CODE)) is not None:
        if not tracer.sends_unasked_to(replica_id):
            _note_send(tracer, sending)
        elif tracer.records_unrouted_sends:
            pending_request, result, with_rejection = ray_contract.send(sending)
            if with_rejection:
                _note_send(tracer, sending)
            else:  # Ray never calls on_request_routed for it: this is its routing
                tracer.on_routed(pending_request, replica_id, result)
    elif tracer.records_unrouted_sends and (broadcasting := ray_frame(caller, BROADCAST_CODE)) is not None:
        tracer.on_broadcast_send(ray_contract.broadcast_request(broadcasting), replica_id)


def _record_reservation_answer(tracer: RouterTracer, caller: Any, replica_id: Any, num_ongoing_requests: int) -> None:
    """On DeploymentHandle.choose_replica()'s paths: a reservation accepted,
    or one released without being used."""
    if (reserving := ray_frame(caller, RESERVE_CODE)) is not None:
        pending_request, accepted = ray_contract.reservation(reserving)
        if accepted:
            tracer.on_reserved(pending_request, replica_id, num_ongoing_requests)
    elif (releasing := ray_frame(caller, RELEASE_CODE)) is not None:
        request_metadata, dispatched = ray_contract.released_reservation(releasing)
        if not dispatched:
            tracer.on_reservation_unused(replica_id, request_metadata)
