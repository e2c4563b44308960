"""Ingest throughput: decision events/s over HTTP into SQLite and PostgreSQL,
next to raw `executemany` of the same rows into the same kind of database,
measured in the same run. The machines are shared and noisy: the ratio
HTTP / raw is the figure that travels.

What is measured, per round and backend:

- raw: the decision rows exactly as the collector stores them (built by
  `collector.ingest.writer` from the same batches, before timing), inserted with
  the driver's `executemany`, one transaction per 1000 rows, into a fresh
  database migrated to the collector's schema (so the same table, keys and
  pragmas). No validation, no rollups, no HTTP: the bound.
- http: the real collector (`routelens collector --db URL --workers N`, a
  `ServerProcess`, uvicorn; N worker processes, by default one per core) in a
  subprocess on a fresh database; pre-built gzip'd wire-format batches of
  1000 decision events each (pow-2 shape: 2 candidates out of 50 replicas,
  uuid4 request ids, stats dicts; see bench/workload.py) POSTed by
  `--senders` threads over keep-alive `http.client` connections. Each sender
  is one traced router (a source of its own) sending its batches one after
  the other, as the tracer's exporter does. With several workers the
  senders' connections are spread evenly over them, as a load balancer or a
  cluster's many sources would (the kernel alone may hand both of two
  connections to one worker). On PostgreSQL the warm-up's tables are then
  analyzed, as autovacuum would have done in a collector running for a
  minute (`analyze_postgres`). The clock runs from the first request to the
  last answer; every answer must report 1000 stored, and the database is
  counted afterwards. CPU is counted for the collector's processes together.
- http without KPIs: the same, with the collector started with
  `--no-routing-metrics` (the routing KPIs of /metrics not counted at
  ingest). With them / without them is the cost of counting them, target
  >= 0.95. `--traffic requests` sends whole requests (decision, routed,
  completed; a few refusals and hand-offs, bench/workload.py) in batches of
  about 1000 events, which the per-replica KPIs count too. With
  `--prefix-groups N` (requests only) the deployment is an LLM one, routed by
  the traced prefix-aware router: every decision carries its prompt's prefix
  group (one of N) and length, and its reason and scores (wire format v3,
  `workload.Traffic`), so that ingest also fills `prefix_rollups` for each
  routed request and counts the reasons. Against a run without it, the cost
  of an LLM deployment's traffic.

    .venv/bin/python bench/ingest.py [--batches 150] [--senders 2] [--workers 2] [--rounds 3]
                                     [--backends sqlite,postgres] [--pg-fsync on|off]
                                     [--traffic decisions|requests] [--prefix-groups 100]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import psycopg  # noqa: E402
import workload  # noqa: E402

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from routelens.collector.ingest.schema import parse  # noqa: E402
from routelens.collector.ingest.writer import _Rows  # noqa: E402  (the rows exactly as ingest builds them)
from routelens.collector.store import db  # noqa: E402
from routelens.collector.store.models import decisions  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.workers import children, connection_to_each, worker_pids  # noqa: E402

TARGET = 50_000
KPI_TARGET = 0.95  # ingest with the routing KPIs counted / without them
PER_BATCH = 1000
HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}


# --- raw executemany ---

def request_batches(n_batches: int, seed: int, prefix_groups: int = 0) -> List[bytes]:
    """Bodies of whole requests (about PER_BATCH events each), one source, in time order;
    with `prefix_groups`, an LLM deployment's (see `workload.Traffic`)."""
    traffic = workload.Traffic(workload.replica_ids(50), seed, prefix_groups=prefix_groups)
    version = 3 if prefix_groups else 2  # reasons are v3's
    source = workload.source_info(seed)
    ts = time.time() - n_batches * 3
    out = [workload.body(source, 1, [traffic.membership(ts)], compress=True, schema_version=version)]
    for seq in range(2, n_batches + 1):
        events = traffic.collect_stats(ts) if seq % 10 == 0 else []
        while len(events) < PER_BATCH:
            ts += 0.001
            events.extend(traffic.request(ts)[1])
        out.append(workload.body(source, seq, events, compress=True, schema_version=version))
    return out


def events_in(body: bytes) -> int:
    return len(json.loads(gzip.decompress(body))["events"])


def decisions_in(body: bytes) -> int:
    return sum(event["type"] == "decision" for event in json.loads(gzip.decompress(body))["events"])


def decision_rows(bodies: List[bytes]) -> List[List[tuple]]:
    """The `decisions` rows of each batch, as the collector would store them."""
    replica_pks = {replica_id: pk for pk, replica_id in enumerate(workload.replica_ids(50), start=1)}
    out = []
    for body in bodies:
        valid = parse(gzip.decompress(body), 100_000)
        out.append(_Rows(valid, source_pk=1, router_pk=1, replica_pks=replica_pks).of(decisions))
    return out


def insert_sql(mark: str) -> str:
    names = ", ".join(decisions.c.keys())
    return f"INSERT INTO decisions ({names}) VALUES ({', '.join([mark] * len(decisions.c))})"


def raw_sqlite(path: str, batches: List[List[tuple]]) -> float:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)  # the collector's pragmas: WAL, synchronous=NORMAL, cache size
    connection = engine.raw_connection()
    sql = insert_sql("?")
    try:
        started = time.perf_counter()
        for rows in batches:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(sql, rows)
            connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()
        engine.dispose()


def raw_postgres(url: str, batches: List[List[tuple]]) -> float:
    db.upgrade(url)
    sql = insert_sql("%s")
    with psycopg.connect(url) as connection:
        with connection.cursor() as cursor:
            started = time.perf_counter()
            for rows in batches:
                with connection.transaction():
                    cursor.executemany(sql, rows)
            return time.perf_counter() - started


# --- the collector over HTTP ---

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the processes it started (a PostgreSQL
    server's postmaster and backends; a collector's supervisor and workers)."""
    total = process_cpu_seconds(pid)
    for child in children(pid):
        try:
            total += process_cpu_seconds(child)
        except OSError:  # gone meanwhile
            continue
    return total


def open_connections(collector: ServerProcess, count: int) -> List[http.client.HTTPConnection]:
    """`count` keep-alive connections to the collector, spread evenly over its workers."""
    pids = worker_pids(collector.process.pid)
    if not pids:  # one process
        connections = [http.client.HTTPConnection("127.0.0.1", collector.port, timeout=120) for _ in range(count)]
        for connection in connections:
            connection.connect()
        return connections
    connections = []
    while len(connections) < count:
        connections.extend(connection_to_each(collector.port, pids).values())
    for extra in connections[count:]:
        extra.close()
    return connections[:count]


def post_all(collector: ServerProcess, streams: List[List[bytes]], sizes: Dict[bytes, int]) -> float:
    """POST each stream's bodies in order, the streams concurrently (one
    connection each); seconds from the first request to the last answer.
    `sizes`: the events of each body, each to be stored."""
    failures: List[str] = []
    ready = threading.Barrier(len(streams) + 1)
    connections = open_connections(collector, len(streams))

    def sender(connection: http.client.HTTPConnection, bodies: List[bytes]) -> None:
        ready.wait()
        for index, body in enumerate(bodies):
            connection.request("POST", "/v1/events", body=body, headers=HEADERS)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200 or json.loads(answer).get("stored") != sizes[body]:
                failures.append(f"batch {index}: {response.status} {answer[:200]!r}")

    threads = [threading.Thread(target=sender, args=pair) for pair in zip(connections, streams)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    if failures:
        raise RuntimeError(f"{len(failures)} batches failed, first: {failures[0]}")
    return elapsed


def http_run(url: str, workers: int, warmup: List[List[bytes]], streams: List[List[bytes]],
             sizes: Dict[bytes, int], count: Callable[[], int], postmaster: Optional[int] = None,
             kpis: bool = True) -> Tuple[float, Dict[str, float]]:
    """Seconds to ingest the streams over HTTP (after their warm-up batches),
    and the CPU seconds the collector, PostgreSQL and this load generator spent meanwhile."""
    args = ("--workers", str(workers)) + (() if kpis else ("--no-routing-metrics",))
    collector = ServerProcess(url, free_port(), args=args).start()

    def cpu_now() -> Dict[str, float]:
        now = {"collector": tree_cpu_seconds(collector.process.pid)}
        if postmaster is not None:
            now["postgres"] = tree_cpu_seconds(postmaster)
        now["load generator"] = time.process_time()
        return now

    try:
        post_all(collector, warmup, sizes)  # sources, replicas, pools and caches: not timed
        if url.startswith("postgresql"):
            analyze_postgres(url)
        before = cpu_now()
        elapsed = post_all(collector, streams, sizes)
        cpu = {name: seconds - before[name] for name, seconds in cpu_now().items()}
    finally:
        collector.stop()
    stored = count()
    expected = sum(decisions_in(body) for bodies in warmup + streams for body in bodies)
    if stored != expected:
        raise RuntimeError(f"the database holds {stored} decisions, expected {expected}")
    return elapsed, cpu


def analyze_postgres(url: str) -> None:
    """Statistics of the warm-up's tables, as autovacuum keeps them for a running collector. A run
    is over before autovacuum's first look (a minute): on tables never analyzed the planner guesses,
    and the statement that pairs routed requests with their decisions (prefix rollups, LLM traffic)
    scans every decision stored, so that a batch costs more the more came before it. Analyzed, it
    may still scan them while the table is this small (tens of thousands of rows): with
    `--prefix-groups`, PostgreSQL's figure depends on `--batches`."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("ANALYZE")


def count_sqlite(path: str) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT count(*) FROM decisions").fetchone()[0]


def count_postgres(url: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT count(*) FROM decisions").fetchone()[0]


# --- main ---

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=150, help="timed batches of 1000 events per run")
    parser.add_argument("--senders", type=int, default=2,
                        help="concurrent HTTP senders, one traced router each (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="the collector's worker processes (default: one per core, %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="raw, http and http without KPIs per backend (default: %(default)s)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on",
                        help="PostgreSQL fsync and synchronous_commit (default: %(default)s)")
    parser.add_argument("--traffic", choices=("decisions", "requests"), default="decisions",
                        help="decision events only (default), or whole requests: decision, routed, completed")
    parser.add_argument("--prefix-groups", type=int, default=0, metavar="N",
                        help="with --traffic requests: an LLM deployment's, each decision in one of N prefix groups")
    args = parser.parse_args()
    if args.prefix_groups < 0:
        parser.error("--prefix-groups must be 0 or more")
    if args.prefix_groups and args.traffic != "requests":
        parser.error("--prefix-groups needs --traffic requests")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    traffic = args.traffic + (f", {args.prefix_groups} prefix groups" if args.prefix_groups else "")
    print(f"machine: {os.cpu_count()} cores; {args.batches} timed batches of {PER_BATCH} events ({traffic}), "
          f"{args.senders} sender(s), collector with {args.workers} worker(s), {args.rounds} round(s)")
    started = time.perf_counter()
    # One stream of batches per sender (a traced router: its own source), 5 of them sent untimed first.
    per_sender = -(-args.batches // args.senders)
    warmup, streams = [], []
    for sender in range(args.senders):
        if args.traffic == "decisions":
            batches = list(workload.decision_batches(5 + per_sender, PER_BATCH, seed=7 + sender))
        else:
            batches = request_batches(5 + per_sender, seed=7 + sender, prefix_groups=args.prefix_groups)
        warmup.append(batches[:5])
        streams.append(batches[5:])
    bodies = [body for stream in streams for body in stream]
    sizes = {body: events_in(body) for stream in warmup + streams for body in stream}
    rows = decision_rows(bodies)
    size = sum(len(b) for b in bodies) / len(bodies)
    raw_size = sum(len(gzip.decompress(b)) for b in bodies[:5]) / 5
    print(f"built in {time.perf_counter() - started:.1f} s: {size / 1024:.0f} KiB gzip'd per batch "
          f"({raw_size / 1024:.0f} KiB of JSON, {raw_size / PER_BATCH:.0f} bytes per event)")
    total = sum(len(batch) for batch in rows)  # decisions timed

    results: Dict[str, Dict[str, list]] = {b: {"raw": [], "http": [], "ratio": [], "off": [], "kpi": []}
                                           for b in backends}
    cluster = None
    if "postgres" in backends:
        from tests.support.postgres import PostgresCluster

        cluster = PostgresCluster(fsync=args.pg_fsync == "on").start()
        print(f"postgres: throwaway cluster on port {cluster.port}, fsync={args.pg_fsync}, "
              f"synchronous_commit={args.pg_fsync}")
    print("sqlite: WAL, synchronous=NORMAL (the collector's settings)")
    workdir = tempfile.mkdtemp(prefix="routelens-bench-ingest-")
    try:
        for round_no in range(1, args.rounds + 1):
            for backend in backends:
                runs = {}
                # With and without the KPIs one after the other, in turns, so that drift falls on both alike.
                for kpis in ((True, False) if round_no % 2 else (False, True)):
                    name = f"http{round_no}{'' if kpis else '-off'}"
                    if backend == "sqlite":
                        path = os.path.join(workdir, f"{name}.db")
                        runs[kpis] = http_run(f"sqlite:///{path}", args.workers, warmup, streams, sizes,
                                              lambda: count_sqlite(path), kpis=kpis)
                    elif backend == "postgres":
                        url = cluster.url(cluster.create_database(name.replace("-", "_")))
                        db.upgrade(url)
                        runs[kpis] = http_run(url, args.workers, warmup, streams, sizes,
                                              lambda: count_postgres(url), cluster.postmaster_pid(), kpis=kpis)
                    else:
                        raise SystemExit(f"unknown backend {backend!r}")
                if backend == "sqlite":
                    raw_s = raw_sqlite(os.path.join(workdir, f"raw{round_no}.db"), rows)
                else:
                    raw_s = raw_postgres(cluster.url(cluster.create_database(f"raw{round_no}")), rows)
                (http_s, cpu), (off_s, _cpu_off) = runs[True], runs[False]
                result = results[backend]
                result["raw"].append(total / raw_s)
                result["http"].append(total / http_s)
                result["ratio"].append(raw_s / http_s)
                result["off"].append(total / off_s)
                result["kpi"].append(off_s / http_s)
                print(f"round {round_no} {backend:8s}: raw executemany {total / raw_s:9,.0f}/s   "
                      f"http {total / http_s:9,.0f}/s   without KPIs {total / off_s:9,.0f}/s   "
                      f"with/without {off_s / http_s:.3f}   http/raw {raw_s / http_s:.2f}   CPU per decision: "
                      + ", ".join(f"{name} {seconds / total * 1e6:.1f} us ({seconds / http_s:.2f} cores)"
                                  for name, seconds in cpu.items()), flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)

    print()
    print(f"decisions/s, median of rounds (ratios: medians of the rounds' ratios); "
          f"collector with {args.workers} worker(s) on {os.cpu_count()} cores; {traffic}")
    for backend in backends:
        result = results[backend]
        http_rate = statistics.median(result["http"])
        raw_rate = statistics.median(result["raw"])
        kpi = statistics.median(result["kpi"])
        print(f"  {backend:8s}: http {http_rate:9,.0f}/s ({args.workers} workers)   "
              f"without KPIs {statistics.median(result['off']):9,.0f}/s   "
              f"with/without KPIs {kpi:.3f} (rounds {min(result['kpi']):.3f}-{max(result['kpi']):.3f}; target >= "
              f"{KPI_TARGET}: {'met' if kpi >= KPI_TARGET else 'NOT met'})   "
              f"raw executemany {raw_rate:9,.0f}/s   http/raw {statistics.median(result['ratio']):.2f}   "
              f"target >= {TARGET:,}/s: {'met' if http_rate >= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
