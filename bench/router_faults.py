"""Routing latency while the collector fails, against a healthy collector, in
one run (the machines are shared and noisy: the ratios are what travels).

One local Ray Serve; four copies of the same deployment (an echo, 4 replicas,
`num_cpus=0`), each behind Ray's pow-2 router traced to its own collector, each
in a child process so that none takes this process's CPU:

- healthy: the real collector (`routelens collector`, SQLite);
- errors: a stand-in that answers 500 (the exporter spools, retries with backoff);
- timeouts: a stand-in that holds every request past the exporter's HTTP timeout (5 s);
- stalls: a stand-in that holds every request 10 s, then answers 200.

Rounds send the same requests through a deployment handle (the router runs in
this process, as do its exporter thread and its spool), `--concurrency` at a
time, to each deployment in turn, in a rotating order. Per round and
deployment: the p99 of request latency (handle call to answer: routing
included). Printed: per failure, the median over rounds of p99 / the same
round's healthy p99 (target <= 1.05), and the medians of p50 and p99.

    .venv/bin/python bench/router_faults.py [--requests 1000] [--rounds 9] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TARGET = 1.05
# The failing collectors: (HTTP status, seconds each request is held first).
FAILURES = {"errors": (500, 0.0), "timeouts": (200, 60.0), "stalls": (200, 10.0)}


def _stand_in(status: int, hold_s: float, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(hold_s)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"stored": 0, "duplicates": 0}')
            except OSError:
                pass  # the exporter gave up waiting: what a timeout is

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class StandIn:
    def __init__(self, status: int, hold_s: float):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = multiprocessing.get_context("spawn").Process(target=_stand_in, args=(status, hold_s, port),
                                                                   daemon=True)
        self.process.start()
        time.sleep(0.5)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(handle, n: int, concurrency: int):
    out = []
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            t0 = time.perf_counter()
            await handle.remote()
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per deployment and round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self) -> int:
            return 1

    scratch = tempfile.mkdtemp(prefix="routelens-bench-faults-")
    servers = {"healthy": ServerProcess(f"sqlite:///{scratch}/healthy.db", free_port()).start()}
    servers.update({name: StandIn(status, hold_s) for name, (status, hold_s) in FAILURES.items()})
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    handles = {}
    try:
        for name, server in servers.items():
            config = RequestRouterConfig(
                request_router_class="routelens.routers.examples:TracedPowerOfTwoChoicesRequestRouter",
                request_router_kwargs={"collector_url": server.url, "spool_dir": os.path.join(scratch, name)})
            handles[name] = serve.run(Echo.options(request_router_config=config).bind(), name=name,
                                      route_prefix=f"/{name}")

        async def measure():
            for handle in handles.values():  # warm up: routers, queue-length caches, first failures
                await latencies(handle, 200, args.concurrency)
            p50 = {name: [] for name in handles}
            p99 = {name: [] for name in handles}
            names = list(handles)
            for round_number in range(args.rounds):
                order = names[round_number % len(names):] + names[:round_number % len(names)]
                for name in order:
                    seconds = await latencies(handles[name], args.requests, args.concurrency)
                    p50[name].append(percentile(seconds, 0.50))
                    p99[name].append(percentile(seconds, 0.99))
            return p50, p99

        p50, p99 = asyncio.run(measure())
    finally:
        serve.shutdown()
        ray.shutdown()
        for server in servers.values():
            server.stop()

    print(f"request latency through a handle, pow-2 traced, {args.requests} requests x {args.rounds} rounds, "
          f"{args.concurrency} at a time:")
    for name in handles:
        line = (f"  {name:9s} p50 {statistics.median(p50[name]) * 1000:6.2f} ms"
                f"  p99 {statistics.median(p99[name]) * 1000:6.2f} ms")
        if name != "healthy":
            ratios = [mine / healthy for mine, healthy in zip(p99[name], p99["healthy"])]
            ratio = statistics.median(ratios)
            line += (f"  p99 / healthy: median {ratio:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})"
                     f"  (target <= {TARGET}) {'OK' if ratio <= TARGET else 'MISSED'}")
        print(line)


if __name__ == "__main__":
    main()
