"""`routelens replay --mode simulate`: the recorded traffic, closed loop,
through the recorded router and through another one (docs/replay.md,
"--mode simulate").

The model, per deployment (the reasons are in the docs):

- Requests arrive when they arrived (`simulation_inputs.arrivals`), each at
  the traced router instance (source) that routed it, with its model id
  and recorded attributes (`pending_request.routelens_attributes`).
- Each replica has `max_ongoing_requests` slots and serves a request for a
  time drawn (seeded) from its own recorded latencies, which exclude the
  queue wait; with fewer than MIN_SAMPLES of them, from its deployment's.
- Each source gets a router of the class under test, built as Ray builds
  it there (`spec.build_router`, as the decisions mode builds it) and
  driven as Ray drives it, given the replicas in Ray's order
  (`simulation_inputs.listing_order`): Ray's own pending-request queues,
  retry ordering and fulfilment (`_fulfill_next_pending_request`: FIFO
  hand-offs with FIFOMixin, exact matches without), and routing tasks that
  follow `RequestRouter._fulfill_pending_requests` step by step (as many
  as Ray runs, choose_replicas, the queue-length cache then probes,
  Ray's backoff schedule). A replica refuses a send when it is full; the
  refusal is retried as Ray retries it. Every router hook sees what Ray
  would give it (on_send_request, on_new_queue_len_info, on_request_routed,
  on_request_completed, decrement_queue_len_cache, update_replicas).
- Queue lengths reach the router's cache when Ray's would (probe answers,
  the rejection protocol's answers, its own +1/-1 estimates) and age on
  the virtual clock (Ray's 10 s timeout). Actor calls take round trips
  drawn from the recording (RPC_DELAY_S each way without enough of them).
  Recorded routing stats and multiplexed models reach the routers when the
  recorded router saw them, those of one instant in one update_replicas,
  as Ray's broadcast: a replica holds a model from when it was recorded
  loading it, not before.
- Time is virtual: a discrete-event loop (a heap of timed callbacks and a
  queue of ready ones, as asyncio's own) in which everything the router
  does takes no time. Ray's module clock and the global `random` are
  swapped for the run's virtual clock and seeded state, then restored.

Memory is constant in the number of recorded requests: arrivals and stats
changes are streamed in chunks, and figures are kept as fine histograms.

This module imports Ray (through the offline harness) when a replay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from array import array
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ray.serve._private.request_router import request_router as ray_request_router
from sqlalchemy.engine import Connection

from routelens.routers.testing import make_replica, make_request

from ..export.arrow_reader import ArrowReader
from ..query.filters import Filters
from . import simulation_inputs as inputs
from .figures import ServedTally, deployment_figures, replica_figures
from .no_cluster import ClusterGuard, refusing_cluster_calls
from .recorded import DEFAULT_MAX_ONGOING_REQUESTS
from .simulation_inputs import Arrival, DeploymentInput, ReplicaInput
from .spec import ReplayError, RouterSpec, build_router

# An actor call's one-way time (probe, send, answer, completion), seconds, when
# the window holds fewer than MIN_SAMPLES round trips to draw from.
RPC_DELAY_S = 0.001
# A replica with fewer recorded latencies draws from its deployment's.
MIN_SAMPLES = 20
# A routing task that raised is replaced after this long (Ray replaces it at
# once; with no time passing, a router that always raises would loop forever).
ERROR_RESTART_S = 0.001
# Requests still unfinished this long after the last arrival are counted as such.
DRAIN_LIMIT_S = 600.0
# Arrivals fed to each run at a time (each run keeps its own random state): also the progress step.
BATCH = 2_000
# Callbacks at one instant beyond which the simulation is stuck (a router that never waits).
MAX_SAME_INSTANT = 2_000_000

# The result's columns: what was recorded, the recorded router simulated, the given router simulated.
RECORDED, RECORDED_SIMULATED, REPLAY = "recorded", "recorded_simulated", "replay"

# What a routing task yields: an await, and its argument.
_SLEEP, _PROBE, _WAIT_REPLICAS = 0, 1, 2


def replay(conn: Connection, f: Filters, router: RouterSpec, seed: int, on_progress: Callable[[int], None],
           max_ongoing_requests: Optional[int] = None) -> dict:
    """Simulates the window's traffic through the recorded routers and through
    `router`; figures side by side with what was recorded (docs/replay.md).

    `on_progress(n)`: n more recorded requests replayed (through every run:
    two per deployment when the recorded router class imports here, one
    otherwise). `max_ongoing_requests` overrides every replica's. Raises
    ReplayError for a router that cannot be built or simulated, or a window
    without recorded requests."""
    notes: List[str] = []
    if f.replicas or f.request_id or f.model_id or f.reasons:
        notes.append("replica, request id, model id and reason filters are ignored: a simulation replays a "
                     "deployment's whole traffic")
        f = replace(f, replicas=(), request_id=None, model_id=None, reasons=())
    reader = ArrowReader(conn)
    try:
        with refusing_cluster_calls() as guard:
            given = router.load()
            out_deployments = []
            for dep in inputs.deployments(conn, reader, f, seed):
                runs_spec = {REPLAY: {pk: (given, dict(router.kwargs)) for pk in dep.sources}}
                recorded, problem = _recorded_classes(dep, guard)
                if recorded is not None:
                    runs_spec[RECORDED_SIMULATED] = {pk: (recorded[s.router_pk], {})
                                                     for pk, s in dep.sources.items()}
                else:
                    notes.append(f"{dep.app}/{dep.deployment}: the recorded router was not simulated, only the "
                                 f"given one: {problem}")
                found = _simulate_deployment(conn, reader, f, dep, runs_spec, seed, max_ongoing_requests,
                                             on_progress, notes, guard)
                if found is not None:
                    out_deployments.append(found)
    finally:
        reader.close()
    if not out_deployments:
        raise ReplayError("no recorded requests to simulate in the window and filters given")
    return {
        "mode": "simulate", "router": {"class": router.path, "kwargs": router.kwargs}, "seed": seed, "runs": 1,
        "window": {"since": f.since, "until": f.until},
        "requests": sum(d[RECORDED]["requests"] for d in out_deployments),
        "model": {"rpc_delay_s": RPC_DELAY_S, "min_samples": MIN_SAMPLES, "reservoir": inputs.RESERVOIR,
                  "max_ongoing_requests": max_ongoing_requests,
                  "stats": "recorded values, when the recorded router saw them",
                  "backoff": "Ray's: 0.025 s x 2^attempt, at most 0.5 s; first retry immediate",
                  "queue_len_cache_timeout_s": 10.0},
        "notes": notes,
        "deployments": out_deployments,
    }


def _recorded_classes(dep: DeploymentInput, guard: ClusterGuard) -> Tuple[Optional[Dict[int, type]], Optional[str]]:
    """router_pk -> the recorded router class, imported and built here (without kwargs: the
    record does not hold them), if every one can be; else None and why."""
    classes: Dict[int, type] = {}
    for router_pk, name in dep.router_classes.items():
        try:
            classes[router_pk] = RouterSpec(name).load()
        except ReplayError as exc:  # a class defined in a script (__main__.X), not installed here, calling a cluster
            guard.clear()  # a recorded router that calls a cluster is left out, not the given one
            return None, f"the recorded router class {name} cannot be used here ({exc})"
    return classes, None


def _simulate_deployment(conn: Connection, reader: ArrowReader, f: Filters, dep: DeploymentInput,
                         runs_spec: Dict[str, Dict[int, Tuple[type, dict]]], seed: int, max_ongoing: Optional[int],
                         on_progress: Callable[[int], None], notes: List[str], guard: ClusterGuard) -> Optional[dict]:
    """The deployment's figures, each run beside what was recorded; None when nothing can be simulated."""
    replicas = _relevant_replicas(dep, f)
    if not replicas:
        return None
    pooled = [x for r in replicas for x in r.samples]
    if not pooled:
        notes.append(f"{dep.app}/{dep.deployment}: no completed request recorded, nothing to draw service times "
                     "from; not simulated")
        return None
    for r in replicas:
        if r.max_ongoing_requests is None and max_ongoing is None:
            notes.append(f"{dep.app}/{dep.deployment}: replica {r.replica_id} has no recorded max_ongoing_requests;"
                         f" Ray's default {DEFAULT_MAX_ONGOING_REQUESTS} is used")
    trips: Optional[array] = inputs.round_trips(reader, f, dep, random.Random(f"{seed}/{dep.pk}/round trips"))
    if len(trips) < MIN_SAMPLES:
        notes.append(f"{dep.app}/{dep.deployment}: {len(trips)} round trips recorded; actor calls take "
                     f"{RPC_DELAY_S * 1000:.1f} ms each way")
        trips = None
    network = {"round_trips": "recorded", "samples": len(trips), "p50_ms": _median_ms(trips)} if trips else \
        {"round_trips": "constant", "one_way_ms": RPC_DELAY_S * 1000}
    position = {pk: at for at, pk in enumerate(inputs.listing_order(reader, f, dep))}
    listed = sorted(replicas, key=lambda r: position[r.pk])  # routers get them so
    runs = {name: _Run(dep, listed, classes, seed, name, trips, max_ongoing, pooled)
            for name, classes in runs_spec.items()}
    stats_stream = _Lookahead(inputs.stats_changes_stream(reader, f, dep))
    models_stream = _Lookahead(inputs.model_changes(conn, reader, f, dep))
    loop = asyncio.new_event_loop()
    clock = _VirtualClock()
    try:
        with clock.installed():
            loop.run_until_complete(_drive(runs, inputs.arrivals(conn, reader, f, dep), stats_stream, models_stream,
                                           on_progress, clock, guard))
    finally:
        loop.close()
    for run in runs.values():
        if run.errors:
            notes.append(f"{dep.app}/{dep.deployment} ({run.name}): choose_replicas raised {run.errors} times "
                         f"(first: {run.first_error}); Ray logs and retries it, and so did the simulation")
        if run.unfinished:
            notes.append(f"{dep.app}/{dep.deployment} ({run.name}): {run.unfinished} requests were not finished "
                         f"{DRAIN_LIMIT_S:.0f} s after the last arrival")
    return {**_deployment(dep, replicas, runs), "network": network}


def _median_ms(values) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2] * 1000, 3)


def _relevant_replicas(dep: DeploymentInput, f: Filters) -> List[ReplicaInput]:
    """The replicas that were members during the window, or served or refused some of its requests."""
    out = []
    for r in dep.replicas.values():
        member = r.added_at is not None and r.added_at < f.until and (r.removed_at is None or r.removed_at >= f.since)
        if member or r.recorded.requests or r.recorded.rejections or r.seen:
            out.append(r)
    return sorted(out, key=lambda r: r.replica_id)


class _Lookahead:
    """An iterator of (time, ...) tuples, read up to a time."""

    def __init__(self, it: Iterator[tuple]):
        self.it = it
        self.next = next(it, None)

    def until(self, t: float) -> List[tuple]:
        out = []
        while self.next is not None and self.next[0] <= t:
            out.append(self.next)
            self.next = next(self.it, None)
        return out


async def _drive(runs: Dict[str, "_Run"], arrivals: Iterator[Arrival], stats_stream: _Lookahead,
                 models_stream: _Lookahead, on_progress: Callable[[int], None], clock: "_VirtualClock",
                 guard: ClusterGuard) -> None:
    batch: List[Arrival] = []
    for arrival in arrivals:
        batch.append(arrival)
        if len(batch) >= BATCH:
            until = batch[-1].at
            await _feed(runs, batch, stats_stream.until(until), models_stream.until(until), on_progress, clock)
            guard.check()  # a router that called a cluster (and caught the refusal) stops the simulation
            batch = []
    await _feed(runs, batch, stats_stream.until(math.inf), models_stream.until(math.inf), on_progress, clock)
    for run in runs.values():
        with run.active(clock):
            run.drain()
        await asyncio.sleep(0)  # the tasks update_replicas started end


async def _feed(runs, batch: List[Arrival], stats: List[tuple], models: List[tuple],
                on_progress: Callable[[int], None], clock) -> None:
    for run in runs.values():
        with run.active(clock):
            run.feed(batch, stats, models)
        await asyncio.sleep(0)  # the tasks update_replicas started end
    on_progress(len(batch))


class _VirtualClock:
    """The run's time where Ray's request router reads the wall clock
    (multiplexed matching timeout, queue-wait metric): `time` in that module
    is replaced by this, which forwards everything but `time()`."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = ray_request_router.time
        ray_request_router.time = self
        try:
            yield
        finally:
            ray_request_router.time = saved


class _Result:
    """What a router is given as a send's ReplicaResult: callbacks run at completion."""

    __slots__ = ("_callbacks", "_done")

    def __init__(self):
        self._callbacks = None
        self._done = False

    def add_done_callback(self, callback) -> None:
        if self._done:
            callback(None)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def finish(self) -> None:
        self._done = True
        if self._callbacks:
            for callback in self._callbacks:
                callback(None)
            self._callbacks = None

    def cancel(self) -> None:
        if not self._done:
            self.finish()


class _ServiceTimes:
    """A replica's service times, seconds: its recorded latencies in a seeded
    random order, shuffled again once all are used. Drawn without
    replacement, a replica that serves as many requests as it did serves
    its recorded distribution, not a noisy resample of it."""

    __slots__ = ("samples", "at", "rng")

    def __init__(self, samples_ms, rng: random.Random):
        self.samples = array("d", (ms / 1000.0 for ms in samples_ms))
        self.rng = rng
        self.at = len(self.samples)

    def next(self) -> float:
        if self.at >= len(self.samples):
            self.rng.shuffle(self.samples)
            self.at = 0
        self.at += 1
        return self.samples[self.at - 1]


class _Task:
    __slots__ = ("gen", "token")

    def __init__(self):
        self.gen = None
        self.token = 0


class _SimRouter:
    """One source's router, with the routing tasks the simulation runs for it."""

    def __init__(self, router: Any, run: "_Run"):
        self.router = router
        self.tasks: set = set()
        self.by_future: Dict[Any, _Task] = {}  # Ray's _routing_task_by_pending_request_future
        self.recipient = None
        self.run = run
        # Ray's private steps the simulation takes over (asyncio tasks; probes: build_router) or watches
        # (the recipient).
        router._maybe_start_routing_tasks = _nothing
        router._cancel_routing_task_for_pending_request = self.cancel_for
        router._record_queue_wait_time = self.received
        # Ray's metrics only (the router's gauges), not routing: not worth their time here.
        router._update_router_queue_len_gauge = _nothing

    def cancel_for(self, pr: Any) -> None:
        task = self.by_future.get(pr.future)
        if task is not None and task is not self.run.current:
            self.run.cancel(task)

    def received(self, pr: Any) -> None:
        self.recipient = pr


def _nothing(*args: Any, **kwargs: Any) -> None:
    pass


class _Run:
    """One simulated run of one deployment: a router class per source."""

    def __init__(self, dep: DeploymentInput, replicas: List[ReplicaInput], classes: Dict[int, Tuple[type, dict]],
                 seed: int, name: str, trips: Optional[array], max_ongoing: Optional[int], pooled: List[float]):
        self.dep, self.name, self.classes = dep, name, classes
        self.trips = trips
        self.rng_net = random.Random(f"{seed}/{name}/{dep.pk}/network")
        self.now = 0.0
        self.heap: list = []
        self.seq = 0
        self.ready: deque = deque()
        self.current: Optional[_Task] = None
        self.random_state = random.Random(f"{seed}/{name}/{dep.pk}/routers").getstate()
        self.routers: Dict[int, _SimRouter] = {}
        self.waiting_for_replicas: List[Tuple[_Task, int]] = []
        self.broadcast_due = False  # a stats change is waiting for its update_replicas
        self.decisions = 0
        self.errors = 0
        self.first_error: Optional[str] = None
        self.outstanding = 0  # arrived, not finished
        self.unfinished = 0
        self.last_arrival = None
        self.tallies: Dict[int, ServedTally] = {}
        self.fakes: Dict[int, Any] = {}
        self.service: Dict[int, _ServiceTimes] = {}
        # Replicas hold no multiplexed model until a recorded `replicas` event says they do (model_changes).
        for r in replicas:  # in Ray's order (`inputs.listing_order`): routers get them so
            fake = make_replica(r.replica_id, dep.deployment, dep.app, node_id=r.node_id,
                                availability_zone=r.availability_zone, max_ongoing_requests=max_ongoing
                                or r.max_ongoing_requests or DEFAULT_MAX_ONGOING_REQUESTS)
            fake.pk = r.pk
            fake.member = False
            self.fakes[r.pk] = fake
            self.tallies[r.pk] = ServedTally()
            samples = r.samples if len(r.samples) >= MIN_SAMPLES else pooled
            self.service[r.pk] = _ServiceTimes(samples, random.Random(f"{seed}/{r.replica_id}/service"))
        self.replica_inputs = {r.pk: r for r in replicas}
        self.started_at: Optional[float] = None

    # --- the event loop ---

    def at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def soon(self, fn, *args) -> None:
        self.ready.append((fn, args))

    def run_until(self, t_limit: float) -> None:
        heap, ready = self.heap, self.ready
        same = 0
        while True:
            while ready:
                fn, args = ready.popleft()
                fn(*args)
                same += 1
                if same > MAX_SAME_INSTANT:
                    raise ReplayError(f"{self.name}: the router keeps routing without time passing, at "
                                        f"{self.now:.3f}")
            if not heap or heap[0][0] > t_limit:
                break
            t, _seq, fn, args = heapq.heappop(heap)
            if t > self.now:
                self.now = t
                self.clock.now = t
                same = 0
            fn(*args)
        if t_limit > self.now and t_limit != math.inf:
            self.now = t_limit
            self.clock.now = t_limit

    @contextlib.contextmanager
    def active(self, clock: _VirtualClock) -> Iterator[None]:
        """This run's clock and global random state, for a while."""
        saved = random.getstate()
        random.setstate(self.random_state)
        self.clock = clock
        clock.now = self.now
        try:
            yield
        finally:
            self.random_state = random.getstate()
            random.setstate(saved)

    # --- arrivals, membership and stats ---

    def feed(self, batch: List[Arrival], stats: List[tuple], models: List[tuple]) -> None:
        if self.started_at is None and batch:
            self._start(batch[0].at)
        for seen_at, replica_pk, values in stats:
            self.at(max(seen_at, self.now), self._stats_seen, replica_pk, values)
        for seen_at, replica_pk, model_ids in models:
            self.at(max(seen_at, self.now), self._models_seen, replica_pk, model_ids)
        for arrival in batch:
            self.run_until(arrival.at)
            self._arrive(arrival)
        self.last_arrival = batch[-1].at if batch else self.last_arrival

    def drain(self) -> None:
        if self.started_at is None:
            return
        deadline = (self.last_arrival or self.now) + DRAIN_LIMIT_S
        while self.outstanding > 0 and (self.ready or (self.heap and self.heap[0][0] <= deadline)):
            self.run_until(self.heap[0][0] if self.heap else self.now)
        self.unfinished = self.outstanding

    def _start(self, t0: float) -> None:
        self.now = self.clock.now = t0
        self.started_at = t0
        members = []
        for pk, r in self.replica_inputs.items():
            added = r.added_at if r.added_at is not None else -math.inf
            removed = r.removed_at if r.removed_at is not None else math.inf
            if added <= t0 < removed:
                members.append(pk)
            elif added > t0:
                self.at(added, self._membership, pk, True)
            if t0 < removed < math.inf:
                self.at(removed, self._membership, pk, False)
        for pk in members:
            self.fakes[pk].member = True

    def _router_for(self, source_pk: int) -> _SimRouter:
        sr = self.routers.get(source_pk)
        if sr is None:
            sr = self.routers[source_pk] = self._build(source_pk)
        return sr

    def _build(self, source_pk: int) -> _SimRouter:
        cls, kwargs = self.classes.get(source_pk) or next(iter(self.classes.values()))
        router = build_router(cls, kwargs, self.dep.app, self.dep.deployment, self.dep.sources.get(source_pk),
                              list(self.replica_inputs.values()), self.clock.time)
        sr = _SimRouter(router, self)
        members = self._members()
        router.update_replicas(members)
        self._probe_new(sr, members)
        return sr

    def _members(self) -> List[Any]:
        return [fake for fake in self.fakes.values() if fake.member]

    def _membership(self, pk: int, joined: bool) -> None:
        fake = self.fakes[pk]
        if fake.member == joined:
            return
        fake.member = joined
        self._update_replicas(new=[fake] if joined else [])
        if joined and self.waiting_for_replicas:
            waiting, self.waiting_for_replicas = self.waiting_for_replicas, []
            for task, token in waiting:
                self.soon(self._step, task, token, None)

    def _update_replicas(self, new: List[Any]) -> None:
        members = self._members()
        for sr in self.routers.values():
            sr.router.update_replicas(members)
            if new:
                self._probe_new(sr, new)
            self._maybe_start_tasks(sr)

    def _probe_new(self, sr: _SimRouter, replicas: List[Any]) -> None:
        """Ray probes the replicas update_replicas adds, in the background."""
        if replicas:
            self.at(self.now + self._trip(), self._probe_answers, sr, list(replicas))

    def _probe_answers(self, sr: _SimRouter, replicas: List[Any]) -> None:
        cache = sr.router._replica_queue_len_cache
        for r in replicas:
            cache.update(r.replica_id, r.queue_len)

    def _stats_seen(self, pk: int, values: dict) -> None:
        """A replica's routing stats reach the routers, as Ray's broadcast brought them to the recorded one."""
        fake = self.fakes[pk]
        if values != fake.routing_stats:
            fake.routing_stats = values
            self._rebroadcast(fake)

    def _models_seen(self, pk: int, model_ids: frozenset) -> None:
        """A replica's multiplexed models reach the routers, as Ray's broadcast brought them to the recorded one."""
        fake = self.fakes[pk]
        fake.multiplexed_model_ids = set(model_ids)
        self._rebroadcast(fake)

    def _rebroadcast(self, fake: Any) -> None:
        if fake.member and not self.broadcast_due:
            # After the other changes seen at this instant (later in the heap): Ray's broadcast brings
            # every replica's stats and models in one update_replicas call.
            self.broadcast_due = True
            self.at(self.now, self._broadcast)

    def _broadcast(self) -> None:
        self.broadcast_due = False
        self._update_replicas(new=[])

    # --- a request's way: Ray's _choose_replica_for_request and _route_and_send_request_once ---

    def _arrive(self, arrival: Arrival) -> None:
        sr = self._router_for(arrival.source_pk)
        pr = make_request(arrival.model_id, arrival.request_id, arrival.internal_request_id)
        pr.created_at = arrival.at  # Ray orders retries by it, and the tracer measures the queue wait from it
        pr.routelens_attributes = arrival.attributes
        pr.routelens_own = True
        self.outstanding += 1
        router = sr.router
        router._pending_requests_to_fulfill.append(pr)
        router._pending_requests_to_route.append(pr)
        router._add_pending_request_to_indices(pr)
        self._maybe_start_tasks(sr)

    def _retry(self, sr: _SimRouter, pr: Any) -> None:
        router = sr.router
        pr.reset_future()
        router._insert_pending_request_sorted(router._pending_requests_to_fulfill, pr)
        router._insert_pending_request_sorted(router._pending_requests_to_route, pr)
        router._add_pending_request_to_indices(pr)
        self._maybe_start_tasks(sr)

    def _trip(self) -> float:
        """An actor call's round trip: drawn from the recorded ones, or twice the constant one-way time."""
        trips = self.trips
        if trips is None:
            return 2 * RPC_DELAY_S
        return trips[int(self.rng_net.random() * len(trips))]

    def _send(self, sr: _SimRouter, pr: Any, replica: Any) -> None:
        sr.router.on_send_request(replica.replica_id)
        half = self._trip() / 2
        self.at(self.now + half, self._receive, sr, pr, replica, half)

    def _receive(self, sr: _SimRouter, pr: Any, replica: Any, back: float) -> None:
        """At the replica: a slot, or a refusal (full, or no longer a member)."""
        n = replica.queue_len
        if n < replica.max_ongoing_requests and replica.member:
            replica.queue_len = n = n + 1
            service_s = self.service[replica.pk].next()
            result = _Result()
            self.at(self.now + service_s, self._finish, sr, pr, replica, result)
            self.at(self.now + back, self._answer, sr, pr, replica, n, service_s, result)
        else:
            self.at(self.now + back, self._answer, sr, pr, replica, n, None, None)

    def _answer(self, sr: _SimRouter, pr: Any, replica: Any, n: int, service_s: Optional[float], result) -> None:
        router = sr.router
        replica_id = replica.replica_id
        router.on_new_queue_len_info(replica_id, n)
        tally = self.tallies[replica.pk]
        if service_s is not None:
            router.on_request_routed(pr, replica_id, result)
            tally.requests += 1
            tally.queue_wait.add((self.now - pr.created_at) * 1000.0)
            tally.latency.add(service_s * 1000.0)
            if not pr.routelens_own:
                tally.handoffs += 1
            return
        tally.rejections += 1
        self.soon(router.on_request_completed, replica_id, pr.metadata.internal_request_id)
        self._retry(sr, pr)

    def _finish(self, sr: _SimRouter, pr: Any, replica: Any, result: _Result) -> None:
        replica.queue_len -= 1
        self.at(self.now + self._trip() / 2, self._completed, sr, pr, replica, result)

    def _completed(self, sr: _SimRouter, pr: Any, replica: Any, result: _Result) -> None:
        router = sr.router
        router.on_request_completed(replica.replica_id, pr.metadata.internal_request_id)
        router.decrement_queue_len_cache(replica.replica_id)
        result.finish()
        self.outstanding -= 1

    # --- routing tasks: Ray's _fulfill_pending_requests ---

    def _maybe_start_tasks(self, sr: _SimRouter) -> None:
        for _ in range(sr.router.target_num_routing_tasks - len(sr.tasks)):
            task = _Task()
            task.gen = self._routing_task(sr, task)
            sr.tasks.add(task)
            self.soon(self._step, task, task.token, None)

    def cancel(self, task: _Task) -> None:
        task.token += 1  # its pending wake-up is void
        self.soon(self._close, task)

    def _close(self, task: _Task) -> None:
        task.gen.close()

    def _step(self, task: _Task, token: int, value: Any) -> None:
        if task.token != token:
            return
        self.current = task
        try:
            op, arg = task.gen.send(value)
        except StopIteration:
            return
        finally:
            self.current = None
        if op == _SLEEP:
            self.at(self.now + arg, self._step, task, token, None)
        elif op == _PROBE:
            sr, replicas, backoff_index = arg
            deadline = _probe_deadline(sr.router, backoff_index)
            trip = self._trip()
            answered = trip <= deadline
            self.at(self.now + (trip if answered else deadline), self._probed, task, token, sr, replicas, answered)
        else:
            self.waiting_for_replicas.append((task, token))

    def _probed(self, task: _Task, token: int, sr: _SimRouter, replicas: List[Any], answered: bool) -> None:
        if task.token != token:
            return  # cancelled meanwhile: Ray's _probe_queue_lens never reaches its cache updates
        cache = sr.router._replica_queue_len_cache
        results = []
        for r in replicas:
            if answered:
                cache.update(r.replica_id, r.queue_len)
                results.append((r, r.queue_len))
            else:
                results.append((r, None))
        self._step(task, token, results)

    def _background_probe(self, sr: _SimRouter, replicas: List[Any], backoff_index: int) -> None:
        trip = self._trip()
        if trip <= _probe_deadline(sr.router, backoff_index):
            self.at(self.now + trip, self._probe_answers, sr, replicas)

    def _routing_task(self, sr: _SimRouter, task: _Task):
        """RequestRouter._fulfill_pending_requests and _choose_replicas_with_backoff, as a generator
        that yields what Ray awaits."""
        router = sr.router
        fulfil_queue = router._pending_requests_to_fulfill
        errored = False
        try:
            while len(sr.tasks) <= router.target_num_routing_tasks:
                pr = router._get_next_pending_request_to_route()
                if pr is None:
                    break
                sr.by_future[pr.future] = task
                try:
                    backoff_index = 0
                    attempt = 0
                    entered_backoff = False
                    done = False
                    while not done:
                        while not router._replicas:
                            yield _WAIT_REPLICAS, None
                        ranks = self._choose(router, pr)
                        for candidates in ranks:
                            if not candidates:
                                continue
                            while fulfil_queue and fulfil_queue[0].future.done():
                                fulfil_queue.popleft()
                            if pr.future.done():
                                done = True
                                break
                            replica = yield from self._select(sr, candidates, backoff_index)
                            if replica is not None:
                                self._fulfil(sr, pr, replica)
                                if pr.future.done():
                                    done = True
                                    break
                                continue
                            backoff_index += 1
                        if done or not pr.routing_context.should_backoff:
                            continue
                        if not entered_backoff:
                            entered_backoff = True
                        else:
                            yield _SLEEP, router._compute_backoff_s(attempt)
                            attempt += 1
                finally:
                    if sr.by_future.get(pr.future) is task:
                        del sr.by_future[pr.future]
        except ReplayError:  # the simulation's own: it cannot go on
            raise
        except Exception as exc:  # Ray logs it; the task ends and another starts
            errored = True
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"
        finally:
            while fulfil_queue and fulfil_queue[0].future.done():
                fulfil_queue.popleft()
            sr.tasks.discard(task)
            if router._pending_requests_to_route:
                if errored:
                    self.at(self.now + ERROR_RESTART_S, self._maybe_start_tasks, sr)
                else:
                    self._maybe_start_tasks(sr)

    def _choose(self, router: Any, pr: Any) -> list:
        self.decisions += 1
        coroutine = router.choose_replicas(candidate_replicas=router._replicas_list, pending_request=pr)
        try:
            while True:
                if coroutine.send(None) is not None:
                    coroutine.close()
                    raise ReplayError(f"{type(router).__name__}.choose_replicas awaits something outside the "
                                        "router (an actor call, a sleep): it cannot be simulated")
        except StopIteration as done:
            return done.value

    def _select(self, sr: _SimRouter, candidates: List[Any], backoff_index: int):
        """RequestRouter._select_from_candidate_replicas: the cache, else probes."""
        router = sr.router
        cache = router._replica_queue_len_cache
        lowest = math.inf
        chosen = None
        not_in_cache = []
        for r in candidates:
            queue_len = cache.get(r.replica_id)
            if queue_len is None or queue_len >= r.max_ongoing_requests:
                not_in_cache.append(r)
            elif queue_len < lowest:
                lowest = queue_len
                chosen = r.replica_id
        if chosen is None:
            if not_in_cache:
                for r, queue_len in (yield _PROBE, (sr, not_in_cache, backoff_index)):
                    if queue_len is not None and queue_len < r.max_ongoing_requests and queue_len < lowest:
                        lowest = queue_len
                        chosen = r.replica_id
        elif not_in_cache:
            self._background_probe(sr, not_in_cache, backoff_index)
        if chosen is None:
            return None
        return router._replicas.get(chosen)

    def _fulfil(self, sr: _SimRouter, pr: Any, replica: Any) -> None:
        sr.recipient = None
        sr.router._fulfill_next_pending_request(replica, pr.metadata)
        recipient = sr.recipient
        if recipient is not None:
            sr.recipient = None
            recipient.routelens_own = recipient is pr
            self.soon(self._send, sr, recipient, replica)


def _probe_deadline(router: Any, backoff_index: int) -> float:
    """RequestRouter._probe_queue_lens: the deadline doubles with each backoff, up to its maximum."""
    longest = max(router.queue_len_response_deadline_s, router.max_queue_len_response_deadline_s)
    return min(router.queue_len_response_deadline_s * 2 ** min(backoff_index, 64), longest)


def _deployment(dep: DeploymentInput, replicas: List[ReplicaInput], runs: Dict[str, _Run]) -> dict:
    """The deployment's figures and its replicas', in each column: what was recorded, then each run."""
    columns: Dict[str, Dict[int, ServedTally]] = {RECORDED: {r.pk: r.recorded for r in replicas}}
    columns.update((name, run.tallies) for name, run in runs.items())
    totals = {name: sum(tallies[r.pk].requests for r in replicas) for name, tallies in columns.items()}
    out = {"app": dep.app, "deployment": dep.deployment,
           "recorded_router_classes": sorted(set(dep.router_classes.values())), "sources": len(dep.sources)}
    for name in (RECORDED, RECORDED_SIMULATED, REPLAY):
        if name not in columns:
            out[name] = None
            continue
        figures = deployment_figures([columns[name][r.pk] for r in replicas])
        if name == RECORDED:
            figures["decisions"] = dep.recorded_decisions
        else:
            run = runs[name]
            figures.update(decisions=run.decisions, unfinished=run.unfinished, router_errors=run.errors)
        out[name] = figures
    fakes = runs[REPLAY].fakes
    out["replicas"] = [{
        "replica_id": r.replica_id, "node_id": r.node_id, "availability_zone": r.availability_zone,
        "max_ongoing_requests": fakes[r.pk].max_ongoing_requests, "service_samples": r.seen,
        "service_times": "own" if len(r.samples) >= MIN_SAMPLES else "deployment's",
        **{name: replica_figures(columns[name][r.pk], totals[name]) if name in columns else None
           for name in (RECORDED, RECORDED_SIMULATED, REPLAY)},
    } for r in replicas]
    return out
