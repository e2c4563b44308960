"""What tracing costs a router, measured against the same router untraced in
the same run (the machines are shared and noisy: only the ratios mean much).

1. Hot path, in process, no Ray I/O: Ray's pow-2 router over 16 fake
   replicas, plain and traced, calls interleaved; the median added cost of
   a `choose_replicas` call (target <= 2 us), and of a whole request's hooks
   (decision + routed + completed), for information. The median over a few
   rounds of each round's median difference. Then a whole request's added
   cost through Ray's own sending and done-callback code, with the CPU
   caches evicted before its routing and its completion, as Ray's own work
   evicts them in a driver: close to what part 2 reads from the router
   loop's CPU clock, in seconds rather than minutes.
2. End to end on Ray Serve: in each round, 2,000 requests through handles
   to deployments routed by the plain pow-2 router and 2,000 to ones routed
   by the traced one, in chunks of 100 that alternate between the two; the
   exporter thread's work is charged to the traced ones. The median of the
   rounds' throughput ratios, traced / untraced (target >= 0.97), their
   spread and a 95% interval for the median (resampling the rounds); and,
   for information, where the tracer's cost goes: the CPU time per request
   of the router's event-loop thread (traced minus plain) and of the
   exporter thread, read from each thread's own clock. `--control` runs
   this part alone with every deployment routed by the plain router.

    .venv/bin/python bench/tracer_overhead.py [--requests 2000] [--rounds 25] [--control]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import threading
import time
from typing import Dict, Optional

from intervals import bootstrap_interval  # this directory is on sys.path when run as a script
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from routelens.routers.config import TracerConfig
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter
from routelens.routers.exporter import Exporter
from routelens.routers.testing import FakeResult, RayRouter, make_request, make_router


async def hot_path(calls: int, rounds: int):
    """Per round: the median added cost of a call, traced minus plain; and
    the exporter thread's cost per event.

    Calls alternate between the two routers, and which goes first alternates
    too, so both see the same machine; each round's median difference is a
    figure, and the median of the rounds discards a round that another
    process on the machine disturbed. The exporter thread is woken between
    rounds rather than during them, so the per-call times are the router
    loop's own; its work is timed apart.
    """
    sink = os.path.join(tempfile.mkdtemp(prefix="routelens-bench-"), "events.jsonl")
    config = TracerConfig(jsonl_path=sink, flush_interval_s=3600, batch_max_events=10**9, queue_max_events=10**9)
    exporter = Exporter(config)
    routers = {
        "plain": make_router(PowerOfTwoChoicesRequestRouter, 16),
        "traced": make_router(TracedPowerOfTwoChoicesRequestRouter, 16, router_kwargs={"jsonl_path": sink},
                              exporter=exporter),
    }
    clock = time.perf_counter_ns
    added = {"choose": [], "cycle": []}
    export_s, exported = 0.0, 0
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        choose = {"plain": [], "traced": []}
        cycle = {"plain": [], "traced": []}
        for call in range(per_round):
            for label in (("plain", "traced") if call % 2 == 0 else ("traced", "plain")):
                router = routers[label]
                pr = make_request()
                t0 = clock()
                ranks = await router.choose_replicas(router._replicas_list, pr)
                t1 = clock()
                replica_id = ranks[0][0].replica_id
                result = FakeResult.sent(router, replica_id, pr)
                router.on_request_routed(pr, replica_id, result)
                result.finish(None)  # Ray's done-callback: on_request_completed
                t2 = clock()
                choose[label].append(t1 - t0)
                cycle[label].append(t2 - t0)
            await asyncio.sleep(0)  # let completion hops run, as Ray's loop would
        for name, times in (("choose", choose), ("cycle", cycle)):
            added[name].append((statistics.median(times["traced"]) - statistics.median(times["plain"])) / 1000)
        await asyncio.sleep(0.01)
        queued = len(exporter._queue)
        t0 = time.perf_counter()
        exporter.flush(30)
        export_s += time.perf_counter() - t0
        exported += queued
    exporter.close()
    return added, export_s / exported * 1e6


async def cold_request(requests: int, traced: Optional[Dict[str, type]] = None) -> Dict[str, Dict[str, float]]:
    """Per traced router class (default: the traced pow-2 router), the
    median added cost of a request's two halves over the plain pow-2 router,
    with the CPU caches evicted before each, as Ray's own work evicts them in
    a driver (~0.5 ms of it between a request's hooks): warm, the hooks cost
    a few microseconds; in a Ray driver, several times that (see
    CacheEvictor). Each request goes through Ray's own sending and
    done-callback code (routers.testing.RayRouter), so every hook Ray calls
    is counted: routing (choose_replicas, the FIFO fulfilment, the send and
    queue-length hooks, on_request_routed) and completion (Ray's callback,
    on_request_completed). The routers take turns request by request, the
    first of each turn rotating. Timed by the thread's CPU clock."""
    traced = traced or {"traced": TracedPowerOfTwoChoicesRequestRouter}
    sink = os.path.join(tempfile.mkdtemp(prefix="routelens-bench-"), "events.jsonl")
    config = TracerConfig(jsonl_path=sink, flush_interval_s=3600, batch_max_events=10**9, queue_max_events=10**9)
    exporter = Exporter(config)
    senders = {"plain": RayRouter(make_router(PowerOfTwoChoicesRequestRouter, 2))}  # two replicas, as end to end
    for label, router_class in traced.items():
        senders[label] = RayRouter(make_router(router_class, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter))
    labels = list(senders)
    evict = CacheEvictor()
    clock = time.thread_time_ns
    times = {(label, half): [] for label in senders for half in ("routing", "completion")}
    for call in range(requests):
        first = call % len(labels)
        for label in labels[first:] + labels[:first]:
            evict()
            t0 = clock()
            result = await senders[label].send(make_request())
            t1 = clock()
            evict()
            t2 = clock()
            result.finish(None)
            await asyncio.sleep(0)  # Ray's done-callback reaches the loop: on_request_completed
            t3 = clock()
            times[label, "routing"].append(t1 - t0)
            times[label, "completion"].append(t3 - t2)
        if call % 500 == 0:
            exporter._queue.clear()  # the exporter's work is not what this measures
    exporter._queue.clear()  # nor at the end (and tracer_ab's base tracer may queue records of another layout)
    exporter.close()
    return {label: {half: (statistics.median(times[label, half]) - statistics.median(times["plain", half])) / 1000
                    for half in ("routing", "completion")}
            for label in traced}


class CacheEvictor:
    """Evicts the CPU caches, as Ray's own Python does between two hooks of
    a request in a driver: it writes a buffer larger than a core's L2 cache
    and reads a field of many small Python objects. How much it evicts is a
    choice, so the figure it gives is for comparing versions of the tracer
    and its hooks with one another, in one run; the absolute cost in a
    driver is the router loop thread's CPU time measured end to end."""

    def __init__(self, buffer_mb: int = 3, objects: int = 25_000):
        self._buffer = bytearray(buffer_mb << 20)
        self._zeros = bytes(len(self._buffer) // 64)
        self._objects = [{"n": n} for n in range(objects)]

    def __call__(self) -> int:
        self._buffer[::64] = self._zeros
        return sum(o["n"] for o in self._objects[::3])


DEPLOYMENTS = (("plain", 0), ("traced", 0), ("traced", 1), ("plain", 1))  # (router, copy), in the order made


def end_to_end(n_requests: int, rounds: int, chunk: int = 100, control: bool = False):
    """Per round: each router's throughput over `n_requests` requests, over
    two deployments each (DEPLOYMENTS). With `control`, the traced router's
    deployments are routed by the plain router too: what the ratio reads
    when the tracer costs nothing (the setup's own bias and noise).

    Requests go in chunks of `chunk` (sent together, then all awaited), the
    two routers' chunks alternating (and which goes first alternating too),
    so that each round's pair of figures is taken over the same seconds:
    the machine is shared, and its load changes within seconds by far more
    than the tracer costs.

    The exporter thread's work is charged to the traced deployments, in full:
    its interval and batch size are set out of reach, so it exports only
    when told to, and it is told to when a traced chunk starts with a
    batch's worth of events (the default `batch_max_events`, the size at
    which it wakes by itself) queued. As in production it then works while
    requests are in flight, and the chunk's time runs until it has encoded
    and written them (the line "waiting for the exporter thread" is what
    is left after the chunk's requests are done). Events still queued at
    the end of a round (less than a batch) are exported in the next one's
    first traced chunk, as in steady traffic, rather than with every other
    thread idle; only the last round's go out untimed. Its CPU time during
    the plain router's chunks is printed too: it should be nil. The tracer's
    other deferred work (completions drained on a timer, the grace period
    of an unclaimed completion) falls where it falls; it is microseconds
    per request.

    After the warm-up the driver's heap is frozen out of the garbage
    collector (gc.freeze), as Ray Serve freezes its proxies' and replicas'
    after start-up, the processes where routers run in production: full
    collections of the driver's ~170,000 start-up objects (about 100 ms
    each) otherwise land in either router's chunks at random, and are
    most of the spread between rounds. The tracer's own allocations are
    still collected, and charged to it.
    """
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from routelens.routers import exporter as exporter_module

    # Replicas take every request (no rejections), so throughput measures the
    # request path itself rather than the randomness of backoff and retries.
    @serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=2, max_ongoing_requests=200)
    class Echo:
        async def __call__(self) -> int:
            return 1

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sink = os.path.join(tempfile.mkdtemp(prefix="routelens-bench-"), "events-{pid}.jsonl")
    plain = RequestRouterConfig(request_router_class=PowerOfTwoChoicesRequestRouter)
    configs = {"plain": plain, "traced": plain if control else RequestRouterConfig(
        request_router_class=TracedPowerOfTwoChoicesRequestRouter,
        request_router_kwargs={"jsonl_path": sink, "flush_interval_s": 3600, "batch_max_events": 10**9})}
    # Two deployments per router, made and warmed up in the order plain,
    # traced, traced, plain, and used in pairs (the first two, the last two)
    # in turn: in control runs with two deployments, the one warmed up first
    # ran about 1% slower, whatever its name or the order the deployments
    # were made in, and this order cancels such a drift.
    handles = {}
    for label, copy in DEPLOYMENTS:
        name = f"{label}-{copy}"
        handles[label, copy] = serve.run(Echo.options(request_router_config=configs[label]).bind(), name=name,
                                         route_prefix=f"/{name}")

    def send(handle, n):
        responses = [handle.remote() for _ in range(n)]
        for response in responses:
            response.result(timeout_s=120)

    for handle in handles.values():  # warm up routers, caches and connections
        for _ in range(5):
            send(handle, chunk)
    gc.collect()
    gc.freeze()
    exporter = exporter_module._exporter  # the driver's, created by the traced router
    assert control or exporter is not None, "the traced router did not start an exporter in this process"
    loop_clock = router_loop_clock()
    exporter_clock = None if control else time.pthread_getcpuclockid(exporter._thread.ident)
    batch = TracerConfig().batch_max_events
    ratios, rates, exporting_s = [], {"plain": [], "traced": []}, 0.0
    loop_cpu_s, exporter_cpu_s = {"plain": 0.0, "traced": 0.0}, {"plain": 0.0, "traced": 0.0}
    deployment_s = {key: 0.0 for key in handles}
    deployment_requests = {key: 0 for key in handles}
    if not control:
        exporter.flush(30)  # the warm-up's events, outside the timing
    for _ in range(rounds):
        seconds = {"plain": 0.0, "traced": 0.0}
        for number, start in enumerate(range(0, n_requests, chunk)):
            copy = number // 2 % 2  # each pair of deployments sees either one first equally often
            for label in (("plain", "traced") if number % 2 == 0 else ("traced", "plain")):
                t0, loop0 = time.perf_counter(), thread_cpu_s(loop_clock)
                exporter0 = thread_cpu_s(exporter_clock)
                # A batch is waiting: the exporter works while this chunk is in flight.
                cycle = exporter.wake() if label == "traced" and not control and len(exporter._queue) >= batch \
                    else None
                size = min(chunk, n_requests - start)
                send(handles[label, copy], size)
                loop_cpu_s[label] += thread_cpu_s(loop_clock) - loop0
                if cycle is not None:
                    t1 = time.perf_counter()
                    if not exporter.wait_for_cycle(cycle, 30):
                        raise RuntimeError("the exporter did not export a batch within 30 s")
                    exporting_s += time.perf_counter() - t1
                exporter_cpu_s[label] += thread_cpu_s(exporter_clock) - exporter0
                elapsed = time.perf_counter() - t0
                seconds[label] += elapsed
                deployment_s[label, copy] += elapsed
                deployment_requests[label, copy] += size
        for label, s in seconds.items():
            rates[label].append(n_requests / s)
        ratios.append(seconds["plain"] / seconds["traced"])
    if not control and not exporter.flush(30):  # what the last round left queued, untimed: less than a batch
        raise RuntimeError("the exporter did not export the traced events within 30 s")
    serve.shutdown()
    ray.shutdown()
    per_request_us = 1e6 / (n_requests * rounds)
    cpu_us = {f"exporter {label}": s * per_request_us for label, s in exporter_cpu_s.items()}
    if loop_clock is not None:
        cpu_us.update({f"loop {label}": s * per_request_us for label, s in loop_cpu_s.items()})
    per_deployment = {f"{label}-{copy}": deployment_requests[label, copy] / s
                      for (label, copy), s in deployment_s.items()}
    return ({label: statistics.median(r) for label, r in rates.items()}, per_deployment, ratios,
            exporting_s / rounds, cpu_us)


def router_loop_clock():
    """The CPU clock of the thread running Ray's router event loop (a handle's
    routers all run on it), or None if it cannot be found in this Ray."""
    for thread in threading.enumerate():
        if getattr(getattr(thread, "_target", None), "__name__", "") == "_run_router_event_loop":
            return time.pthread_getcpuclockid(thread.ident)
    return None


def thread_cpu_s(clock) -> float:
    return 0.0 if clock is None else time.clock_gettime(clock)


def report_end_to_end(requests: int, rounds: int, control: bool = False) -> None:
    rps, per_deployment, ratios, exporting_s, cpu_us = end_to_end(requests, rounds, control=control)
    ratio = statistics.median(ratios)
    print(f"end to end, Ray Serve, {requests} requests per router through handles in each of {rounds} rounds,"
          f" chunks of both routers interleaved, two deployments each"
          + (" (control: all routed by the plain router):" if control else ":"))
    print(f"  plain {rps['plain']:.0f} req/s  traced {rps['traced']:.0f} req/s (medians)")
    print("  each deployment, in the order made: "
          + ", ".join(f"{name} {rate:.0f}" for name, rate in per_deployment.items()) + " req/s")
    low, high = bootstrap_interval(ratios, statistics.median)
    verdict = "" if control else f"  (target >= 0.97) {'OK' if ratio >= 0.97 else 'MISSED'}"
    print(f"  throughput traced/untraced: median {ratio:.3f} (rounds from {min(ratios):.3f} to {max(ratios):.3f})"
          + verdict)
    undecided = not control and low < 0.97 <= high
    print(f"  95% interval of that median, by resampling the rounds: {low:.3f} to {high:.3f}"
          + ("  (it holds 0.97: this run alone cannot tell its median from the target)" if undecided else ""))
    print("  rounds: " + " ".join(f"{r:.3f}" for r in ratios))
    if control:
        return
    print(f"  of the traced time, waiting for the exporter thread: {exporting_s * 1000:.1f} ms per round")
    if "loop plain" in cpu_us:
        print(f"  CPU per request: router loop thread plain {cpu_us['loop plain']:.1f} us, traced"
              f" {cpu_us['loop traced']:.1f} us (+{cpu_us['loop traced'] - cpu_us['loop plain']:.1f})")
    print(f"  CPU per request: exporter thread {cpu_us['exporter traced']:.1f} us"
          f" (in the plain router's chunks: {cpu_us['exporter plain']:.1f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="hot-path calls per router")
    parser.add_argument("--hot-rounds", type=int, default=5, help="hot-path rounds the calls are split into")
    parser.add_argument("--cold-requests", type=int, default=6_000, help="requests timed with caches evicted")
    parser.add_argument("--requests", type=int, default=2_000, help="end-to-end requests per round")
    parser.add_argument("--rounds", type=int, default=25, help="end-to-end rounds, each timing both routers")
    parser.add_argument("--skip-serve", action="store_true", help="measure the hot path only")
    parser.add_argument("--control", action="store_true",
                        help="end to end only, with every deployment routed by the plain router: the ratio when"
                             " the tracer costs nothing, so the setup's own bias and noise (expect 1.000)")
    args = parser.parse_args()
    if args.control:
        report_end_to_end(args.requests, args.rounds, control=True)
        return

    added, export_us = asyncio.run(hot_path(args.calls, args.hot_rounds))
    choose = statistics.median(added["choose"])
    print(f"hot path, pow-2 over 16 fake replicas, {args.calls} interleaved calls per router"
          f" in {args.hot_rounds} rounds (median of the rounds' medians):")
    print(f"  choose_replicas  added {choose:.2f} us per decision (rounds from {min(added['choose']):.2f}"
          f" to {max(added['choose']):.2f})  (target <= 2.00) {'OK' if choose <= 2.0 else 'MISSED'}")
    print(f"  whole request (decision + routed + completed hooks)  added {statistics.median(added['cycle']):.2f} us")
    print(f"  exporter thread, off the router loop: {export_us:.1f} us per event (encode, JSON, write)")
    cold = asyncio.run(cold_request(args.cold_requests))["traced"]
    print(f"  through Ray's own sending and done-callback code, with the CPU caches evicted before each half,"
          f" as in a Ray driver ({args.cold_requests} requests, 2 replicas): added {sum(cold.values()):.1f} us"
          " per request (" + ", ".join(f"{half} {us:.1f}" for half, us in cold.items()) + ")")
    if not args.skip_serve:
        report_end_to_end(args.requests, args.rounds)


if __name__ == "__main__":
    main()
