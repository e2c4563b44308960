"""`routelens replay --mode simulate` checked against reality (issue 25, "How to show it works").

1. Calibration on the demo's four apps: a database `routelens demo --db`
   left (`--demo-db`; without it the demo is run here for `--demo-duration`,
   on its own Ray), each app simulated through its recorded router with
   `--seeds` seeds (`--apps`: only those; an app whose router cannot be
   replayed, as the llm app's, is said and skipped). Prints each replica's recorded
   share and latency beside the simulated ones (seed 0, and the seeds' mean,
   range and standard deviation, and z: how many of those the recorded
   share lies from the seeds' mean), and whether
   the bounds hold (share within 2 pp, latency p50/p99 within 15%): for
   seed 0, and for the seeds' mean, since a randomized router's recorded
   shares are one draw among many.
2. Prediction on real Ray Serve: one deployment of 4 replicas of 2 slots,
   one of them 4x slower, Poisson arrivals at 70% of capacity through a
   handle, routed `--seconds` (default 300) by the seed guide's
   UniformRequestRouter and as long by Ray's pow-2 router (deployed side by
   side, traffic in turns with the same arrivals: tests/test_replay_prediction.py,
   whose helpers this uses). Each run is simulated through its own router
   (calibration) and through the other's (prediction, against the other's
   real run: share within 5 pp, latency p50/p99 within 25%, per replica and
   over the deployment). Prints predicted against measured per replica role
   (0: the slow one), queue waits too, and which bounds hold.

    .venv/bin/python bench/replay_prediction.py [--demo-db PATH | --demo-duration 90s] [--seeds 5]
                                                [--apps models,...] [--seconds 300] [--no-demo] [--no-serve]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from routelens.collector.query.figures import scope  # noqa: E402
from routelens.collector.query.filters import Filters  # noqa: E402
from routelens.collector.replay import simulate  # noqa: E402
from routelens.collector.replay.spec import ReplayError, RouterSpec  # noqa: E402
from routelens.collector.store.db import make_engine  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.replay_bounds import CALIBRATION, PREDICTION, calibration_pairs, misses  # noqa: E402
from tests.test_replay_prediction import OTHER, by_role, by_role_pairs, run_both, table  # noqa: E402

EVERYTHING = Filters(since=0.0, until=4e9)


def verdict(missed: List[str]) -> str:
    return "hold" if not missed else "MISSED: " + "; ".join(missed)


def demo_database(duration: str) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="routelens-replay-demo-"), "demo.db")
    print(f"running `routelens demo --db {path} --duration {duration}`", flush=True)
    subprocess.run([sys.executable, "-m", "routelens.collector.cli", "demo", "--db", path, "--duration", duration,
                    "--port", str(free_port()), "--serve-port", str(free_port())],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def calibrate_demo(path: str, seeds: int, only: List[str]) -> bool:
    """Each app of the demo's database (or those of `only`) simulated through its recorded router, `seeds` times."""
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        apps = sorted({router["app"]: router["router_class"] for router in scope(conn, EVERYTHING).routers.values()
                       if not only or router["app"] in only}.items())
    held = True
    for app, router_class in apps:
        results = []
        try:
            for seed in range(seeds):
                with engine.connect() as conn:
                    results.append(simulate.replay(conn, Filters(since=0.0, until=4e9, apps=(app,)),
                                                   RouterSpec(router_class), seed, lambda n: None))
        except ReplayError as exc:  # the llm app's prefix-aware router calls a Ray actor (docs/replay.md)
            print(f"\n{app}: not simulated: {exc}")
            continue
        [first] = results[0]["deployments"]
        print(f"\n{app} ({router_class.rpartition('.')[2]}): {first['recorded']['requests']:,} requests, "
              f"{len(first['replicas'])} replicas; share and latency p50/p99 ms, recorded | simulated seed 0 | "
              f"mean of {seeds} seeds [range]")
        rows = [(r["replica_id"], [res["deployments"][0]["replicas"][i] for res in results])
                for i, r in enumerate(first["replicas"])]
        rows.append(("deployment", [res["deployments"][0] for res in results]))
        mean_pairs = []
        for name, per_seed in rows:
            real, simulated = per_seed[0]["recorded"], [row["recorded_simulated"] for row in per_seed]
            mean = {"latency_ms": {q: statistics.fmean(s["latency_ms"][q] for s in simulated) for q in ("p50", "p99")}}
            share = ""
            if "share" in real:
                shares = [s["share"] for s in simulated]
                mean["share"] = statistics.fmean(shares)
                sd = statistics.stdev(shares) if len(shares) > 1 else 0.0
                z = f"{(real['share'] - mean['share']) / sd:+.1f}" if sd else "-"
                share = (f"share {real['share']:.3f} | {shares[0]:.3f} | {mean['share']:.3f} "
                         f"[{min(shares):.3f}-{max(shares):.3f}] sd {sd:.3f} z {z}  ")
            mean_pairs.append((name, mean, real))
            print(f"  {name:<12} {share}p50 {real['latency_ms']['p50']:.1f} | {simulated[0]['latency_ms']['p50']:.1f}"
                  f" | {mean['latency_ms']['p50']:.1f}  p99 {real['latency_ms']['p99']:.1f} | "
                  f"{simulated[0]['latency_ms']['p99']:.1f} | {mean['latency_ms']['p99']:.1f}")
        seed0, over_seeds = misses(calibration_pairs(results[0]), **CALIBRATION), misses(mean_pairs, **CALIBRATION)
        print(f"  bounds (2 pp, 15%), seed 0: {verdict(seed0)}")
        print(f"  bounds (2 pp, 15%), mean of the seeds: {verdict(over_seeds)}")
        held &= not over_seeds
    engine.dispose()
    return held


def prediction(seconds: float, work_dir: str) -> bool:
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
        print(table(f"calibration: {kind} simulated through its own router vs recorded",
                    by_role(result, "recorded_simulated", run), by_role(result, "recorded", run)))
        missed = misses(calibration_pairs(result), **CALIBRATION)
        print("  bounds (2 pp, 15%):", verdict(missed))
        held &= not missed
        other = runs[OTHER[kind]]
        predicted, measured = by_role(result, "replay", run), by_role(results[OTHER[kind]], "recorded", other)
        print(table(f"prediction: {OTHER[kind]} predicted from the {kind} run vs the real {OTHER[kind]} run",
                    predicted, measured))
        [measured_deployment] = results[OTHER[kind]]["deployments"]
        got, want = deployment["replay"], measured_deployment["recorded"]
        print(f"  deployment latency p50/p99 predicted {got['latency_ms']['p50']:.1f}/{got['latency_ms']['p99']:.1f} "
              f"ms, measured {want['latency_ms']['p50']:.1f}/{want['latency_ms']['p99']:.1f} ms; queue wait p50/p99 "
              f"predicted {got['queue_wait_ms']['p50']:.1f}/{got['queue_wait_ms']['p99']:.1f} ms, measured "
              f"{want['queue_wait_ms']['p50']:.1f}/{want['queue_wait_ms']['p99']:.1f} ms; rejections predicted "
              f"{got['rejections']}, measured {want['rejections']}")
        missed = misses(by_role_pairs(predicted, measured) + [("deployment", got, want)], **PREDICTION)
        print("  bounds (5 pp, 25%, per replica and deployment):", verdict(missed))
        held &= not missed
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-db", help="a database `routelens demo --db` left (default: run the demo here)")
    parser.add_argument("--demo-duration", default="90s", help="how long the demo runs here (default: 90s)")
    parser.add_argument("--seeds", type=int, default=5, help="simulations of each demo app (default: 5)")
    parser.add_argument("--apps", default="", help="the demo's apps to calibrate, comma-separated (default: all)")
    parser.add_argument("--seconds", type=float, default=300.0, help="real Serve traffic per router (default: 300)")
    parser.add_argument("--no-demo", action="store_true", help="skip the calibration on the demo's apps")
    parser.add_argument("--no-serve", action="store_true", help="skip the prediction on real Serve")
    args = parser.parse_args()
    held: Dict[str, bool] = {}
    if not args.no_demo:
        held["calibration on the demo"] = calibrate_demo(args.demo_db or demo_database(args.demo_duration), args.seeds,
                                                         [app for app in args.apps.split(",") if app])
    if not args.no_serve:
        held["prediction on real Serve"] = prediction(args.seconds, tempfile.mkdtemp(prefix="routelens-replay-bench-"))
    print("\n" + "; ".join(f"{name}: {'holds' if ok else 'MISSED'}" for name, ok in held.items()))
    return 0 if all(held.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
