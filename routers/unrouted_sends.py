"""Sends that skip the rejection protocol, so never reach `on_request_routed`.

Ray's usual sender asks the replica first and calls on_request_routed when
it accepts. Three kinds of send do not, and are recorded as what they are
rather than as refusals (docs/design.md, "Sends that skip the rejection
protocol"); the mixin tells them apart by which of Ray's functions calls
its hooks (routers.ray_contract):

- inside Ray Client (the router has no queue-length cache), and to Java
  replicas, Ray sends without asking: the request is routed when it is sent
  (`sends_unasked_to` says where), and its completion is never a refusal;
- DeploymentHandle.choose_replica() + dispatch(): routed when the replica
  accepts the slot choose_replica() reserves (`on_reserved`); a
  reservation left without dispatch() ends its attempt without an outcome
  (`on_reservation_unused`);
- DeploymentHandle.broadcast(): no routing at all; each replica's send is
  recorded only as completed, with its latency from the send
  (`on_broadcast_send`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .exporter import Source
from .ids import is_sampled
from .records import completed_record

# Broadcast sends awaiting their completion, per router; beyond this the
# oldest are forgotten (counted as dropped, "untracked_completion").
MAX_OPEN_SENDS = 100_000


class UnroutedSends:
    # Provided by the composed RouterTracer.
    config: Any
    source: Optional[Source]
    _submit: Callable[[Any], None]
    _configure_from_env: Callable[[], None]
    on_routed: Callable[[Any, Any, Any], None]  # routers.attribution
    accepted_request: Any  # routers.attribution
    accepted_queue_len: Optional[int]  # routers.attribution
    accepted_sent_at: Optional[float]  # routers.attribution
    _open_attempts: Dict[str, List[Any]]  # routers.completions
    _close_attempt: Callable[[Any], None]  # routers.completions

    def __init__(self, router: Any, init_kwargs: Any, *, records_unrouted_sends: bool = False, **options: Any):
        super().__init__(router, init_kwargs, **options)
        self.records_unrouted_sends = records_unrouted_sends
        # Without the queue-length cache (inside Ray Client) Ray sends every
        # request without the rejection protocol, as it does to Java replicas.
        self._rejection_protocol = bool(init_kwargs.get("use_replica_queue_len_cache", False))
        self._cross_language: frozenset = frozenset()  # unique_ids of the replicas that never reject
        self.sends_unasked = not self._rejection_protocol  # whether Ray may send without asking (cheap test)
        # internal_request_id -> (wall, monotonic) time of a send no routing
        # chose (a broadcast), until its completion.
        self._unrouted_sends: Dict[str, Tuple[float, float]] = {}

    def sends_unasked_to(self, replica_id: Any) -> bool:
        """Whether Ray sends to this replica without the rejection protocol."""
        return not self._rejection_protocol or replica_id.unique_id in self._cross_language

    def _note_cross_language(self, replicas: List[Any]) -> None:
        """The membership changed (routers.membership): which replicas are Java ones."""
        self._cross_language = frozenset(r.replica_id.unique_id for r in replicas
                                         if getattr(r, "is_cross_language", False))
        self.sends_unasked = not self._rejection_protocol or bool(self._cross_language)

    def on_reserved(self, pending_request: Any, replica_id: Any, reported_queue_len: Optional[int] = None) -> None:
        """DeploymentHandle.choose_replica(): the replica routed to holds a slot
        for this request, and dispatch() sends it there without asking, so Ray
        never calls on_request_routed for it: this is its routing. The replica
        reported its count of ongoing requests, the slot included, as it accepted."""
        self.accepted_request, self.accepted_queue_len = pending_request, reported_queue_len
        self.accepted_sent_at = None  # its latency starts at the routing: dispatch() sends later
        self.on_routed(pending_request, replica_id, None)

    def on_reservation_unused(self, replica_id: Any, request_metadata: Any) -> None:
        """choose_replica() was left without dispatch(): the request routed at
        its reservation was never sent. Its attempt ends with neither an
        outcome nor a latency. Matched by the request's own metadata: nested
        calls share an internal_request_id, and may hold two slots on one
        replica. (If Ray cannot release the slot, say the replica died, it
        calls no hook, and the attempt stays open until forgotten.)"""
        for attempt in self._open_attempts.get(request_metadata.internal_request_id, ()):
            if attempt.trace.metadata is request_metadata and attempt.replica_id == replica_id:
                attempt.done_ts, attempt.ok = time.time(), None  # done_at stays None: no latency
                self._close_attempt(attempt)
                return

    def on_broadcast_send(self, pending_request: Any, replica_id: Any) -> None:
        """DeploymentHandle.broadcast() sent this request to the replica
        without routing it: its completion is recorded, not as a rejection."""
        if self.source is None:
            self._configure_from_env()
        internal_request_id = pending_request.metadata.internal_request_id
        if is_sampled(internal_request_id, self.config.sample_rate):  # else on_completed counts it
            sends = self._unrouted_sends
            if internal_request_id not in sends:
                self.source.pending_completions += 1
            sends[internal_request_id] = (time.time(), time.monotonic())
            if len(sends) > MAX_OPEN_SENDS:  # completions that never came
                del sends[next(iter(sends))]
                self.source.pending_completions -= 1
                self.source.count_unqueued("untracked_completion")

    def _complete_unrouted_send(self, replica_id: Any, internal_request_id: str, ts: float, at: float,
                                ok: Optional[bool]) -> bool:
        """Record the completion of a broadcast send; False if it was none."""
        sent = self._unrouted_sends.pop(internal_request_id, None)
        if sent is None:
            return False
        self.source.pending_completions -= 1
        self._submit(completed_record(self.source, ts, internal_request_id, replica_id,
                                      max(at - sent[1], 0.0) * 1000.0, ok, False, None))
        return True
