"""RouterTracer: what one traced router records, and how routed requests are
attributed to the decision that supplied their replica.

Every method here runs on Ray's router event loop (one thread per process,
shared by all routers), except `_result_done_threadsafe`, which runs on a
Ray core-worker thread and only appends to a thread-safe deque. Nothing here blocks:
recording is an O(1) append to the process-wide exporter's queue of plain
references; formatting happens on the exporter thread.

Attribution. With FIFOMixin a replica found by request A's routing task is
often given to request B (the head of the queue). `TracingMixin` hooks the
fulfilment (`on_fulfil_start`, then `on_recipient` for whichever request
receives the replica), so each routed event names the decision that really
supplied its replica (A's latest decision that ranked it), its rank in that
decision, and whether that decision was made for this request
(`own_ranking`). When Ray lacks those private
methods, routed events fall back to the request's last decision.

Completion. Ray calls `on_request_completed` once per send attempt, rejected
attempts included, keyed only by (replica, internal_request_id), which
fan-out calls and retries share, and possibly before the accepted attempt's
`on_request_routed`. A completion pairs with the key's open accepted attempt;
one that comes first waits, and is claimed by the attempt routed next if it
came after that attempt was handed its replica; one that no accepted attempt
claims within REJECTION_GRACE_S is a rejection, where the replica could
refuse it (not inside Ray Client, nor on a Java replica: there Ray sends
without asking and never calls on_request_routed). Such sends are routed
when Ray sends them; a request sent by DeploymentHandle.dispatch() is
routed when its replica accepts the slot choose_replica() reserved, and a
broadcast's sends are recorded only as completed (routers.mixin tells
these paths apart). Whether the request succeeded
comes from the result Ray's own done-callback completes (`results_from_ray`,
see routers.mixin); where that cannot be read, the tracer watches each
accepted attempt's result itself, which costs one more fetch of it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections import deque
from importlib.metadata import version
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

from ray.exceptions import TaskCancelledError

from .config import TracerConfig, load_config
from .exporter import Exporter, Source, get_exporter
from .faults import faults
from .ids import is_sampled, next_seq
from .stats import collected_at
from .wire import (
    COMPLETED,
    D_EXPORTED,
    D_PREVIOUS,
    D_TRACE,
    DECISION,
    REPLICAS,
    ROUTED,
    STATS,
    RequestTrace,
    rank_of,
)

TRACER_VERSION = version("routelens")

# Accepted attempts whose completion has not been seen, and requests not yet
# routed, per router. Beyond these the oldest are forgotten (attempts are
# counted as dropped), so signals that never come cannot grow memory.
MAX_OPEN_ATTEMPTS = 100_000
MAX_OPEN_REQUESTS = 100_000
# A framework completion that no accepted attempt claims within this time is
# reported as a rejection. Accepted attempts claim theirs within a few loop
# iterations; the margin covers a loop stalled by load.
REJECTION_GRACE_S = 2.0
# How often results noted by worker threads are drained when no hook runs.
RESULTS_DRAIN_INTERVAL_S = 0.25
NO_RESULT = object()  # a completion whose result is unknown (not called from Ray's done-callback)


class _Attempt:
    """An accepted send attempt, waiting for its completion."""

    __slots__ = ("replica_id", "internal_request_id", "trace", "routed_ts", "routed_seq", "routed_at", "ok",
                 "done_ts", "done_at")

    def __init__(self, replica_id, internal_request_id, trace, routed_ts, routed_seq):
        self.replica_id = replica_id
        self.internal_request_id = internal_request_id
        self.trace = trace
        self.routed_ts = routed_ts  # wall clock, for the events
        self.routed_seq = routed_seq
        self.routed_at = time.monotonic()  # for the latency: a wall-clock jump must not change it
        self.ok: Optional[bool] = None
        self.done_ts: Optional[float] = None
        self.done_at: Optional[float] = None


class RouterTracer:
    def __init__(self, router: Any, init_kwargs: Mapping[str, Any], records_attributes: bool = False,
                 results_from_ray: bool = False, records_unrouted_sends: bool = False):
        """`records_attributes`: call the router's `routelens_request_attributes`
        for each request (only worth it when a subclass overrides it).
        `results_from_ray`: on_completed is given each result by Ray's own
        done-callback, so no callback of the tracer's is needed.
        `records_unrouted_sends`: the mixin reports sends that skip the
        rejection protocol (on_reserved, on_broadcast_send, ...)."""
        self._router = router
        self._records_attributes = records_attributes
        # Without the queue-length cache (inside Ray Client) Ray sends every
        # request without the rejection protocol, as it does to Java replicas.
        self._rejection_protocol = bool(init_kwargs.get("use_replica_queue_len_cache", False))
        self._cross_language: frozenset = frozenset()  # unique_ids of the replicas that never reject
        self.sends_unasked = not self._rejection_protocol  # whether Ray may send without the protocol (cheap test)
        self.results_from_ray = results_from_ray
        self.records_unrouted_sends = records_unrouted_sends
        deployment_id = init_kwargs.get("deployment_id")
        handle_source = init_kwargs.get("handle_source")
        cls = type(router)
        self.identity: Dict[str, Any] = {
            "source_id": uuid.uuid4().hex,
            "app": getattr(deployment_id, "app_name", None),
            "deployment": getattr(deployment_id, "name", None),
            "router_class": f"{cls.__module__}.{cls.__qualname__}",
            "handle_source": getattr(handle_source, "name", str(handle_source)),
            "node_id": init_kwargs.get("self_node_id"),
            "actor_id": init_kwargs.get("self_actor_id"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "tracer_version": TRACER_VERSION,
            "labels": {},
        }
        self.config: Optional[TracerConfig] = None
        self.source: Optional[Source] = None
        self.exporter: Optional[Exporter] = None
        # Private in Ray 2.60 (see docs/design.md, rule 7): without it, queue_len is unknown.
        cache = getattr(getattr(router, "replica_queue_len_cache", None), "_cache", None)
        self._queue_len_get = cache.get if isinstance(cache, dict) else None  # the dict is never replaced
        # The replica's unique_id -> (routing_stats, first seen). Replaced, never
        # mutated, on each update_replicas, so a decision can keep a reference
        # to it. Keyed by the str: ReplicaID hashes through a Python __hash__.
        self._stats_seen: Dict[str, Tuple[Any, float]] = {}
        self._membership: Optional[List[Dict[str, Any]]] = None
        # id(RequestMetadata) -> the request's trace, until its accepted attempt
        # completes: how a fulfilment, which names only the metadata, finds
        # the decision that supplied its replica.
        self._trace_by_metadata: Dict[int, RequestTrace] = {}
        # (replica, the decision that ranked it or None, its rank there) during a fulfilment.
        self.fulfilling: Optional[Tuple[Any, Optional[list], Optional[int]]] = None
        # internal_request_id -> the request's accepted attempts awaiting their
        # completion, oldest first (more than one only for retries and fan-out
        # calls). Keyed by the id alone: a str hashes from its cache, a
        # (ReplicaID, id) tuple through ReplicaID's Python __hash__.
        self._open: Dict[str, List[_Attempt]] = {}
        # Framework completions not yet claimed by an accepted attempt: (wall time,
        # monotonic time, ok, cancelled, whether the replica could have refused it).
        self._unmatched_completions: Dict[Tuple[Any, str], Deque[Tuple[float, float, Optional[bool], bool, bool]]] = {}
        # internal_request_id -> (wall, monotonic) time of a send no routing
        # chose (a broadcast), until its completion.
        self._unrouted_sends: Dict[str, Tuple[float, float]] = {}
        # (attempt, ok, done time) appended by Ray's worker threads, drained on the loop.
        self._results_done: Deque[Tuple[_Attempt, bool, float]] = deque()
        self._drain_scheduled = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._submit = None  # the exporter's submit, once configured

    # -- configuration ------------------------------------------------------

    def configure(self, router_kwargs: Mapping[str, Any], exporter: Optional[Exporter] = None) -> Dict[str, Any]:
        """Apply `request_router_kwargs`; return the ones for the wrapped router.

        The first call wins. `exporter` defaults to the process-wide one.
        """
        config, passthrough = load_config(router_kwargs)
        for problem in config.problems:
            faults.record("reading the tracer configuration", ValueError(problem))
        if self.source is None:
            self.config = config
            self.identity["labels"] = dict(config.labels)
            self.exporter = exporter or get_exporter(config)
            self.source = self.exporter.add_source(self.identity, config)
            self._submit = self.exporter.submit
        return passthrough

    def _configure_from_env(self) -> None:
        # Ray always calls initialize_state first; a subclass that overrides it
        # without calling super() still gets a tracer configured from the env.
        # (Hooks call this when self.source is None: a test cheaper than a call.)
        self.configure({})

    def _emit(self, item_tail: tuple) -> None:
        self._submit((self.source,) + item_tail)

    # -- hooks ---------------------------------------------------------------

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
        # The slots D_* of routers.wire.
        decision = [source, DECISION, now, trace, attempt, now - started, len(candidates), ranks, queue_lens,
                    self._stats_seen, previous, sampled, None]
        if trace is not None:
            trace.last_decision = decision
        if sampled:
            self._submit(decision)

    def _loop_or_bind(self) -> asyncio.AbstractEventLoop:
        # Every hook of a router runs on one loop: Ray's router loop, or the
        # caller's in same-loop mode.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _export_decision(self, decision: list) -> None:
        decision[D_EXPORTED] = True
        self._submit(decision)

    def _settle_unexported(self, last: Optional[list]) -> None:
        # A sampled-out decision is exported after all if it supplies a replica
        # to a sampled request (see on_recipient). Once its request was routed
        # (or forgotten), none of its decisions can: count them as sampled out.
        while last is not None:
            if not last[D_EXPORTED]:
                self.source.count_unqueued("sampled_out")
            previous = last[D_PREVIOUS]
            last[D_PREVIOUS] = None  # unlink: the chain lives only until its request completes
            last = previous

    def _forget_request(self, trace: RequestTrace) -> None:
        """The request decides no more: drop it from the index, settle its decisions."""
        key = id(trace.metadata)
        if self._trace_by_metadata.get(key) is trace:
            del self._trace_by_metadata[key]
        self._settle_unexported(trace.last_decision)
        trace.last_decision = None

    def on_fulfil_start(self, replica: Any, request_metadata: Any) -> None:
        # Ray fulfils with the metadata of the request the routing task was
        # routing, so the replica came from one of that request's decisions:
        # its last one, unless two routing tasks route the request at once (a
        # retried request can be queued twice), in which case it is the
        # latest one that ranked the replica.
        self.fulfilling = (replica, None, None)
        trace = self._trace_by_metadata.get(id(request_metadata))
        if trace is None or trace.metadata is not request_metadata:
            return
        decision = trace.last_decision
        replica_id = replica.replica_id
        while decision is not None:
            rank = rank_of(decision, replica_id)
            if rank is not None:
                self.fulfilling = (replica, decision, rank)  # on_routed takes the rank from here
                return
            decision = decision[D_PREVIOUS]

    def on_recipient(self, pending_request: Any) -> None:
        if self.fulfilling is not None:
            trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
            trace.handoff = self.fulfilling
            trace.handed_at = time.monotonic()  # see on_routed
            decision = self.fulfilling[1]
            if trace.sampled and decision is not None and not decision[D_EXPORTED]:
                # A sampled request got a replica from a sampled-out request's
                # decision: export it now, before that request decides again
                # and settles it as sampled out.
                self._export_decision(decision)

    def on_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        if self.source is None:
            self._configure_from_env()
        now = time.time()
        trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
        handoff, trace.handoff = trace.handoff, None
        if handoff is not None and handoff[1] is not None and (
                handoff[0].replica_id is replica_id or handoff[0].replica_id == replica_id):
            decision, rank, attribution = handoff[1], handoff[2], "exact"
        else:
            decision, rank, attribution = trace.last_decision, None, "last_decision"
        if not trace.sampled:
            self._forget_request(trace)
            self.source.count_unqueued("sampled_out")
            return
        own = None
        if decision is not None:  # exported already: by its own request, or by on_recipient
            if rank is None:
                rank = rank_of(decision, replica_id)
            own = decision[D_TRACE] is trace
        seq = next_seq()
        self._submit((
            self.source, ROUTED, now, seq, trace, replica_id, decision, rank, own, trace.decisions,
            (now - pending_request.created_at) * 1000.0, attribution,
        ))
        internal_request_id = trace.metadata.internal_request_id
        attempt = _Attempt(replica_id, internal_request_id, trace, now, seq)
        attempts = self._open.get(internal_request_id)
        if attempts is None:
            self._open[internal_request_id] = [attempt]
            if len(self._open) > MAX_OPEN_ATTEMPTS:
                for _ in self._open.pop(next(iter(self._open))):
                    self.source.count_unqueued("untracked_completion")
        else:
            attempts.append(attempt)
        if self.results_from_ray:
            if not self._unmatched_completions:  # the common case, without building a key
                return
            key = (replica_id, internal_request_id)
            unmatched = self._unmatched_completions.get(key)
            # A completion that came after this attempt was handed its replica
            # is its own (it completed before Ray resumed to call this hook);
            # earlier ones are rejected attempts'. A cancelled result never is.
            if unmatched and handoff is not None and unmatched[-1][1] >= trace.handed_at and not unmatched[-1][3]:
                attempt.done_ts, attempt.done_at, attempt.ok, _, _ = unmatched.pop()
                if not unmatched:
                    del self._unmatched_completions[key]
                self._close_attempt(attempt)
            return
        result.add_done_callback(functools.partial(self._result_done_threadsafe, attempt))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop_or_bind().call_later(RESULTS_DRAIN_INTERVAL_S, self._drain_tick)

    def on_reserved(self, pending_request: Any, replica_id: Any) -> None:
        """DeploymentHandle.choose_replica(): the replica routed to holds a slot
        for this request, and dispatch() sends it there without asking, so Ray
        never calls on_request_routed for it: this is its routing."""
        self.on_routed(pending_request, replica_id, None)

    def on_reservation_unused(self, replica_id: Any, request_metadata: Any) -> None:
        """choose_replica() was left without dispatch(): the request routed at
        its reservation was never sent. Its attempt ends with neither an
        outcome nor a latency. Matched by the request's own metadata: nested
        calls share an internal_request_id, and may hold two slots on one
        replica. (If Ray cannot release the slot, say the replica died, it
        calls no hook, and the attempt stays open until forgotten.)"""
        for attempt in self._open.get(request_metadata.internal_request_id, ()):
            if attempt.trace.metadata is request_metadata and attempt.replica_id == replica_id:
                attempt.done_ts, attempt.ok = time.time(), None  # done_at stays None: no latency
                self._close_attempt(attempt)
                return

    def sends_unasked_to(self, replica_id: Any) -> bool:
        """Whether Ray sends to this replica without the rejection protocol."""
        return not self._rejection_protocol or replica_id.unique_id in self._cross_language

    def on_broadcast_send(self, pending_request: Any, replica_id: Any) -> None:
        """DeploymentHandle.broadcast() sent this request to the replica
        without routing it: its completion is recorded, not as a rejection."""
        if self.source is None:
            self._configure_from_env()
        internal_request_id = pending_request.metadata.internal_request_id
        if is_sampled(internal_request_id, self.config.sample_rate):  # else on_completed counts it
            sends = self._unrouted_sends
            sends[internal_request_id] = (time.time(), time.monotonic())
            if len(sends) > MAX_OPEN_ATTEMPTS:  # completions that never came
                del sends[next(iter(sends))]
                self.source.count_unqueued("untracked_completion")

    def _result_done_threadsafe(self, attempt: _Attempt, value: Any) -> None:
        # On a Ray core-worker thread: only note the outcome. Waking the loop
        # for it (call_soon_threadsafe) costs the process measurable
        # throughput; the loop drains these at its next hook, or on a timer.
        self._results_done.append((attempt, not isinstance(value, BaseException), time.time(), time.monotonic()))

    def _drain_results(self) -> None:
        results = self._results_done
        while results:
            self._on_result_done(*results.popleft())

    def _drain_tick(self) -> None:
        try:
            self._drain_results()
        except Exception as exc:
            faults.record("recording completions", exc)
        if self._open or self._results_done:
            self._loop_or_bind().call_later(RESULTS_DRAIN_INTERVAL_S, self._drain_tick)
        else:
            self._drain_scheduled = False

    def _on_result_done(self, attempt: _Attempt, ok: bool, done_ts: float, done_at: float) -> None:
        try:
            attempt.ok, attempt.done_ts, attempt.done_at = ok, done_ts, done_at
            key = (attempt.replica_id, attempt.internal_request_id)
            unmatched = self._unmatched_completions.get(key)
            if unmatched:
                # Ray's own completion callback was registered first, so its
                # on_request_completed usually arrives before this: claim it.
                unmatched.popleft()
                if not unmatched:
                    del self._unmatched_completions[key]
                self._close_attempt(attempt)
            self._settle_later(key)
        except Exception as exc:
            faults.record("recording a completion", exc)

    def on_completed(self, replica_id: Any, internal_request_id: str, result: Any = NO_RESULT) -> None:
        """`result`: what the attempt's result completed with, when Ray's done-callback says."""
        if self.source is None:
            self._configure_from_env()
        rate = self.config.sample_rate
        if rate < 1.0 and not is_sampled(internal_request_id, rate):
            self.source.count_unqueued("sampled_out")
            return
        # Wall clock for the event, monotonic for latency and the grace period
        # (a clock jump must not change them).
        ts, at = time.time(), time.monotonic()
        if self.results_from_ray:
            ok = None if result is NO_RESULT else not isinstance(result, BaseException)
            attempt = self._open_attempt(replica_id, internal_request_id)
            if attempt is not None:
                attempt.done_ts, attempt.done_at, attempt.ok = ts, at, ok
                self._close_attempt(attempt)
                return
            sent = self._unrouted_sends.pop(internal_request_id, None) if self._unrouted_sends else None
            if sent is not None:
                self._emit((COMPLETED, ts, next_seq(), internal_request_id, replica_id,
                            max(at - sent[1], 0.0) * 1000.0, ok, False, None))
                return
            cancelled = isinstance(result, (TaskCancelledError, asyncio.CancelledError))
        else:
            self._drain_results()
            ok, cancelled = None, False
            for attempt in self._open.get(internal_request_id, ()):
                if attempt.done_ts is not None and attempt.replica_id == replica_id:
                    self._close_attempt(attempt)
                    return
        # Either a rejected attempt, or an accepted one whose routed event or
        # result has not come in yet (a fast request can finish before the
        # router resumes to call on_request_routed). Which, only time tells.
        key = (replica_id, internal_request_id)
        # Decided now: the replica may have left the membership by the time it is settled.
        refusable = not self.sends_unasked_to(replica_id)
        self._unmatched_completions.setdefault(key, deque()).append((ts, at, ok, cancelled, refusable))
        self._settle_later(key)

    def _open_attempt(self, replica_id: Any, internal_request_id: str) -> Optional[_Attempt]:
        """The oldest accepted attempt of this request on this replica awaiting its completion."""
        for attempt in self._open.get(internal_request_id, ()):
            # Ray passes the replica's own ReplicaID object: `is` spares the dataclass's __eq__.
            if attempt.replica_id is replica_id or attempt.replica_id == replica_id:
                return attempt
        return None

    def _settle_later(self, key: Tuple[Any, str]) -> None:
        if self._unmatched_completions.get(key) and self._open_attempt(*key) is None:
            self._loop_or_bind().call_later(REJECTION_GRACE_S, self._settle, key)

    def _settle(self, key: Tuple[Any, str]) -> None:
        """Completions no accepted attempt claimed within the grace period were rejections."""
        try:
            if self._open_attempt(*key) is not None:
                return  # an accepted attempt is in flight: its result settles this key
            unmatched = self._unmatched_completions.get(key)
            cutoff = time.monotonic() - REJECTION_GRACE_S
            while unmatched and unmatched[0][1] <= cutoff:
                ts, _, ok, _, refusable = unmatched.popleft()
                self._emit_unclaimed(key, ts, ok, refusable)
            if unmatched:
                self._settle_later(key)
            else:
                self._unmatched_completions.pop(key, None)
        except Exception as exc:
            faults.record("recording a rejection", exc)

    def _close_attempt(self, attempt: _Attempt) -> None:
        internal_request_id = attempt.internal_request_id
        attempts = self._open[internal_request_id]
        if len(attempts) == 1:
            del self._open[internal_request_id]
        else:
            attempts.remove(attempt)
        # A second routing task of a retried request may still hand out a
        # replica from its decisions until about now; after this, forget them.
        self._forget_request(attempt.trace)
        # The latency is not below zero: a completion can reach the loop before Ray resumes to call on_request_routed.
        self._submit((
            self.source, COMPLETED, attempt.done_ts, next_seq(), internal_request_id, attempt.replica_id,
            None if attempt.done_at is None else max(attempt.done_at - attempt.routed_at, 0.0) * 1000.0,
            attempt.ok, False,
            (attempt.routed_ts, attempt.routed_seq),
        ))

    def _emit_unclaimed(self, key: Tuple[Any, str], ts: float, ok: Optional[bool], refusable: bool) -> None:
        """A completion no accepted attempt claimed: a rejection, where the
        replica could refuse; else a send Ray did not report as routed."""
        replica_id, internal_request_id = key
        self._emit((COMPLETED, ts, next_seq(), internal_request_id, replica_id, None, False if refusable else ok,
                    refusable, None))

    def on_replicas(self, replicas: List[Any]) -> None:
        if self.source is None:
            self._configure_from_env()
        now = time.time()
        previous_seen = self._stats_seen
        seen = {}
        members = []
        for replica in replicas:
            replica_id = replica.replica_id
            stats = replica.routing_stats
            previous = previous_seen.get(replica_id.unique_id)
            if previous is None or previous[0] != stats:
                self._emit((STATS, now, next_seq(), replica_id, stats, collected_at(stats)))
                previous = (stats, now)
            seen[replica_id.unique_id] = previous
            members.append({
                "replica_id": replica_id.unique_id,
                "node_id": replica.node_id,
                "availability_zone": replica.availability_zone,
                "max_ongoing_requests": replica.max_ongoing_requests,
                "model_ids": sorted(replica.multiplexed_model_ids),
            })
        self._stats_seen = seen
        self._cross_language = frozenset(r.replica_id.unique_id for r in replicas if r.is_cross_language)
        self.sends_unasked = not self._rejection_protocol or bool(self._cross_language)
        members.sort(key=lambda member: member["replica_id"])
        if members != self._membership:
            self._membership = members
            self._emit((REPLICAS, now, next_seq(), members))
        if not replicas:
            # The deployment is going away: export now rather than at the next
            # interval, in case the process is about to be killed.
            self.exporter.wake()

