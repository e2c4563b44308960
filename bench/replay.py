"""Replay speed and memory (`routelens replay --mode decisions`), on bench/queries.py's database.

Replays the `--decisions` (default 1,000,000) recorded decisions of the
database `bench/queries.py` builds (pow-2 decisions over 50 replicas and
7 days, from 2 traced routers; loaded once and cached in /tmp, read here,
never written) through `--router` (default: Ray's pow-2), one run, and
prints decisions/s and memory: this process's resident set sampled as the
replay goes (flat: constant memory) and its peak, with the SQLite reader
process's peak.

Machines are shared and noisy: as a baseline measured in the same run, the
time the router's own `choose_replicas` took on the same inputs (timed
around each call) gives the decisions/s it manages alone; the replay's rate
is also given as a ratio to it (the issue's target: >= 0.5).

    .venv/bin/python bench/replay.py [--decisions 1000000] [--router module:Class] [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from queries import database  # noqa: E402

from routelens.collector.query.filters import Filters  # noqa: E402
from routelens.collector.replay import decisions  # noqa: E402
from routelens.collector.replay.spec import RouterSpec  # noqa: E402
from routelens.collector.store.db import make_engine  # noqa: E402

POW_2 = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"
TARGET_RATIO = 0.5


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--router", default=POW_2)
    parser.add_argument("--db", help="database file (default: bench/queries.py's, "
                                     "/tmp/routelens-bench-queries-<decisions>.db)")
    args = parser.parse_args()
    path, info = database(args.decisions, args.db)
    cls = RouterSpec.parse(args.router).load()
    chose = [0.0]

    class Timed(cls):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            started = time.perf_counter()
            try:
                return await super().choose_replicas(candidate_replicas, pending_request)
            finally:
                chose[0] += time.perf_counter() - started

    samples = []
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if done[0] % (args.decisions // 10 or 1) < n:
            samples.append(rss_mb())

    decisions.seed_generators(0)
    engine = make_engine(f"sqlite:///{path}", sqlite_cache_mb=8)
    with engine.connect() as connection:
        started = time.perf_counter()
        tally, _ = asyncio.run(decisions._run(connection, Filters(since=info["start"], until=info["end"] + 1),
                                              Timed, {}, progress))
        elapsed = time.perf_counter() - started
    engine.dispose()
    replayed = sum(t.decisions for t in tally.values())
    rate, alone = replayed / elapsed, replayed / chose[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reader = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{replayed:,} decisions through {args.router.rpartition(':')[2]} in {elapsed:.1f} s: {rate:,.0f} "
          f"decisions/s; its choose_replicas alone on the same inputs: {alone:,.0f}/s; ratio {rate / alone:.3f} "
          f"(target >= {TARGET_RATIO})")
    print(f"memory: RSS every tenth of the way {', '.join(f'{mb:.0f}' for mb in samples)} MB; peak {peak:.0f} MB "
          f"(the SQLite reader process: {reader:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
