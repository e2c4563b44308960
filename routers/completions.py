"""Completion pairing: each of Ray's completions with the attempt it finishes.

Ray calls `on_request_completed` once per send attempt, refused attempts
included, keyed only by (replica, internal_request_id), which fan-out calls
and retries share, and possibly before the accepted attempt's
`on_request_routed` (a fast request can finish before the router resumes to
call it). So:

- a routed request opens an attempt (`_track_attempt`); a completion closes
  the key's oldest open attempt, and the `completed` record names its
  `routed` event;
- a refusal is recorded when Ray's sender reads the replica's answer
  (`on_refused`, routers.ray_contract REFUSALS), and its attempt's
  completion, which may come before or after, is then only consumed: a
  refused attempt's completion is never taken for an accepted one's on
  the same replica, and nothing waits on a timer for it;
- a completion no open attempt claims waits (`_unmatched_completions`): the
  attempt routed next claims it; one still unclaimed after
  REJECTION_GRACE_S is an attempt that failed before the replica
  answered, or, where the answers cannot be read, is taken for a refusal
  where the replica could refuse it; else it is a send Ray did not report
  as routed (routers.unrouted_sends).
- the completions still awaited (attempts in flight) or held back (waiting
  for their attempt) when the process ends are counted as dropped
  ("unsettled_at_exit") by the exporter's shutdown (Source.pending_completions).

Whether an attempt succeeded comes from the result Ray's own done-callback
completes, read from its frame by the mixin (`results_from_ray`,
routers.ray_contract). Where that cannot be read, the tracer watches each
accepted attempt's result with a done-callback of its own, which costs the
process one more fetch of it: the callback runs on a Ray worker thread and
only notes the outcome; the loop drains the notes at its next completion,
or on a timer.

A latency runs from the send (`send_times`: Ray calls on_send_request as it
sends) to the completion, not from `on_request_routed`, which Ray calls
only once the replica's answer is back and the router's loop resumes the
sender: a router that blocks its loop would otherwise shorten every
latency it records. The routed record carries the time between the two
(routers.attribution). Sends without the rejection protocol are routed as
they are sent, and start there.

Latencies and the grace period run on the monotonic clock (a wall-clock
jump must not change them); event timestamps stay wall-clock.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ray.exceptions import TaskCancelledError

from .exporter import Source
from .faults import faults
from .ids import is_sampled
from .records import RequestTrace, completed_record

# Accepted attempts whose completion has not been seen, per router. Beyond
# this the oldest are forgotten (counted as dropped, "untracked_completion"),
# so completions that never come cannot grow memory.
MAX_OPEN_ATTEMPTS = 100_000
# Send times noted whose answer has not come (send_times). None comes when
# the send fails (the replica died): beyond this the oldest are forgotten,
# so such sends cannot grow memory. Live ones are one per request in flight.
MAX_UNANSWERED_SENDS = 100_000
# A framework completion that no accepted attempt claims within this time is
# reported as a rejection. Accepted attempts claim theirs within a few loop
# iterations; the margin covers a loop stalled by load.
REJECTION_GRACE_S = 2.0
# How often results noted by worker threads are drained when no hook runs.
RESULTS_DRAIN_INTERVAL_S = 0.25
NO_RESULT = object()  # a completion whose result is unknown (not called from Ray's done-callback)


class _Attempt:
    """An accepted send attempt, waiting for its completion."""

    __slots__ = ("replica_id", "internal_request_id", "trace", "routed_ts", "routed_seq", "started_at", "ok",
                 "done_ts", "done_at")

    def __init__(self, replica_id, internal_request_id, trace, routed_ts, routed_seq, started_at):
        self.replica_id = replica_id
        self.internal_request_id = internal_request_id
        self.trace = trace
        self.routed_ts = routed_ts  # wall clock, for the events
        self.routed_seq = routed_seq  # with routed_ts, the routed event's id
        # Where the latency starts (monotonic: a wall-clock jump must not change it): the send, else the routing.
        self.started_at = started_at
        self.ok: Optional[bool] = None
        self.done_ts: Optional[float] = None
        self.done_at: Optional[float] = None  # None with done_ts set: ended without a latency


class _Completion:
    """A completion from Ray that no accepted attempt has claimed yet."""

    __slots__ = ("ts", "at", "ok", "cancelled", "refusable")

    def __init__(self, ts: float, at: float, ok: Optional[bool], cancelled: bool, refusable: bool):
        self.ts = ts  # wall clock
        self.at = at  # monotonic
        self.ok = ok
        self.cancelled = cancelled  # a cancelled result is never an accepted attempt's
        self.refusable = refusable  # whether the replica could have refused it (decided on arrival)


class CompletionPairing:
    # Provided by the composed RouterTracer.
    config: Any
    source: Optional[Source]
    _submit: Callable[[Any], None]
    _configure_from_env: Callable[[], None]
    _loop_or_bind: Callable[[], asyncio.AbstractEventLoop]
    _new_trace: Callable[[Any], RequestTrace]  # routers.decisions
    answered_decision: Callable[[RequestTrace, Any], Optional[list]]  # routers.attribution
    sends_unasked_to: Callable[[Any], bool]  # routers.unrouted_sends
    _unrouted_sends: Dict[str, Tuple[float, float]]  # routers.unrouted_sends
    _complete_unrouted_send: Callable[..., None]  # routers.unrouted_sends

    def __init__(self, router: Any, init_kwargs: Any, *, results_from_ray: bool = False,
                 records_refusals: bool = False, **options: Any):
        super().__init__(router, init_kwargs, **options)
        self.results_from_ray = results_from_ray
        self.records_refusals = records_refusals
        # id(the frame of Ray's sender) -> the monotonic time it sent its request, noted by the mixin's
        # on_send_request until the replica's answer (on_new_queue_len_info): one per request in flight.
        self.send_times: Dict[int, float] = {}
        # (replica_id, internal_request_id) -> refusals recorded whose attempt's completion has not come yet.
        self._refusals_unclaimed: Dict[Tuple[Any, str], int] = {}
        # internal_request_id -> the request's accepted attempts awaiting their
        # completion, oldest first (more than one only for retries and fan-out
        # calls). Keyed by the id alone: a str hashes from its cache, a
        # (ReplicaID, id) tuple through ReplicaID's Python __hash__.
        self._open_attempts: Dict[str, List[_Attempt]] = {}
        # (replica_id, internal_request_id) -> completions no accepted attempt claimed yet, oldest first.
        self._unmatched_completions: Dict[Tuple[Any, str], Deque[_Completion]] = {}
        # (attempt, ok, wall time, monotonic time) appended by Ray's worker
        # threads, drained on the loop (without results from Ray only).
        self._results_done: Deque[Tuple[_Attempt, bool, float, float]] = deque()
        self._drain_scheduled = False

    def _track_attempt(self, trace: RequestTrace, replica_id: Any, routed_ts: float, routed_seq: int,
                       started_at: float, handed_over: bool, result: Any) -> None:
        """Open the attempt of a request just routed, until its completion.
        `started_at`: where its latency starts (monotonic): its send, else now.
        `handed_over`: a fulfilment handed the request its replica (at trace.handed_at)."""
        internal_request_id = trace.metadata.internal_request_id
        attempt = _Attempt(replica_id, internal_request_id, trace, routed_ts, routed_seq, started_at)
        open_attempts = self._open_attempts
        source = self.source
        source.pending_completions += 1
        attempts = open_attempts.get(internal_request_id)
        if attempts is None:
            open_attempts[internal_request_id] = [attempt]
            if len(open_attempts) > MAX_OPEN_ATTEMPTS:
                for _ in open_attempts.pop(next(iter(open_attempts))):
                    source.pending_completions -= 1
                    source.count_unqueued("untracked_completion")
        else:
            attempts.append(attempt)
        if self.results_from_ray:
            if not self._unmatched_completions:  # the common case, without building a key
                return
            key = (replica_id, internal_request_id)
            unmatched = self._unmatched_completions.get(key)
            # A completion waiting here is this attempt's own (it completed
            # before Ray resumed to call on_request_routed) if no refusal can
            # be among those waiting: refusals claim theirs as the replica
            # answers; else if it came after this attempt was handed its
            # replica. A cancelled result never is.
            if unmatched and not unmatched[-1].cancelled and (
                    self.records_refusals or (handed_over and unmatched[-1].at >= trace.handed_at)):
                completion = self._claim_unmatched(key, unmatched, newest=True)
                attempt.done_ts, attempt.done_at, attempt.ok = completion.ts, completion.at, completion.ok
                self._close_attempt(attempt)
            return
        result.add_done_callback(functools.partial(self._result_done_threadsafe, attempt))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop_or_bind().call_later(RESULTS_DRAIN_INTERVAL_S, self._drain_tick)

    def on_completed(self, replica_id: Any, internal_request_id: str, result: Any = NO_RESULT) -> None:
        """`result`: what the attempt's result completed with, when Ray's done-callback says."""
        if self.source is None:
            self._configure_from_env()
        rate = self.config.sample_rate
        if rate < 1.0 and not is_sampled(internal_request_id, rate):
            self.source.count_unqueued("sampled_out")
            return
        if self._refusals_unclaimed and self._refusal_claims(replica_id, internal_request_id):
            return  # a refused attempt's completion: recorded as the replica refused
        # Wall clock for the event, monotonic for latency and the grace period.
        ts, at = time.time(), time.monotonic()
        if self.results_from_ray:
            ok = None if result is NO_RESULT else not isinstance(result, BaseException)
            attempt = self._oldest_open_attempt(replica_id, internal_request_id)
            if attempt is not None:
                attempt.done_ts, attempt.done_at, attempt.ok = ts, at, ok
                self._close_attempt(attempt)
                return
            if self._unrouted_sends and self._complete_unrouted_send(replica_id, internal_request_id, ts, at, ok):
                return
            cancelled = isinstance(result, (TaskCancelledError, asyncio.CancelledError))
        else:
            self._drain_results()
            ok, cancelled = None, False
            for attempt in self._open_attempts.get(internal_request_id, ()):
                if attempt.done_ts is not None and attempt.replica_id == replica_id:
                    self._close_attempt(attempt)
                    return
        # Either a rejected attempt, or an accepted one whose routed event or
        # result has not come in yet. Which, only time tells.
        key = (replica_id, internal_request_id)
        # Decided now: the replica may have left the membership by the time it is settled.
        refusable = not self.sends_unasked_to(replica_id)
        self._unmatched_completions.setdefault(key, deque()).append(_Completion(ts, at, ok, cancelled, refusable))
        self.source.pending_completions += 1
        self._settle_later(key)

    def on_refused(self, pending_request: Any, replica_id: Any, reported_queue_len: Optional[int] = None) -> None:
        """The replica refused the request: Ray's sender read its answer (with
        the count of ongoing requests the replica reported). The refusal is
        recorded now; its attempt's completion is consumed when it comes."""
        if self.source is None:
            self._configure_from_env()
        trace = getattr(pending_request, "_routelens", None) or self._new_trace(pending_request)
        decision = self.answered_decision(trace, replica_id)
        if not trace.sampled:
            return  # its completion is counted as sampled out
        internal_request_id = trace.metadata.internal_request_id
        key = (replica_id, internal_request_id)
        unmatched = self._unmatched_completions.get(key)
        if unmatched:  # the refused attempt's completion came first
            self._claim_unmatched(key, unmatched, newest=False)
        else:
            refusals = self._refusals_unclaimed
            refusals[key] = refusals.get(key, 0) + 1
            if len(refusals) > MAX_OPEN_ATTEMPTS:  # completions that never came: nothing left to record
                del refusals[next(iter(refusals))]
        self._submit(completed_record(self.source, time.time(), internal_request_id, replica_id, None, False, True,
                                      None, decision, reported_queue_len))

    def _refusal_claims(self, replica_id: Any, internal_request_id: str) -> bool:
        """Whether a completion is a recorded refusal's: consume it if so."""
        key = (replica_id, internal_request_id)
        waiting = self._refusals_unclaimed.get(key)
        if not waiting:
            return False
        if waiting == 1:
            del self._refusals_unclaimed[key]
        else:
            self._refusals_unclaimed[key] = waiting - 1
        return True

    def _claim_unmatched(self, key: Tuple[Any, str], unmatched: Deque[_Completion], newest: bool) -> _Completion:
        """Take a waiting completion (the newest or the oldest) off the key's queue."""
        completion = unmatched.pop() if newest else unmatched.popleft()
        if not unmatched:
            del self._unmatched_completions[key]
        self.source.pending_completions -= 1
        return completion

    def _oldest_open_attempt(self, replica_id: Any, internal_request_id: str) -> Optional[_Attempt]:
        """The oldest accepted attempt of this request on this replica awaiting its completion."""
        for attempt in self._open_attempts.get(internal_request_id, ()):
            # Ray passes the replica's own ReplicaID object: `is` spares the dataclass's __eq__.
            if attempt.replica_id is replica_id or attempt.replica_id == replica_id:
                return attempt
        return None

    def _close_attempt(self, attempt: _Attempt) -> None:
        """The attempt is done (done_ts, done_at and ok set): record its completion."""
        internal_request_id = attempt.internal_request_id
        self.source.pending_completions -= 1
        attempts = self._open_attempts[internal_request_id]
        if len(attempts) == 1:
            del self._open_attempts[internal_request_id]
        else:
            attempts.remove(attempt)
        # Never below zero, whatever the clock: without a send time, the latency starts at on_request_routed,
        # and a completion can reach the loop before Ray resumes to call it.
        self._submit(completed_record(
            self.source, attempt.done_ts, internal_request_id, attempt.replica_id,
            None if attempt.done_at is None else max(attempt.done_at - attempt.started_at, 0.0) * 1000.0,
            attempt.ok, False, (attempt.routed_ts, attempt.routed_seq),
        ))

    def _settle_later(self, key: Tuple[Any, str]) -> None:
        if self._unmatched_completions.get(key) and self._oldest_open_attempt(*key) is None:
            self._loop_or_bind().call_later(REJECTION_GRACE_S, self._settle, key)

    def _settle(self, key: Tuple[Any, str]) -> None:
        """Completions no attempt claimed within the grace period: where the
        replica could refuse, an attempt that failed before it answered (or,
        where answers cannot be read, a refusal); else a send Ray did not
        report as routed."""
        try:
            if self._oldest_open_attempt(*key) is not None:
                return  # an accepted attempt is in flight: its result settles this key
            unmatched = self._unmatched_completions.get(key)
            cutoff = time.monotonic() - REJECTION_GRACE_S
            replica_id, internal_request_id = key
            while unmatched and unmatched[0].at <= cutoff:
                completion = self._claim_unmatched(key, unmatched, newest=False)
                refusal = completion.refusable and not self.records_refusals
                self._submit(completed_record(self.source, completion.ts, internal_request_id, replica_id, None,
                                              False if refusal else completion.ok, refusal, None))
            if key in self._unmatched_completions:
                self._settle_later(key)
        except Exception as exc:
            faults.record("recording a completion no attempt claimed", exc)

    # -- without results from Ray: the tracer's own done-callbacks ------------

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
        if self._open_attempts or self._results_done:
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
                self._claim_unmatched(key, unmatched, newest=False)
                self._close_attempt(attempt)
            self._settle_later(key)
        except Exception as exc:
            faults.record("recording a completion", exc)
