"""Panel query times and bytes on disk per decision, on a week of a busy deployment (SQLite).

Loads `--decisions` (default 10,000,000) decisions over 50 replicas and 7
days, with everything a traced router sends alongside them (see below),
through the collector's real write path: wire-format batches validated by
`collector.ingest.schema.parse` and stored by `collector.ingest.writer.Ingestor` (in
process, one transaction per batch, rollups maintained on the way). The
loaded database is kept (`--db`, by default under /tmp, named after the
number of decisions) with a description next to it, so that reruns skip
loading (one loaded at an older schema is migrated to the current one, as
`routelens db upgrade` does); `--reload` loads again. With
`--prefix-groups N` the deployment is an LLM one, routed by the traced
prefix-aware router: every decision carries its prompt's prefix group (one
of N) and length, and its reason (`workload.Traffic`), which the
prefix-affinity query reads (from `prefix_rollups`, raw rows at a window's
edges); without, it finds no group.

Then prints, for windows of 15 min, 24 h and 7 d ending where the data ends,
the median time of `--runs` runs of each panel query (the query layer the
API and the dashboard call: `collector.query.figures` summary, distribution,
staleness, rank_hits, timeseries, `collector.query.explore.decisions_page`,
and `collector.query.prefixes.prefix_affinity`), target <= 100 ms; and
the bytes on disk per decision: the `decisions` table with its indexes
(SQLite's dbstat), and the whole file, target <= 150.

Machines are shared and noisy: as a baseline measured in the same run, each
query's time is also given as a ratio to a fixed piece of SQLite work that
does not depend on the data (counting to 100,000 in a recursive CTE, about
20 ms on an idle machine): the speed of the machine at the time.

    .venv/bin/python bench/queries.py [--decisions 10000000] [--db PATH] [--runs 7] [--reload] [--prefix-groups 100]
    .venv/bin/python bench/queries.py --decisions 200000     # a small run: about a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sqlite3
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import workload  # noqa: E402

from routelens.collector.cli.gc_tuning import tune_gc_for_bulk_work  # noqa: E402
from routelens.collector.ingest.schema import parse  # noqa: E402
from routelens.collector.ingest.writer import Ingestor  # noqa: E402
from routelens.collector.query import explore, figures, prefixes  # noqa: E402
from routelens.collector.query.filters import Filters  # noqa: E402
from routelens.collector.store.db import current_revision, head_revision, make_engine, upgrade  # noqa: E402

DAY = 86400.0
WINDOWS = (("15 min", 900.0), ("24 h", DAY), ("7 d", 7 * DAY))
TARGET_MS = 100.0
TARGET_BYTES = 150.0
EVENTS_PER_BATCH = 1000  # the tracer's default batch_max_events
SOURCES = 2  # traced routers of the deployment (say, two proxies)
REPLICAS = 50
DAYS = 7
FORMAT = 3  # of the description file: a change of the load's shape reloads (of the schema: `database` upgrades)
FULL = 10_000_000  # decisions of the full run
BASELINE_SQL = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT sum(x) FROM c"


def stats_period(decisions: int) -> float:
    """Seconds between two collections of a replica's routing stats: Ray's
    default period (10 s) for the full run; proportionally longer for a
    smaller one, so that stats events stay in proportion to decisions."""
    return workload.STATS_PERIOD_S * max(1.0, FULL / decisions)


# --- loading ---

def produce(decisions: int, prefix_groups: int, start: float, span: float, out: multiprocessing.Queue) -> None:
    """Runs in a child process: every batch body, in time order, then None.

    SOURCES traced routers share the deployment's requests, one in turn;
    each emits a `replicas` event at start and a `stats` event per replica
    every stats period (stamped stats change at every collection), and
    batches of EVENTS_PER_BATCH events, as the tracer's exporter does."""
    period = stats_period(decisions)
    replicas = workload.replica_ids(REPLICAS)
    traffic = [workload.Traffic(replicas, seed=100 + i, prefix_groups=prefix_groups) for i in range(SOURCES)]
    version = 3 if prefix_groups else 2  # reasons are v3's
    infos = [workload.source_info(i) for i in range(SOURCES)]
    pending: List[list] = [[t.membership(start)] for t in traffic]
    seqs = [0] * SOURCES
    next_stats = [start + i * 0.37 for i in range(SOURCES)]
    # Requests are evenly spaced; a few are decided twice (rejections), counted in.
    per_decision = 1.0 + traffic[0].rejection_rate
    step = span * per_decision / decisions
    made = 0
    request = 0
    counts = {"decision": 0, "routed": 0, "completed": 0, "stats": 0, "replicas": SOURCES}
    while made < decisions:
        ts = start + request * step
        i = request % SOURCES
        request += 1
        events = pending[i]
        while next_stats[i] <= ts:
            events.extend(traffic[i].collect_stats(next_stats[i]))
            counts["stats"] += REPLICAS
            next_stats[i] += period
        n, request_events = traffic[i].request(ts)
        if made + n > decisions:  # exactly `decisions`: leave out a last retried request
            continue
        made += n
        events.extend(request_events)
        for event in request_events:
            counts[event["type"]] += 1
        if len(events) >= EVENTS_PER_BATCH:
            seqs[i] += 1
            out.put(workload.body(infos[i], seqs[i], events, schema_version=version))
            pending[i] = []
    for i, events in enumerate(pending):
        if events:
            seqs[i] += 1
            out.put(workload.body(infos[i], seqs[i], events, schema_version=version))
    out.put(None)
    out.put(counts)


def load(path: str, decisions: int, prefix_groups: int) -> dict:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    ingestor = Ingestor(engine)
    # Whole hours, ending an hour ago, so that every window is covered by rollups in full.
    end = (time.time() // 3600 - 1) * 3600
    start = end - DAYS * DAY
    queue: multiprocessing.Queue = multiprocessing.Queue(maxsize=64)
    producer = multiprocessing.Process(target=produce, args=(decisions, prefix_groups, start, DAYS * DAY, queue),
                                       daemon=True)
    producer.start()
    tune_gc_for_bulk_work()  # as the collector's server does
    print(f"loading {decisions:,} decisions into {path} (producer process: wire-format batches; "
          "this process: schema.parse + Ingestor.ingest)", flush=True)
    started = time.perf_counter()
    batches = events = 0
    last_report = started
    while True:
        body = queue.get()
        if body is None:
            break
        result = ingestor.ingest(parse(body, 100_000))
        batches += 1
        events += result.stored
        now = time.perf_counter()
        if now - last_report >= 15:
            last_report = now
            done = ingestor_decisions(engine)
            rate = done / (now - started)
            print(f"  {done:,} decisions ({done / decisions:.0%}), {events:,} events, {batches:,} batches, "
                  f"{rate:,.0f} decisions/s, about {(decisions - done) / max(rate, 1):.0f} s to go", flush=True)
    counts = queue.get()
    producer.join()
    seconds = time.perf_counter() - started
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    print(f"loaded in {seconds:.0f} s: {events:,} events in {batches:,} batches "
          f"({events / seconds:,.0f} events/s, {decisions / seconds:,.0f} decisions/s)", flush=True)
    return {"format": FORMAT, "decisions": decisions, "prefix_groups": prefix_groups, "start": start, "end": end,
            "events": counts, "batches": batches, "sources": SOURCES, "replicas": REPLICAS,
            "load_seconds": round(seconds), "complete": True}


def ingestor_decisions(engine) -> int:
    with engine.connect() as connection:
        return connection.exec_driver_sql("SELECT sum(decisions) FROM rollups WHERE grain = 3600 "
                                          "AND replica_pk = 0").scalar() or 0


# --- measuring ---

def timed(function: Callable[[], object], runs: int) -> float:
    """Median wall time of `runs` calls, in ms."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def sizes(path: str, decisions: int) -> Tuple[float, float, Dict[str, int]]:
    with sqlite3.connect(path) as connection:
        try:
            by_name = dict(connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
        except sqlite3.OperationalError:  # no dbstat: page counts of the tables can't be had, the file can
            by_name = {}
        table_and_indexes = connection.execute(
            "SELECT name FROM sqlite_schema WHERE tbl_name = 'decisions'").fetchall()
    decisions_bytes = sum(by_name.get(name, 0) for (name,) in table_and_indexes) if by_name else float("nan")
    return decisions_bytes / decisions, os.path.getsize(path) / decisions, by_name


def database(decisions: int, prefix_groups: int, path: Optional[str] = None,
             reload: bool = False) -> Tuple[str, dict]:
    """The benchmark database of `decisions` decisions (path, description), loaded unless it is there already."""
    path = path or f"/tmp/routelens-bench-queries-{decisions}{f'-prefix{prefix_groups}' if prefix_groups else ''}.db"
    described = path + ".json"
    info = None
    if not reload and os.path.exists(path) and os.path.exists(described):
        with open(described) as f:
            info = json.load(f)
        if not (info.get("complete") and info.get("decisions") == decisions and info.get("format") == FORMAT
                and info.get("prefix_groups", 0) == prefix_groups):
            info = None
    if info is None:
        if os.path.exists(described):
            os.unlink(described)
        info = load(path, decisions, prefix_groups)
        with open(described, "w") as f:
            json.dump(info, f, indent=1)
    else:
        print(f"using {path}, loaded before (in {info['load_seconds']} s; --reload to load again)")
        bring_to_current_schema(path)
    return path, info


def bring_to_current_schema(path: str) -> None:
    """Migrate a database loaded at an older schema, as the load's `upgrade` would
    have made it: the migrations fill what they add from the rows stored, so
    a schema change costs a migration, not a reload."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    try:
        loaded_at = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    if loaded_at == head:
        return
    started = time.perf_counter()
    upgrade(url)
    print(f"upgraded its schema from revision {loaded_at} to {head} in {time.perf_counter() - started:.0f} s",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=FULL)
    parser.add_argument("--db", help="database file (default: /tmp/routelens-bench-queries-<decisions>[-prefix<N>].db)")
    parser.add_argument("--runs", type=int, default=7, help="runs per query; the median is shown")
    parser.add_argument("--reload", action="store_true", help="load again even if the database is there")
    parser.add_argument("--prefix-groups", type=int, default=0,
                        help="an LLM deployment's traffic: every decision in one of this many prefix groups")
    args = parser.parse_args()
    path, info = database(args.decisions, args.prefix_groups, args.db, args.reload)
    counts = info["events"]
    print(f"data: {info['decisions']:,} decisions over {info['replicas']} replicas and "
          f"{(info['end'] - info['start']) / DAY:.0f} days, from {info['sources']} traced routers of one "
          f"deployment{f', every decision in one of {args.prefix_groups} prefix groups' if args.prefix_groups else ''}"
          f"; with them {counts['routed']:,} routed, {counts['completed']:,} completed "
          f"(rejections included), {counts['stats']:,} stats (every replica's stats every "
          f"{stats_period(info['decisions']):g} s, as each router sees them) and {counts['replicas']} replicas "
          f"events; {info['batches']:,} batches of up to {EVENTS_PER_BATCH} events")

    engine = make_engine(f"sqlite:///{path}")
    gc.collect()
    end = info["end"]
    with engine.connect() as connection:
        baseline = timed(lambda: connection.exec_driver_sql(BASELINE_SQL).scalar(), args.runs)
        rollup_rows = connection.exec_driver_sql("SELECT count(*) FROM rollups").scalar()
        print(f"baseline (SQLite counting to 100,000): {baseline:.1f} ms; the rollups hold {rollup_rows:,} rows")
        print()
        panels = [
            ("summary", figures.summary),
            ("distribution", figures.distribution),
            ("staleness", figures.staleness),
            ("rank_hits", figures.rank_hits),
            ("timeseries", figures.timeseries),
            ("timeseries per replica", lambda c, f: figures.timeseries(c, f, per_replica=True)),
            ("decisions_page", explore.decisions_page),
            ("prefix_affinity", prefixes.prefix_affinity),
        ]
        header = "".join(f"{label:>22s}" for label, _ in WINDOWS)
        print(f"median of {args.runs} runs, ms (x baseline)          {header}")
        worst = 0.0
        for name, panel in panels:
            cells = []
            for _label, seconds in WINDOWS:
                f = Filters(since=end - seconds, until=end)
                ms = timed(lambda: panel(connection, f), args.runs)
                if name != "timeseries per replica":  # not a panel of the brief: shown for information
                    worst = max(worst, ms)
                cells.append(f"{ms:9.1f} ({ms / baseline:5.2f}x)")
            print(f"  {name:44s}" + "".join(f"{cell:>22s}" for cell in cells))
    engine.dispose()
    print(f"slowest panel query: {worst:.1f} ms; target <= {TARGET_MS:.0f} ms: "
          f"{'met' if worst <= TARGET_MS else 'NOT met'}")

    per_decision, file_per_decision, by_name = sizes(path, info["decisions"])
    print()
    print(f"bytes on disk per decision: decisions table with its indexes {per_decision:.1f} "
          f"(target <= {TARGET_BYTES:.0f}: {'met' if per_decision <= TARGET_BYTES else 'NOT met'}); "
          f"whole file {file_per_decision:.1f} ({os.path.getsize(path) / 2**20:,.0f} MiB)")
    if by_name:
        print("  by table and index, bytes per decision: " + ", ".join(
            f"{name} {size / info['decisions']:.1f}" for name, size in
            sorted(by_name.items(), key=lambda item: -item[1]) if size / info["decisions"] >= 0.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
