"""Ingest latency while exports stall: p99 with N exports whose clients
stopped reading, over p99 without them, measured in the same run, on SQLite
and PostgreSQL (issue 24, point 1; target <= 1.5).

Per backend: the real collector (`routelens collector`, a `ServerProcess`)
on a fresh database holding a decision log of `--log` decisions (its CSV
export is some 10 MB: more than the socket buffers hold, so an export whose
client stops reading stays in flight). Then `--rounds` rounds, each of two
phases in turn (the order alternates from round to round, so that the
machine's drift falls on both alike):

- without: one sender POSTs `--batches` gzip'd batches of 100 decision
  events back to back (a source of its own, as the tracer's exporter), each
  answer's latency recorded;
- stalled: the same, while `--stalled` clients hold `GET /v1/export?since=0&format=csv`
  open, having read their first 100 bytes (those beyond the collector's
  export limit are answered 503 at once; they are counted). Timing starts
  once the collector's processes and PostgreSQL's have been idle for a
  second: the exports have filled the sockets and wait (their work until
  then is an export's cost, not a stall's).

Every answer must be 200 with every event stored. Printed: each phase's
p50/p99, and the p99 ratio stalled / without over all rounds' samples.

    .venv/bin/python bench/export_starvation.py [--stalled 20] [--rounds 3] [--batches 300]
                                                [--backends sqlite,postgres]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import workload  # noqa: E402
from ingest import tree_cpu_seconds  # noqa: E402

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from routelens.collector.store import db  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TARGET = 1.5
PER_BATCH = 100
HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}


def post_timed(port: int, bodies: List[bytes], per_batch: int) -> List[float]:
    """POST each body in turn on one keep-alive connection; each answer's latency (s)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies = []
    try:
        for body in bodies:
            started = time.perf_counter()
            connection.request("POST", "/v1/events", body=body, headers=HEADERS)
            response = connection.getresponse()
            answer = response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200 or json.loads(answer).get("stored") != per_batch:
                raise RuntimeError(f"ingest answered {response.status}: {answer[:200]!r}")
    finally:
        connection.close()
    return latencies


def stall_exports(port: int, count: int) -> Tuple[List[socket.socket], Dict[str, int]]:
    """`count` CSV exports whose clients read 100 bytes, then stop; their sockets, and the answers' statuses."""
    sockets, statuses = [], {}
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /v1/export?since=0&format=csv HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = sock.recv(100)
        status = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "none"
        statuses[status] = statuses.get(status, 0) + 1
        sockets.append(sock)
    return sockets, statuses


def settle(pids: List[int], limit_s: float = 60) -> float:
    """Wait until the collector's processes (its exports' SQLite readers
    among them) and PostgreSQL's are nearly idle for a second: the exports
    have filled the sockets and stalled. Seconds waited."""
    started = time.monotonic()
    quiet = 0
    before = sum(map(tree_cpu_seconds, pids))
    while quiet < 2 and time.monotonic() - started < limit_s:
        time.sleep(0.5)
        now = sum(map(tree_cpu_seconds, pids))
        quiet = quiet + 1 if now - before < 0.05 else 0  # under a tenth of a core over the half second
        before = now
    return time.monotonic() - started


def p(latencies: List[float], q: int) -> float:
    """The q-th percentile, in ms."""
    return statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000


def run_backend(url: str, args, log_bodies: List[bytes], phases: List[List[bytes]],
                database_pids: List[int]) -> Tuple[float, float]:
    port = free_port()
    with ServerProcess(url, port) as collector:
        post_timed(port, log_bodies, 1000)
        post_timed(port, phases[0][:20], PER_BATCH)  # warm-up: pools, caches
        samples: Dict[str, List[float]] = {"without": [], "stalled": []}
        seen: Dict[str, int] = {}
        settled: List[float] = []
        for round_no in range(args.rounds):
            order = ("without", "stalled") if round_no % 2 == 0 else ("stalled", "without")
            for i, phase in enumerate(order):
                bodies = phases[1 + 2 * round_no + i]
                if phase == "without":
                    samples[phase] += post_timed(port, bodies, PER_BATCH)
                    continue
                sockets, statuses = stall_exports(port, args.stalled)
                if statuses.get("200", 0) == 0:
                    raise RuntimeError(f"no export was served to stall (answers: {statuses})")
                try:
                    settled.append(settle([collector.process.pid, *database_pids]))
                    samples[phase] += post_timed(port, bodies, PER_BATCH)
                finally:
                    for sock in sockets:
                        sock.close()
                for status, n in statuses.items():
                    seen[status] = seen.get(status, 0) + n
                time.sleep(1)  # the collector sees the clients go and closes their exports
    for phase, latencies in samples.items():
        print(f"    {phase:8s}: {len(latencies)} batches, p50 {p(latencies, 50):6.1f} ms, "
              f"p99 {p(latencies, 99):6.1f} ms")
    print(f"    exports answered (all rounds): {seen}; stalled (the collector idle) after "
          f"{', '.join(f'{s:.1f}' for s in settled)} s")
    ratio = p(samples["stalled"], 99) / p(samples["without"], 99)
    return ratio, p(samples["without"], 99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stalled", type=int, default=20, help="stalled exports (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="without + stalled phases (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=300, help="ingest batches per phase (default: %(default)s)")
    parser.add_argument("--log", type=int, default=20_000, help="decisions stored first (default: %(default)s)")
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    log_bodies = list(workload.decision_batches(args.log // 1000, 1000, seed=5))
    phases = [list(workload.decision_batches(args.batches, PER_BATCH, seed=11 + n)) for n in range(1 + 2 * args.rounds)]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; log of {args.log:,} decisions; "
          f"{args.rounds} rounds x {args.batches} batches of {PER_BATCH} decision events per phase; "
          f"{args.stalled} stalled CSV exports")
    results = {}
    cluster = None
    workdir = tempfile.mkdtemp(prefix="routelens-bench-starvation-")
    try:
        for backend in backends:
            print(f"  {backend}:")
            if backend == "sqlite":
                url = f"sqlite:///{os.path.join(workdir, 'collector.db')}"
            elif backend == "postgres":
                from tests.support.postgres import PostgresCluster

                cluster = PostgresCluster(fsync=True).start()
                url = cluster.url(cluster.create_database("starvation"))
                db.upgrade(url)
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            results[backend] = run_backend(url, args, log_bodies, phases,
                                           [cluster.postmaster_pid()] if backend == "postgres" else [])
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir)
    print()
    for backend, (ratio, baseline) in results.items():
        print(f"  {backend:8s}: ingest p99 with {args.stalled} stalled exports / without: {ratio:.2f} "
              f"(without: {baseline:.1f} ms)   target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
