"""The process-wide exporter: one bounded queue, one thread, every traced router.

Producers (router hooks on Ray's router event loop) call `submit`, an O(1)
append that never blocks: when the queue is full the event is counted as
dropped on its source and forgotten. The exporter thread wakes every
`flush_interval_s` (or as soon as a full batch is waiting), encodes what is
queued into one batch per source, and hands each batch to the source's
destination: the collector over HTTP (spooling to disk while it is away) or
a JSON Lines file.

This module is imported by reference from the installed `routelens.routers`
package, never pickled by value with a router class: that is what makes the
exporter one per process even though Ray ships router classes by value.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from .config import TracerConfig
from .delivery import CollectorClient, Destination, JsonlSink
from .faults import faults
from .spool import open_collector_spool
from .wire import batch_json, encode

logger = logging.getLogger("routelens")

# Each cycle the thread may spend this long replaying a spool before it goes
# back to draining the queue, so a long replay never lets the queue overflow.
REPLAY_BUDGET_S = 0.5
SHUTDOWN_TIMEOUT_S = 3.0
# At shutdown, how long the router loops may take to run what Ray handed them.
LOOP_BARRIER_S = 0.5
# The exporter thread encodes in chunks of this many events (about 0.1 ms of
# work), and after a chunk releases the GIL if it has held it this long: a
# router loop waiting for the GIL waits about a millisecond at most, rather
# than the interpreter's switch interval (5 ms).
ENCODE_CHUNK = 25
GIL_HOLD_S = 0.001


class Source:
    """One traced router instance: its identity on the wire and its counters."""

    def __init__(self, info: Dict[str, Any], destination_key: Tuple[str, ...]):
        self.info = info
        self.id: str = info["source_id"]
        self.destination_key = destination_key
        self.batch_seq = 0  # written by the exporter thread only
        # As of the last batch sent or spooled; None when they must go out again.
        self.sent_counters: Optional[Tuple[int, Dict[str, int]]] = (0, {})
        # Events generated, dropped ones included; queued events count once exported.
        self.produced = 0
        self._dropped: Dict[str, int] = {}
        self._lock = threading.Lock()
        # `completed` events its tracer awaits or holds back, not yet produced
        # (routers.completions): those of accepted attempts in flight, and
        # completions waiting for their attempt. Written on the router loop.
        self.pending_completions = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the router's, once it routed a request

    def count_produced(self, n: int) -> None:
        with self._lock:
            self.produced += n

    def count_dropped(self, reason: str, n: int = 1) -> None:
        """Count `n` queued or delivered-but-lost events as dropped."""
        if n <= 0:
            return
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def count_unqueued(self, reason: str) -> None:
        """Count one event that was produced but never queued (sampled out, queue full)."""
        with self._lock:
            self.produced += 1
            self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def uncount_unqueued(self, reason: str) -> None:
        """Take back one `count_unqueued`: the event is queued after all."""
        with self._lock:
            self.produced -= 1
            self._dropped[reason] -= 1
            if not self._dropped[reason]:
                del self._dropped[reason]

    def drop_pending(self, reason: str) -> None:
        """The process is ending: count the completions still pending as produced and dropped."""
        with self._lock:
            pending, self.pending_completions = self.pending_completions, 0
            if pending > 0:
                self.produced += pending
                self._dropped[reason] = self._dropped.get(reason, 0) + pending

    def dropped(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    def counters(self) -> Tuple[int, Dict[str, int]]:
        """(produced, dropped by reason), read together."""
        with self._lock:
            return self.produced, dict(self._dropped)

    def counters_unsent(self) -> bool:
        """Whether the counters changed since the last batch that got out."""
        return self.counters() != self.sent_counters

    def restart_after_fork(self) -> None:
        """In a forked child: a new source, so its batches never mix with the parent's."""
        self.id = self.info["source_id"] = uuid.uuid4().hex
        self.info["pid"] = os.getpid()
        self.batch_seq = 0
        self.sent_counters = (0, {})
        self.produced = 0
        self._dropped = {}
        self._lock = threading.Lock()
        self.pending_completions = 0
        self.loop = None  # the parent's router loop thread is not the child's


class Exporter:
    def __init__(self, config: TracerConfig):
        self.queue_max = config.queue_max_events
        self.batch_max = config.batch_max_events
        self.flush_interval_s = config.flush_interval_s
        self.spool_max_bytes = config.spool_max_bytes
        self.http_timeout_s = config.http_timeout_s
        self._sources: Dict[str, Source] = {}
        self._configs: Dict[Tuple[str, ...], TracerConfig] = {}  # per destination, to rebuild after fork
        self._destinations: Dict[Tuple[str, ...], Destination] = {}
        self._thread: Optional[threading.Thread] = None
        self._init_runtime_state()
        _live_exporters.add(self)  # restarted in a forked child (_after_fork_in_child)

    def _init_runtime_state(self) -> None:
        self._queue: Deque[tuple] = deque()
        self._lock = threading.Lock()  # guards _sources, _destinations and the thread's start
        self._wake = threading.Event()
        # Guards _cycles (cycles the thread has finished) and _in_cycle.
        self._cycle = threading.Condition()
        self._cycles = 0
        self._in_cycle = False
        self._stopping = False

    # -- producer side (router event loop) ---------------------------------

    def add_source(self, info: Dict[str, Any], config: TracerConfig) -> Source:
        source = Source(info, config.destination_key)
        with self._lock:
            if config.destination_key not in self._destinations:
                self._configs[config.destination_key] = config
                self._destinations[config.destination_key] = self._make_destination(config)
            self._sources[source.id] = source
            if self._thread is None:
                self._start_thread()
        return source

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="routelens-exporter", daemon=True)
        self._thread.start()

    def _restart_after_fork(self) -> None:
        # The child inherits the parent's queue, connections, spool and files,
        # but not its thread. It starts afresh: the parent exports what it queued.
        parent_destinations = list(self._destinations.values())
        self._init_runtime_state()
        for destination in parent_destinations:
            destination.close()
        self._destinations = {key: self._make_destination(c) for key, c in self._configs.items()}
        for source in self._sources.values():
            source.restart_after_fork()
        self._sources = {source.id: source for source in self._sources.values()}
        self._thread = None
        if self._sources:
            self._start_thread()

    def submit(self, item: tuple) -> None:
        """Queue one event (`item[0]` is its Source). O(1), never blocks."""
        queue = self._queue
        n = len(queue)
        if n >= self.queue_max:
            item[0].count_unqueued("queue_full")
            return
        queue.append(item)
        if n + 1 == self.batch_max:
            self._wake.set()

    def wake(self) -> int:
        """Export what is queued now instead of at the next interval, without
        waiting. Returns the number of the cycle that exports it, for
        `wait_for_cycle`: the next one, or the one after if the thread is in
        a cycle (which may have drained the queue before these events came)."""
        with self._cycle:
            self._wake.set()
            return self._cycles + (2 if self._in_cycle else 1)

    def wait_for_cycle(self, cycle: int, timeout_s: float) -> bool:
        """Block until the thread has finished cycle number `cycle` (see
        `wake`). Returns False if it did not within the timeout. For work
        overlapped with an export (bench/tracer_overhead.py); to wait until
        everything is delivered, `flush`."""
        with self._cycle:
            return self._cycle.wait_for(lambda: self._cycles >= cycle, timeout_s)

    # -- control (tests, benches, shutdown) ---------------------------------
    # As OpenTelemetry's BatchSpanProcessor: flush (its force_flush) is the
    # one way to wait for delivery, close (its shutdown) the way to stop.

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything queued so far is delivered (or spooled and
        replayed), counters included. Returns False if that did not happen
        within the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._export_queued_now(deadline - time.monotonic()):
                return False
            if (not self._queue and not any(d.backlog for d in list(self._destinations.values()))
                    and not any(s.counters_unsent() for s in list(self._sources.values()))):
                return True
            time.sleep(0.05)
        return False

    def _export_queued_now(self, timeout_s: float) -> bool:
        """Wake the thread and block until it has run whole cycles until the
        queue was empty at the end of one: everything queued so far has then
        been handed to its destination (delivered, spooled or counted as
        dropped). Returns False if that did not happen within the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.wait_for_cycle(self.wake(), max(0.0, deadline - time.monotonic())):
                return False
            if not self._queue:
                return True

    def close(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Deliver what is queued within `timeout_s`, then stop the thread."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        sources = list(self._sources.values())
        # At exit the router loops still run: let each run what Ray already
        # handed it (completions of requests whose results were returned),
        # so that their events are in the last batch, not lost after it.
        _run_pending_callbacks({source.loop for source in sources if source.loop is not None},
                               min(LOOP_BARRIER_S, timeout_s / 2))
        # The completions the tracers still await or hold will never be
        # produced: count them, so that the last batch's counters say so.
        for source in sources:
            source.drop_pending("unsettled_at_exit")
        self._wake.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        left = len(self._queue)
        if left:
            logger.warning("routelens: %d events not exported before shutdown", left)

    # -- exporter thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            with self._cycle:
                self._wake.clear()
                self._in_cycle = True
            stopping = self._stopping
            try:
                self._export_queued()
                for destination in list(self._destinations.values()):
                    destination.replay(REPLAY_BUDGET_S, self._count_spooled_drop)
                self._send_changed_counters()
            except Exception as exc:  # a bug here must not kill the thread
                faults.record("the exporter thread", exc)
            with self._cycle:
                self._cycles += 1
                self._in_cycle = False
                self._cycle.notify_all()
            if stopping and not self._queue:
                for destination in list(self._destinations.values()):
                    destination.close()
                return

    def _export_queued(self) -> None:
        queue = self._queue
        while queue:
            items = [queue.popleft() for _ in range(min(len(queue), self.batch_max))]
            by_source: Dict[Source, List[tuple]] = {}
            for item in items:
                by_source.setdefault(item[0], []).append(item)
            for source, source_items in by_source.items():
                # Counted here rather than in submit() to keep the hot path short.
                source.count_produced(len(source_items))
                try:
                    self._deliver(source, source_items)
                except Exception as exc:  # a bug, but never an uncounted loss
                    source.count_dropped("export_error", len(source_items))
                    faults.record("exporting a batch", exc)

    def _deliver(self, source: Source, items: List[tuple]) -> None:
        parts = []
        held_since = time.perf_counter()
        for start in range(0, len(items), ENCODE_CHUNK):
            for item in items[start:start + ENCODE_CHUNK]:
                try:
                    parts.append(encode(item))
                except Exception as exc:  # say, a stats dict with keys JSON cannot hold
                    source.count_dropped("encode_error")
                    faults.record("encoding an event", exc)
            # Encoding holds the GIL; give it up now and then so the router
            # loop of this process never waits a whole switch interval for it.
            # Not after every chunk: time.sleep(0) sleeps out the kernel's
            # timer slack, about 90 us, as long as encoding 25 events.
            if time.perf_counter() - held_since >= GIL_HOLD_S:
                time.sleep(0)
                held_since = time.perf_counter()
        if parts:
            self._send_batch(source, parts, len(parts))

    def _send_batch(self, source: Source, parts: List[str], n_events: int) -> None:
        source.batch_seq += 1
        source.sent_counters = produced, dropped = source.counters()
        body = batch_json(source.info, source.batch_seq, dropped, produced, parts)
        if not self._destinations[source.destination_key].deliver(body, n_events, source.count_dropped):
            source.sent_counters = None  # these counters did not get out: send them again

    def _send_changed_counters(self) -> None:
        # Counters travel with batches; when they changed after a source's last
        # batch (drops while delivering it, sampled-out requests), an empty
        # batch carries them, so the collector's totals end up exact.
        for source in list(self._sources.values()):
            if source.counters_unsent():
                self._send_batch(source, [], 0)

    def _count_spooled_drop(self, body: bytes, reason: str) -> None:
        try:
            parsed = json.loads(body)
            source = self._sources.get(parsed["source"]["source_id"])
            n_events = len(parsed["events"])
        except (ValueError, KeyError, TypeError):
            return
        if source is not None:
            source.count_dropped(reason, n_events)

    def _make_destination(self, config: TracerConfig) -> Destination:
        if not config.collector_url:
            return JsonlSink(config.jsonl_path)
        spool = open_collector_spool(config.spool_dir, config.collector_url, self.spool_max_bytes)
        return CollectorClient(config.collector_url, config.token, spool, self.http_timeout_s)


_exporter: Optional[Exporter] = None
_exporter_lock = threading.Lock()


def _run_pending_callbacks(loops, timeout_s: float) -> None:
    """Wait (at most `timeout_s` in all) until each running loop, other than
    this thread's, has run the callbacks scheduled on it so far."""
    try:
        own = asyncio.get_running_loop()
    except RuntimeError:
        own = None
    barriers = []
    for loop in loops:
        if loop is not own and loop.is_running() and not loop.is_closed():
            barrier = concurrent.futures.Future()
            try:
                loop.call_soon_threadsafe(barrier.set_result, None)
            except RuntimeError:  # closed meanwhile
                continue
            barriers.append(barrier)
    concurrent.futures.wait(barriers, timeout=timeout_s)


def get_exporter(config: TracerConfig) -> Exporter:
    """The exporter of this process, created by the first traced router."""
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            _exporter = Exporter(config)
            atexit.register(_exporter.close)
        return _exporter


# Every exporter of the process (tests and benches make their own beside the
# process-wide one), for the fork hook.
_live_exporters: "weakref.WeakSet[Exporter]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The module's one fork hook. Another thread may have held the lock at the
    # fork, and no exporter's thread survives it: each restarts afresh.
    global _exporter_lock
    _exporter_lock = threading.Lock()
    for exporter in list(_live_exporters):
        exporter._restart_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
