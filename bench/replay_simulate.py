"""`routelens replay --mode simulate`: predictions against real Serve, speed, and memory.

1. Prediction (issue 25): on real Ray Serve, one deployment of 4 replicas of
   2 slots, one of them 4x slower, Poisson arrivals at 70% of capacity
   through a handle, routed `--seconds` (default 300) by the seed guide's
   UniformRequestRouter and as long by Ray's pow-2 router (deployed side by
   side, traffic in turns: tests/test_replay_prediction.py, whose helpers
   this uses). Each run is simulated through its own router (calibration:
   share within 2 pp, latency p50/p99 within 15%) and through the other's
   (prediction, against the other's real run: 5 pp, 25%). Prints predicted
   against measured, per replica role (0: the slow one), and which bounds hold.
2. Speed: simulated decisions per second (choose_replicas calls the
   simulation makes, over the whole `simulate` call, reading included)
   against the replayed router's own choose_replicas alone on the same
   replicas and as many requests, in one run. Target ratio >= 0.25.
3. Memory: a million recorded decisions (bench/queries.py's database,
   built once and cached under /tmp; opened read-only) simulated through
   pow-2, with a progress line; resident memory sampled at each progress
   report: it must not grow with the requests replayed.

    .venv/bin/python bench/replay_simulate.py [--seconds 300] [--no-serve] [--no-million]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from sqlalchemy import create_engine  # noqa: E402

from routelens.collector.query.filters import Filters  # noqa: E402
from routelens.collector.replay.simulate import import_class, simulate  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.test_replay_prediction import (  # noqa: E402
    OTHER,
    POW2,
    UNIFORM,
    Spec,
    by_role,
    compare,
    deployment_bounds,
    run_both,
    table,
)

TARGET_RATIO = 0.25


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prediction(seconds: float, work_dir: str) -> dict:
    import ray
    from ray import cloudpickle, serve

    import tests.test_replay_prediction as module

    cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        both = run_both(seconds, work_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
    runs, results = both["runs"], both["results"]
    held = True
    for kind in ("uniform", "pow2"):
        run, result = runs[kind], results[kind]
        [deployment] = result["deployments"]
        print(f"\n{kind}: {run['requests']} requests at {run['rate']:.1f}/s, round trips {deployment['network']}")
        simulated, recorded = by_role(result, "recorded_simulated", run), by_role(result, "recorded", run)
        print(table(f"calibration: {kind} simulated through its own router vs recorded", simulated, recorded))
        misses = compare(simulated, recorded, 2.0, 0.15) + deployment_bounds(
            deployment["recorded_simulated"], deployment["recorded"], 0.15)
        print("  bounds (2 pp, 15%):", "hold" if not misses else "MISSED: " + "; ".join(misses))
        held &= not misses
        other = runs[OTHER[kind]]
        predicted = by_role(result, "replayed", run)
        measured = by_role(results[OTHER[kind]], "recorded", other)
        print(table(f"prediction: {OTHER[kind]} predicted from the {kind} run vs the real {OTHER[kind]} run",
                    predicted, measured))
        [measured_deployment] = results[OTHER[kind]]["deployments"]
        misses = compare(predicted, measured, 5.0, None) + deployment_bounds(
            deployment["replayed"], measured_deployment["recorded"], 0.25)
        got, want = deployment["replayed"]["latency_ms"], measured_deployment["recorded"]["latency_ms"]
        print(f"  deployment latency predicted p50 {got['p50']:.1f} ms p99 {got['p99']:.1f} ms; "
              f"measured p50 {want['p50']:.1f} ms p99 {want['p99']:.1f} ms")
        print("  bounds (share per replica 5 pp, deployment latency 25%):",
              "hold" if not misses else "MISSED: " + "; ".join(misses))
        per_replica = compare(predicted, measured, 5.0, 0.25)
        print("  per replica latency within 25% too:", "yes" if not per_replica else "no: " + "; ".join(per_replica))
        held &= not misses
        for column in ("recorded", "recorded_simulated", "replayed"):
            d = deployment[column]
            print(f"  deployment {column:<18} rejections {d['rejections']:>5}  decisions {d['decisions']:>6}  "
                  f"queue wait {d['queue_wait_ms']}  latency {d['latency_ms']}")
    return {"db_url": f"sqlite:///{os.path.join(work_dir, 'replay.db')}", "runs": runs, "held": held}


def choose_alone(router_path: str, replicas: List[dict], calls: int) -> float:
    """choose_replicas calls per second of the router alone: the same replicas (queue lengths
    cached), one fresh request a call, built beforehand."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from routelens.routers.testing import FakeReplica, make_request

    async def measure() -> float:
        deployment_id = DeploymentID(name="bench", app_name="bench")
        router = import_class(router_path)(deployment_id=deployment_id, handle_source=DeploymentHandleSource.UNKNOWN,
                                           self_actor_id="OFFLINE", self_node_id="node-0",
                                           use_replica_queue_len_cache=True)
        router.initialize_state()
        fakes = [FakeReplica(ReplicaID(unique_id=r["replica_id"], deployment_id=deployment_id),
                             max_ongoing_requests=r["max_ongoing_requests"]) for r in replicas]
        router.update_replicas(fakes)
        for i, fake in enumerate(fakes):
            router._replica_queue_len_cache.update(fake.replica_id, i % fake.max_ongoing_requests)
        requests = [make_request() for _ in range(calls)]
        started = time.perf_counter()
        for pr in requests:
            coroutine = router.choose_replicas(candidate_replicas=router._replicas_list, pending_request=pr)
            try:
                coroutine.send(None)
            except StopIteration:
                pass
        return calls / (time.perf_counter() - started)

    return asyncio.run(measure())


def speed(db_url: str, window: Filters) -> None:
    engine = create_engine(db_url)
    for router_path in (POW2, UNIFORM):
        with engine.connect() as conn:
            simulate(conn, window, Spec(router_path), 0, None)  # imports and caches warm
            started = time.perf_counter()
            result = simulate(conn, window, Spec(router_path), 0, None)
            wall = time.perf_counter() - started
        decisions = result["speed"]["simulated_decisions"]
        simulated = decisions / wall
        alone = choose_alone(router_path, result["replicas"], max(decisions, 10_000))
        ratio = simulated / alone
        print(f"speed, {router_path.rsplit(':', 1)[1]}: {decisions} simulated decisions in {wall:.2f} s = "
              f"{simulated:,.0f}/s; choose_replicas alone {alone:,.0f}/s; ratio {ratio:.3f} "
              f"(target >= {TARGET_RATIO}: {'holds' if ratio >= TARGET_RATIO else 'MISSED'})")
    engine.dispose()


def million(path: str) -> None:
    if not os.path.exists(path):
        from queries import database

        path, _ = database(1_000_000)
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    with engine.connect() as conn:
        until = conn.exec_driver_sql("SELECT MAX(ts) FROM routed").scalar() + 1
        since = conn.exec_driver_sql("SELECT MIN(ts) FROM routed").scalar()
        total = conn.exec_driver_sql("SELECT COUNT(*) FROM routed").scalar()
        samples: Dict[int, float] = {}
        started = time.perf_counter()

        def progress(done: int) -> None:
            samples[done] = rss_mb()
            share = done / (2 * total)
            print(f"\r  [{'#' * int(40 * share):<40}] {done:>9,} of {2 * total:,} request replays, "
                  f"RSS {samples[done]:.0f} MB", end="", flush=True)

        before = rss_mb()
        result = simulate(conn, Filters(since=since, until=until), Spec(POW2), 0, progress)
        wall = time.perf_counter() - started
    print()
    points = sorted(samples.items())
    tenth = next(mb for done, mb in points if done >= 0.1 * points[-1][0])
    print(f"a million decisions ({total:,} requests, {len(result['replicas'])} replicas): {wall:.0f} s, "
          f"{result['speed']['simulated_decisions']:,} simulated decisions "
          f"({result['speed']['simulated_decisions'] / wall:,.0f}/s); RSS before {before:.0f} MB, at 10% "
          f"{tenth:.0f} MB, at the end {points[-1][1]:.0f} MB, peak sampled {max(mb for _, mb in points):.0f} MB")
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="traffic per router (default 300)")
    parser.add_argument("--no-serve", action="store_true", help="skip the real Serve runs (and the speed part)")
    parser.add_argument("--no-million", action="store_true", help="skip the million-decision memory run")
    parser.add_argument("--million-db", default="/tmp/routelens-bench-queries-1000000.db")
    args = parser.parse_args()
    held = True
    if not args.no_serve:
        work_dir = tempfile.mkdtemp(prefix="routelens-replay-bench-")
        measured = prediction(args.seconds, work_dir)
        held = measured["held"]
        run = measured["runs"]["uniform"]
        speed(measured["db_url"], Filters(since=run["since"], until=run["until"], apps=(run["app"],)))
    if not args.no_million:
        million(args.million_db)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
