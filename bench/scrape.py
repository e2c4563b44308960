"""Scrape time of /metrics against the size of the database: a collector on
1,000,000 decisions and one on 10,000,000 (50 replicas, 7 days, the
databases of bench/queries.py, loaded through the real write path and kept
for reruns), scraped in turn, in the same run. The routing KPIs are counted
at ingest, so a scrape reads memory only: the ratio 10M / 1M is the figure,
target <= 1.1 (independent of the size).

Each collector (`routelens collector`, a `ServerProcess`, one worker) first
stores a few batches of the same deployment's traffic, so that every series
a busy collector exports (50 replicas, histograms, sources) exists; then the
two are scraped alternately, `--scrapes` times each (so that the machine's
noise falls on both alike), and the median and p90 of each are printed with
the number of series. For contrast, in the same run: what the previous
/metrics read from the database at every scrape (each source's counters and
lost batches, `figures.sources_in`), timed on each database.

    .venv/bin/python bench/scrape.py [--small 1000000] [--large 10000000] [--scrapes 300]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import queries  # noqa: E402
import workload  # noqa: E402

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from routelens.collector.query import figures  # noqa: E402
from routelens.collector.store.db import make_engine  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TARGET = 1.1


def warm(collector: ServerProcess, end: float) -> None:
    """A few batches of the deployment's requests and stats, from two more routers, at the data's end."""
    replicas = workload.replica_ids(queries.REPLICAS)
    connection = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=60)
    for index in range(queries.SOURCES):
        traffic = workload.Traffic(replicas, seed=900 + index)
        source = workload.source_info(100 + index)  # new routers of the deployment
        for seq in range(1, 4):
            events = traffic.collect_stats(end) if seq == 1 else []
            for k in range(300):
                events.extend(traffic.request(end + k * 0.01)[1])
            body = workload.body(source, seq, events, compress=True)
            connection.request("POST", "/v1/events", body=body,
                               headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"warm-up batch refused: {response.status} {answer[:200]!r}")
    connection.close()


def scrape(connection: http.client.HTTPConnection) -> Tuple[float, bytes]:
    started = time.perf_counter()
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"/metrics answered {response.status}")
    return elapsed, body


def series(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def old_scrape_read_ms(path: str, runs: int = 7) -> float:
    """What the previous /metrics read from the database at each scrape, median ms."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                figures.sources_in(connection)
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1_000_000, help="decisions of the small database")
    parser.add_argument("--large", type=int, default=queries.FULL, help="decisions of the large database")
    parser.add_argument("--scrapes", type=int, default=300, help="scrapes of each collector")
    parser.add_argument("--db-dir", default="/tmp/routelens-bench-scrape",
                        help="where the databases are kept, for reruns (default: %(default)s)")
    args = parser.parse_args()
    sizes = (args.small, args.large)
    os.makedirs(args.db_dir, exist_ok=True)
    paths = []
    for decisions in sizes:
        path, info = queries.database(decisions, os.path.join(args.db_dir, f"routelens-bench-queries-{decisions}.db"))
        paths.append((path, info))
    print(f"machine: {os.cpu_count()} cores; databases of {args.small:,} and {args.large:,} decisions, "
          f"{queries.REPLICAS} replicas, {queries.DAYS} days")
    collectors: List[ServerProcess] = []
    try:
        for path, info in paths:
            started = time.perf_counter()
            collector = ServerProcess(f"sqlite:///{path}", free_port()).start(timeout_s=300)
            print(f"  {info['decisions']:>12,} decisions: collector up in {time.perf_counter() - started:.1f} s "
                  f"(members read once, at start)")
            collectors.append(collector)
            warm(collector, info["end"])
        connections = [http.client.HTTPConnection("127.0.0.1", c.port, timeout=60) for c in collectors]
        for connection in connections:  # the first scrape of each, untimed
            scrape(connection)
        times: List[List[float]] = [[] for _ in collectors]
        bodies: List[bytes] = [b"" for _ in collectors]
        for _ in range(args.scrapes):
            for index, connection in enumerate(connections):
                elapsed, bodies[index] = scrape(connection)
                times[index].append(elapsed * 1000)
        for connection in connections:
            connection.close()
    finally:
        for collector in collectors:
            collector.stop()
    print(f"/metrics, {args.scrapes} scrapes of each collector, alternately (ms):")
    medians = []
    for decisions, samples, body in zip(sizes, times, bodies):
        samples.sort()
        median = statistics.median(samples)
        medians.append(median)
        print(f"  {decisions:>12,} decisions: median {median:6.2f}  p90 {samples[int(len(samples) * 0.9)]:6.2f}  "
              f"({series(body):,} series, {len(body) / 1024:.0f} KiB)")
    ratio = medians[1] / medians[0]
    print(f"ratio {args.large:,} / {args.small:,}: {ratio:.2f}; target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'}")
    print("for contrast, the database read the previous /metrics made at every scrape (figures.sources_in), "
          "median of 7 (ms):")
    for decisions, (path, _info) in zip(sizes, paths):
        print(f"  {decisions:>12,} decisions: {old_scrape_read_ms(path):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
