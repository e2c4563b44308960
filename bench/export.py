"""Export speed and memory: 10,000,000 decisions to Parquet (SQLite).

Runs `routelens export --format parquet` (the real command, in a child
process) over the database `bench/queries.py` builds (10 million decisions
over 50 replicas and 7 days, loaded once and cached in /tmp), and prints
its rows/s (target >= 200,000) and its peak memory (target <= 300 MB RSS), that of
its processes together (it reads SQLite in a process of its own), sampled.

Machines are shared and noisy: as a baseline measured in the same run, a
child process reads the same rows with the same query through the sqlite3
module and discards them; the export's time is also given as a ratio to it
(what turning rows into Parquet costs on top of reading them).

    .venv/bin/python bench/export.py [--decisions 10000000] [--what decisions] [--keep FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import pyarrow.parquet as pq  # noqa: E402
from queries import FULL, database  # noqa: E402

TARGET_ROWS_S = 200_000
TARGET_RSS_MB = 300

# The rows the export reads (decisions, the routed event naming each, its completion) as one SQL join,
# read and thrown away.
RAW_READ = textwrap.dedent("""
    import sqlite3, sys
    connection = sqlite3.connect(sys.argv[1])
    cursor = connection.execute(
        "SELECT d.id, d.ts, d.router_pk, d.source_pk, d.request_id, d.internal_request_id, d.model_id, d.attempt, "
        "d.duration_us, d.n_candidates, d.ranking, r.replica_pk, r.rank, r.own_ranking, r.queue_wait_ms, "
        "c.latency_ms, c.ok, c.rejected FROM decisions d LEFT JOIN routed r ON r.decision_id = d.id "
        "LEFT JOIN completed c ON c.routed_id = r.id ORDER BY d.id")
    rows = 0
    while True:
        chunk = cursor.fetchmany(10000)
        if not chunk:
            break
        rows += len(chunk)
    print(rows)
""")


def _tree(pid: int) -> List[int]:
    """The process and its descendants (Linux /proc)."""
    pids, at = [pid], 0
    while at < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[at]}/task"):
                with open(f"/proc/{pids[at]}/task/{task}/children") as children:
                    pids.extend(int(child) for child in children.read().split())
        except OSError:  # it ended meanwhile
            pass
        at += 1
    return pids


def _proc_kib(path: str, field: str) -> int:
    """One "Field:  N kB" line of a /proc file, KiB; 0 once the process has ended."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field)), 0)
    except (OSError, ValueError):
        return 0


def run_child(command) -> Tuple[float, float, float, str]:
    """(seconds, peak RSS in MB, peak PSS in MB, stdout) of a child process
    and all of its descendants together (the export reads SQLite in a
    process of its own). RSS is sampled every 20 ms from /proc/PID/status,
    which reads counters; PSS (each shared page divided among the processes
    that map it) every 0.5 s from smaps_rollup, which walks every mapping
    under the process's memory lock: at 50 Hz that slowed the export by
    10-20%."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        tick = 0
        while not done.wait(0.02):
            pids = _tree(process.pid)
            peaks[0] = max(peaks[0], sum(_proc_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids))
            if tick % 25 == 0:
                peaks[1] = max(peaks[1], sum(_proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids))
            tick += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{command[2:4]} failed:\n{stderr}")
    return seconds, peaks[0] / 1024, peaks[1] / 1024, stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=FULL)
    parser.add_argument("--what", default="decisions", choices=("decisions", "candidates", "routed", "completed"))
    parser.add_argument("--keep", help="keep the Parquet file here (default: a temporary file, removed)")
    args = parser.parse_args()
    path, info = database(args.decisions)
    out = args.keep or os.path.join(tempfile.mkdtemp(prefix="routelens-bench-export-"), "export.parquet")

    seconds, rss_mb, pss_mb, _ = run_child([sys.executable, "-m", "routelens.collector.cli", "export", "--db", f"sqlite:///{path}",
                                    "--what", args.what, "--format", "parquet", "-o", out])
    rows = pq.read_metadata(out).num_rows
    size_mb = os.path.getsize(out) / 1e6
    raw_seconds, _, _, raw_out = run_child([sys.executable, "-c", RAW_READ, path])
    if not args.keep:
        os.unlink(out)

    rate = rows / seconds
    print(f"export --what {args.what} --format parquet: {rows:,} rows in {seconds:.1f} s: {rate:,.0f} rows/s "
          f"(target >= {TARGET_ROWS_S:,}: {'met' if rate >= TARGET_ROWS_S else 'NOT met'}); "
          f"peak RSS {rss_mb:.0f} MB (target <= {TARGET_RSS_MB}: {'met' if rss_mb <= TARGET_RSS_MB else 'NOT met'}; "
          f"PSS {pss_mb:.0f} MB; the export's processes together); "
          f"file {size_mb:.0f} MB ({size_mb * 1e6 / max(rows, 1):.0f} bytes/row)")
    if args.what == "decisions":
        raw_rows = int(raw_out.strip())
        print(f"baseline, the same rows read through sqlite3 and thrown away: {raw_rows:,} rows in "
              f"{raw_seconds:.1f} s ({raw_rows / raw_seconds:,.0f} rows/s); export / read time: "
              f"{seconds / raw_seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
