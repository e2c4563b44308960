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
"""

from __future__ import annotations

import sys
from time import time
from typing import Any, Dict, List, Optional

from ray.serve.request_router import RequestRouter

from .config import passthrough_kwargs
from .faults import faults
from .tracer import NO_RESULT, RouterTracer

# Exact attribution of FIFO hand-offs needs two private RequestRouter methods
# (present in Ray 2.60). Without them the hooks below are not defined and
# routed events fall back to the request's own last decision.
EXACT_ATTRIBUTION = hasattr(RequestRouter, "_fulfill_next_pending_request") and hasattr(
    RequestRouter, "_record_queue_wait_time"
)

# Ray hands a result's value to the request router nowhere: only its own
# done-callback sees it (AsyncioRouter._process_finished_request, which then
# calls on_request_completed). Reading it from that caller's frame spares the
# tracer a done-callback of its own per request, which costs the process one
# more fetch and deserialization of every result: measured, most of the
# tracer's end-to-end cost through a handle. Feature-detected like the above;
# without it the tracer registers its own callbacks (routers.tracer).
try:
    from ray.serve._private.router import AsyncioRouter
except ImportError:  # private: another Ray may not have it
    AsyncioRouter = None
_FINISHED = getattr(getattr(AsyncioRouter, "_process_finished_request", None), "__code__", None)
RESULTS_FROM_RAY = (EXACT_ATTRIBUTION and _FINISHED is not None and "result" in _FINISHED.co_varnames
                    and "on_request_completed" in _FINISHED.co_names)


# Sends that skip the rejection protocol never reach on_request_routed:
# DeploymentHandle.choose_replica() reserves a slot on the replica it routed
# to and dispatch() sends there; broadcast() sends to every replica without
# routing; inside Ray Client, and to Java replicas, Ray's usual sender sends
# without asking. The mixin learns of them from the hooks Ray calls on those
# paths (on_new_queue_len_info after a reservation and when an unused one is
# released, on_send_request after every send), by which of Ray's functions
# is the caller, and reads the request from that caller's frame; the common
# case, Ray's usual sender with the rejection protocol, costs a call and one
# comparison.
# Without these private functions (another Ray), such completions are
# recorded as rejections.
_ROUTE_AND_SEND = getattr(getattr(AsyncioRouter, "_route_and_send_request_once", None), "__code__", None)
_RESERVE = getattr(getattr(AsyncioRouter, "_pick_and_reserve_replica", None), "__code__", None)
_RELEASE = getattr(getattr(AsyncioRouter, "_release_slot_and_refresh_cache", None), "__code__", None)
_BROADCAST = getattr(getattr(AsyncioRouter, "broadcast", None), "__code__", None)
UNROUTED_SENDS = (_ROUTE_AND_SEND is not None and {"pr", "result", "with_rejection"} <= set(_ROUTE_AND_SEND.co_varnames)
                  and _RESERVE is not None and {"pr", "queue_info"} <= set(_RESERVE.co_varnames)
                  and _RELEASE is not None and "selection" in _RELEASE.co_varnames
                  and _BROADCAST is not None and "replica_pr" in _BROADCAST.co_varnames)


def _ray_frame(frame: Any, code: Any) -> Any:
    """The frame running Ray's function `code` among the callers above a hook,
    else None. Three frames: subclasses' overrides of the hook (one or two)
    may sit between Ray and the mixin."""
    for _ in range(3):
        if frame is None or frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


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
            # Sends that skip the rejection protocol pair with their
            # completions only when the tracer reads the results from Ray.
            self._routelens = RouterTracer(self, kwargs, records_attributes=overridden,
                                           results_from_ray=RESULTS_FROM_RAY,
                                           records_unrouted_sends=UNROUTED_SENDS and RESULTS_FROM_RAY)
        except Exception as exc:
            faults.record("setting up the tracer", exc)

    def routelens_request_attributes(self, pending_request: Any) -> Optional[Dict[str, Any]]:
        """Fields of a request to record with its decisions. Override to opt in."""
        return None

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
        ranks = await self._routelens_choose(candidate_replicas, pending_request)
        tracer = self._routelens
        if tracer is not None:
            try:
                tracer.on_decision(candidate_replicas, pending_request, ranks, started, time())
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
                    caller = sys._getframe(1)
                    if caller.f_code is not _FINISHED:  # a subclass's override sits between
                        caller = _ray_frame(caller, _FINISHED)
                    if caller is not None:
                        result = caller.f_locals.get("result", NO_RESULT)
                tracer.on_completed(replica_id, internal_request_id, result)
            except Exception as exc:
                faults.record("recording a completed request", exc)
        return super().on_request_completed(replica_id, internal_request_id)

    def on_new_queue_len_info(self, replica_id: Any, num_ongoing_requests: int):
        tracer = self._routelens
        if tracer is not None and tracer.records_unrouted_sends and (
                (caller := sys._getframe(1)).f_code is not _ROUTE_AND_SEND):
            try:
                reserving = _ray_frame(caller, _RESERVE)
                if reserving is not None:
                    ray_locals = reserving.f_locals
                    if ray_locals["queue_info"].accepted:
                        tracer.on_reserved(ray_locals["pr"], replica_id)
                elif (releasing := _ray_frame(caller, _RELEASE)) is not None:
                    selection = releasing.f_locals["selection"]
                    if not selection._dispatched:
                        tracer.on_reservation_unused(replica_id, selection._request_metadata)
            except Exception as exc:
                faults.record("recording a reservation", exc)
        return super().on_new_queue_len_info(replica_id, num_ongoing_requests)

    def on_send_request(self, replica_id: Any):
        tracer = self._routelens
        if tracer is not None and tracer.records_unrouted_sends and (
                (caller := sys._getframe(1)).f_code is not _ROUTE_AND_SEND or tracer.sends_unasked):
            try:
                sending = _ray_frame(caller, _ROUTE_AND_SEND)
                if sending is not None:
                    if tracer.sends_unasked_to(replica_id):
                        ray_locals = sending.f_locals
                        if not ray_locals["with_rejection"]:  # so Ray will not call on_request_routed
                            tracer.on_routed(ray_locals["pr"], replica_id, ray_locals["result"])
                elif (broadcasting := _ray_frame(caller, _BROADCAST)) is not None:
                    tracer.on_broadcast_send(broadcasting.f_locals["replica_pr"], replica_id)
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

    if EXACT_ATTRIBUTION:

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
