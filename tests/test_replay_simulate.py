"""`routelens replay --mode simulate` (collector.replay.simulate), without a Ray instance.

Calibration: traffic recorded through the offline harness (routers.testing:
the real traced router, Ray's own routing and sending code, replicas that
hold `max_ongoing_requests` slots for a service time, in real time) is
imported, then simulated through the recorded router itself: each
replica's share must come within 2 percentage points of the recorded one,
and latency p50 and p99 within 15% (docs/replay.md, "Simulate"). The same
on real Serve: tests/test_replay_prediction.py.

The rest runs on synthetic recordings (wire batches, imported): the same
seed gives the same result; a queue-aware router sends a slow replica less
than a uniform one; recorded stats reach a stats-driven router when the
recorded one saw them; what cannot be simulated is said; memory does not grow
with the number of requests; the command stores the result, which the API
serves, prints it in 80 columns, and refuses what it cannot simulate in one
line; in both modes, it gives the same result for the same seed in every
process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from ray.serve.request_router import RequestRouter

from routelens.collector.cli import main as routelens
from routelens.collector.export.arrow_reader import ArrowReader
from routelens.collector.ingest.importer import import_files
from routelens.collector.ingest.writer import Ingestor
from routelens.collector.query.filters import Filters
from routelens.collector.replay import simulate, simulation_inputs
from routelens.collector.replay.spec import RouterSpec
from routelens.collector.store.db import check_schema, make_engine
from routelens.collector.store.models import Replay
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter, TracedUniformRequestRouter
from routelens.routers.testing import (
    FakeReplica,
    FakeResult,
    RayRouter,
    make_replicas,
    make_request,
    make_router,
    recorded_events,
)
from tests.support.collector_app import Collector, rows
from tests.support.replay_bounds import CALIBRATION, calibration_pairs, misses
from tests.support.wire_source import WireSource

POW2 = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"
UNIFORM = "routelens.routers.examples:UniformRequestRouter"
THROUGHPUT = "routelens.routers.examples:ThroughputAwareRequestRouter"
EVERYTHING = Filters(since=0.0, until=4e9)


def run(db_url: str, router: str = POW2, seed: int = 0, f: Filters = EVERYTHING, on_progress=lambda n: None,
        **options) -> dict:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return simulate.replay(conn, f, RouterSpec(router), seed, on_progress, **options)
    finally:
        engine.dispose()


def import_into(tmp_path, paths: List[str]) -> str:
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    engine = make_engine(url)
    check_schema(engine, url)
    report = import_files(Ingestor(engine), paths, 20_000)
    engine.dispose()
    assert not report.problems, report.problems
    return url


# --- recordings made with the offline harness, in real time ---

class ServingReplica(FakeReplica):
    """A fake replica that holds a slot for its service time (mean x U(0.5, 1.5)) and refuses when full."""

    def serve(self, mean_s: float, rng: random.Random) -> "ServingReplica":
        self.mean_s, self.rng = mean_s, rng
        return self

    def try_send_request(self, pr, with_rejection: bool) -> FakeResult:
        if self.queue_len >= self.max_ongoing_requests:
            return FakeResult(accepted=False, queue_len=self.queue_len)
        self.queue_len += 1
        result = FakeResult(accepted=True, queue_len=self.queue_len)
        asyncio.get_running_loop().call_later(self.mean_s * self.rng.uniform(0.5, 1.5), self._done, result)
        return result

    def _done(self, result: FakeResult) -> None:
        self.queue_len -= 1
        result.finish("done")


FAST_S, SLOW = 0.03, 4.0  # service times: three fast replicas and one 4x slower, two slots each
SLOTS = 2


def offline_recording(router_cls: type, path: str, seconds: float, load: float, seed: int) -> int:
    """Poisson traffic at `load` x capacity through a traced router on the offline harness
    (Ray's own routing, sending, retries and hooks), recorded to `path`. Returns the requests sent."""
    means = [FAST_S * SLOW, FAST_S, FAST_S, FAST_S]
    rate = load * sum(SLOTS / mean for mean in means)

    async def scenario():
        rng = random.Random(seed)
        router = make_router(router_cls, n_replicas=0, record_to=path)
        router.update_replicas([ServingReplica(fake.replica_id, max_ongoing_requests=SLOTS).serve(mean, rng)
                                for fake, mean in zip(make_replicas(len(means)), means)])
        ray_router = RayRouter(router)

        async def request():
            pr = make_request()
            retry = False
            while await ray_router._route_and_send_request_once(pr, "response", is_retry=retry) is None:
                retry = True  # refused: Ray's route_and_send_request retries it so

        ray_router._event_loop = asyncio.get_running_loop()
        requests = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(rng.expovariate(rate))
            requests.append(asyncio.ensure_future(request()))
        await asyncio.gather(*requests)
        await asyncio.sleep(0.1)  # the last completions reach the router
        return router, len(requests)

    router, sent = asyncio.run(scenario())
    recorded_events(router)  # waits until everything is written
    return sent


@pytest.fixture(scope="module")
def offline_recordings(tmp_path_factory) -> Dict[str, str]:
    """A database per router: 12 s of Poisson traffic at 70% of capacity."""
    out = {}
    for name, cls, seed in (("pow2", TracedPowerOfTwoChoicesRequestRouter, 3),
                            ("uniform", TracedUniformRequestRouter, 4)):
        tmp = tmp_path_factory.mktemp(f"offline-{name}")
        path = str(tmp / "events.jsonl")
        offline_recording(cls, path, seconds=12.0, load=0.7, seed=seed)
        out[name] = import_into(tmp, [path])
    return out


def replica_rows(result: dict) -> List[dict]:
    return [replica for d in result["deployments"] for replica in d["replicas"]]


@pytest.mark.parametrize("recorded", ["pow2", "uniform"])
def test_simulating_the_recorded_router_reproduces_the_recording(offline_recordings, recorded):
    result = run(offline_recordings[recorded], POW2 if recorded == "pow2" else UNIFORM)
    [deployment] = result["deployments"]
    assert deployment["recorded"]["requests"] > 1000
    assert deployment["recorded_simulated"]["unfinished"] == 0
    assert deployment["recorded_simulated"]["requests"] == deployment["recorded"]["requests"]
    # 12 s recordings: a replica's share is within the issue's 2 pp or within chance (misses' docstring).
    missed = misses(calibration_pairs(result), **CALIBRATION, requests=deployment["recorded"]["requests"])
    assert not missed, "\n".join(missed)


def test_the_same_seed_gives_the_same_result(offline_recordings):
    first, again = run(offline_recordings["pow2"], seed=7), run(offline_recordings["pow2"], seed=7)
    other = run(offline_recordings["pow2"], seed=8)
    assert first == again
    assert replica_rows(first) != replica_rows(other)


# --- synthetic recordings ---

def synthetic(tmp_path, latencies_ms: Dict[str, float], rate: float, seconds: float, seed: int = 1,
              router_class: str = "routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter",
              max_ongoing: int = 5, stats: Optional[Dict[str, dict]] = None, period_s: float = 1.0,
              few: Optional[str] = None) -> str:
    """A recording of Poisson arrivals routed round-robin, each replica with its own fixed latency
    (+-50%); `stats`: what each replica reports every `period_s`; `few`: a replica that served 5 only."""
    rng = random.Random(seed)
    source = WireSource("synthetic", app="app", deployment="Model", router_class=router_class)
    t0 = 1_700_000_000.0
    replicas = sorted(latencies_ms)
    members = source.replicas(t0 - 1, replicas)
    for member in members["replicas"]:
        # On the router's node: the guide's throughput-aware router finds no replica on another one.
        member.update(max_ongoing_requests=max_ongoing, node_id=source.info["node_id"])
    events = [members]
    t, i = t0, 0
    served = {r: 0 for r in replicas}
    while t < t0 + seconds:
        t += rng.expovariate(rate)
        replica = replicas[i % len(replicas)]
        i += 1
        if replica == few and served[replica] >= 5:
            replica = replicas[(replicas.index(replica) + 1) % len(replicas)]
        served[replica] += 1
        decision = source.decision(t, [[replica]], request_id=f"r{i}", internal_request_id=f"i{i}")
        routed = source.routed(t + 0.001, replica, decision, queue_wait_ms=1.0)
        latency = latencies_ms[replica] * rng.uniform(0.5, 1.5)
        events += [decision, routed, source.completed(t + 0.001 + latency / 1000, replica, routed, latency)]
    if stats:
        at = t0
        while at < t0 + seconds:
            events += [source.stats(at, replica, values, collected_at=at) for replica, values in stats.items()]
            at += period_s
    events.sort(key=lambda e: e["ts"])
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "synthetic.jsonl"
    with open(path, "w") as f:
        for start in range(0, len(events), 1000):
            f.write(json.dumps(source.batch(events[start:start + 1000])) + "\n")
    return import_into(tmp_path, [str(path)])


def shares(result: dict, column: str) -> Dict[str, float]:
    return {row["replica_id"]: row[column]["share"] for row in replica_rows(result)}


def test_a_queue_aware_router_sends_a_slow_replica_less_than_a_uniform_one(tmp_path):
    # At 10% of capacity the slow replica (4x) is seldom full, so Uniform gives it its quarter.
    db = synthetic(tmp_path, {"slow": 400.0, "fast-1": 100.0, "fast-2": 100.0, "fast-3": 100.0},
                   rate=0.1 * (3 * 5 / 0.1 + 5 / 0.4), seconds=120)
    queue_aware = shares(run(db, POW2), "replay")
    uniform = shares(run(db, UNIFORM), "replay")
    assert uniform["slow"] == pytest.approx(0.25, abs=0.03)
    assert queue_aware["slow"] < uniform["slow"] - 0.05


def test_recorded_stats_reach_a_stats_driven_router_as_the_recorded_one_saw_them(tmp_path):
    # The guide's throughput-aware router sends to the replica reporting the least throughput.
    reported = {"a": {"throughput": 50}, "b": {"throughput": 1}, "c": {"throughput": 50}}
    db = synthetic(tmp_path, {"a": 50.0, "b": 50.0, "c": 50.0}, rate=10, seconds=30, stats=reported, period_s=1.0)
    replayed = shares(run(db, THROUGHPUT), "replay")
    assert replayed["b"] > 0.9  # from the first refresh on


MODEL_AWARE = "routelens.routers.examples.TracedModelAwareRequestRouter"


def model_aware_recording(tmp_path, held: List[Tuple[float, Dict[str, List[str]]]],
                          ranked: Callable[[float, int], List[List[str]]], seconds: float, rate: float) -> str:
    """Requests for model `m` through the model-aware router, each to the first replica of its
    recorded ranking `ranked(t, i)`; `held`: `replicas` events, (when, replica -> the models it holds).
    Every replica on the router's node (the locality ranks do not tell them apart), slots enough that
    none fills."""
    rng = random.Random(5)
    source = WireSource("models", app="app", deployment="Models", router_class=MODEL_AWARE)
    t0 = 1_700_000_000.0
    events = []
    for at, models in held:
        event = source.replicas(t0 + at, sorted(models))
        for member in event["replicas"]:
            member.update(max_ongoing_requests=20, node_id=source.info["node_id"],
                          model_ids=models[member["replica_id"]])
        events.append(event)
    t, i = t0, 0
    while t < t0 + seconds:
        t += rng.expovariate(rate)
        i += 1
        ranks = ranked(t - t0, i)
        replica = ranks[0][0]
        decision = source.decision(t, ranks, request_id=f"r{i}", internal_request_id=f"i{i}", model_id="m")
        routed = {**source.routed(t + 0.001, replica, decision, queue_wait_ms=1.0), "model_id": "m"}
        latency = 50.0 * rng.uniform(0.5, 1.5)
        events += [decision, routed, source.completed(t + 0.001 + latency / 1000, replica, routed, latency)]
    events.sort(key=lambda e: e["ts"])
    path = tmp_path / "models.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(source.batch(events)) + "\n")
    return import_into(tmp_path, [str(path)])


def loading_a_model_midway(tmp_path, seconds: float = 40.0, rate: float = 10.0) -> Tuple[str, float]:
    """Replica `a` holds `m` from the start, `b` loads it half-way (a `replicas` event records it),
    `c` never does; until then every request went to `a`, after it they alternated between `a` and
    `b`. Returns the database and the time `b` got the model."""
    half = seconds / 2
    db = model_aware_recording(
        tmp_path, [(-1.0, {"a": ["m"], "b": [], "c": []}), (half, {"a": ["m"], "b": ["m"], "c": []})],
        lambda t, i: [["a" if t < half or i % 2 else "b"]], seconds, rate)
    return db, 1_700_000_000.0 + half


def test_a_replica_holds_a_model_from_when_it_was_recorded_loading_it(tmp_path):
    db, loaded_at = loading_a_model_midway(tmp_path)
    # Before `b` loaded the model, the router sent none of the model's requests to it, and neither may the
    # simulation: `b` holds now, in the replicas table, what it held only from half-way.
    before = replica_rows(run(db, MODEL_AWARE, f=Filters(since=0.0, until=loaded_at - 0.5)))
    assert {row["replica_id"]: row["recorded"]["requests"] for row in before}["b"] == 0
    assert {row["replica_id"]: row["recorded_simulated"]["requests"] for row in before} == {
        "a": sum(row["recorded"]["requests"] for row in before), "b": 0, "c": 0}
    # From then on `b` holds it, and gets its share of the requests; `c` never does. In a window that
    # starts later too: the `replicas` events that say who holds what are before it.
    for f in (EVERYTHING, Filters(since=loaded_at + 1, until=4e9)):
        simulated = shares(run(db, MODEL_AWARE, f=f), "recorded_simulated")
        assert simulated["b"] > 0.15 and simulated["c"] == 0


def test_replicas_that_joined_together_are_listed_in_the_order_the_rankings_show(tmp_path):
    # `a` and `b` hold the model and joined in one update; Ray listed `b` first, which every recorded
    # ranking shows (both in rank 0, `b` first), and the router took the first of equally idle replicas:
    # `b` got every request. Listed as they joined, then by id, `a` would get them in the simulation.
    db = model_aware_recording(tmp_path, [(-1.0, {"a": ["m"], "b": ["m"], "c": []})],
                               lambda t, i: [["b", "a"], ["c"]], seconds=30.0, rate=2.0)
    result = run(db, MODEL_AWARE)
    assert shares(result, "recorded") == {"a": 0.0, "b": 1.0, "c": 0.0}
    simulated = shares(result, "recorded_simulated")
    # Idle ties go to the first listed; a probe answer (after a 10 s old cache entry) to the quickest.
    assert simulated["b"] > 0.75 and simulated["c"] == 0.0


def test_a_pair_the_rankings_order_both_ways_is_listed_as_it_joined(tmp_path):
    # As pow-2 ranks two replicas, in a random order: the rankings tell nothing of Ray's, and `a` and `b`,
    # which joined together, are listed by id. `c` joined later, but every ranking holding it has it
    # before `b`.
    db = model_aware_recording(
        tmp_path, [(-2.0, {"a": ["m"], "b": ["m"]}), (-1.0, {"a": ["m"], "b": ["m"], "c": ["m"]})],
        lambda t, i: [[["b", "a"], ["a", "b"], ["c", "b"]][i % 3]], seconds=10.0, rate=2.0)
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            reader = ArrowReader(conn)
            try:
                [dep] = simulation_inputs.deployments(conn, reader, EVERYTHING, 0)
                order = simulation_inputs.listing_order(reader, EVERYTHING, dep)
            finally:
                reader.close()
    finally:
        engine.dispose()
    assert [dep.replicas[pk].replica_id for pk in order] == ["a", "c", "b"]


def test_a_replica_with_few_latencies_draws_from_its_deployments(tmp_path):
    db = synthetic(tmp_path, {"a": 50.0, "b": 50.0, "c": 50.0}, rate=20, seconds=20, few="c")
    by_id = {row["replica_id"]: row for row in replica_rows(run(db))}
    assert by_id["c"]["service_samples"] == 5 and by_id["c"]["service_times"] == "deployment's"
    assert by_id["a"]["service_times"] == "own"


def test_max_ongoing_requests_can_be_overridden(tmp_path):
    db = synthetic(tmp_path, {"a": 200.0, "b": 200.0}, rate=15, seconds=20)
    recorded_slots, one_slot = run(db), run(db, max_ongoing_requests=1)
    assert {row["max_ongoing_requests"] for row in replica_rows(recorded_slots)} == {5}
    assert {row["max_ongoing_requests"] for row in replica_rows(one_slot)} == {1}
    [deployment] = one_slot["deployments"]
    assert deployment["replay"]["rejections"] > 0
    assert deployment["replay"]["queue_wait_ms"]["p95"] > 50.0  # 15/s on two 200 ms slots: a queue


def test_a_recorded_router_that_does_not_import_here_is_not_simulated(tmp_path):
    db = synthetic(tmp_path, {"a": 50.0, "b": 50.0}, rate=10, seconds=10, router_class="__main__.ScriptRouter")
    result = run(db)
    [deployment] = result["deployments"]
    assert deployment["recorded_simulated"] is None and deployment["replay"]["requests"] > 0
    assert any("__main__.ScriptRouter cannot be used here" in note for note in result["notes"])
    assert all(row["recorded_simulated"] is None for row in replica_rows(result))


def test_progress_is_reported_as_requests_replay(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "BATCH", 50)
    db = synthetic(tmp_path, {"a": 50.0, "b": 50.0}, rate=50, seconds=20)
    told = []
    result = run(db, on_progress=told.append)
    assert len(told) > 5 and set(told[:-1]) == {50}
    assert sum(told) == result["deployments"][0]["recorded"]["requests"] == result["requests"]


PEAK_MEMORY = """
import json, sys, tracemalloc
from routelens.collector.export import chunks
from routelens.collector.query.filters import Filters
from routelens.collector.replay import simulate, simulation_inputs
from routelens.collector.replay.spec import RouterSpec
from routelens.collector.store.db import make_engine

# Chunks small enough that both recordings take many of them, and reservoirs that both fill.
chunks.CHUNK_ROWS, simulation_inputs.RESERVOIR = 500, 300
peaks = []
for url in sys.argv[1:]:
    engine = make_engine(url)
    with engine.connect() as conn:
        replay = lambda: simulate.replay(conn, Filters(since=0.0, until=4e9), RouterSpec({router!r}), 0,
                                         lambda n: None)
        replay()  # the first run imports what it needs
        tracemalloc.start()
        requests = replay()["deployments"][0]["recorded"]["requests"]
        peaks.append((tracemalloc.get_traced_memory()[1], requests))
        tracemalloc.stop()
    engine.dispose()
print(json.dumps(peaks))
"""


def test_memory_does_not_grow_with_the_recorded_requests(tmp_path):
    # In a process of its own: tracemalloc counts every thread's allocations, and a worker of the suite may
    # still run another test's threads (a collector's, an exporter's) beside this one.
    urls = [synthetic(tmp_path / str(seconds), {"a": 50.0, "b": 50.0, "c": 50.0}, rate=40, seconds=seconds)
            for seconds in (100, 400)]
    child = subprocess.run([sys.executable, "-c", PEAK_MEMORY.format(router=POW2), *urls], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    (small, small_requests), (large, large_requests) = json.loads(child.stdout)
    assert large_requests > 3 * small_requests > 9000
    assert large < small * 1.25, (small, large)


# --- the command ---

class Sleeper(RequestRouter):
    """Awaits something outside the router in choose_replicas: the simulation cannot run it."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        await asyncio.sleep(0.001)
        return [candidate_replicas]


@pytest.fixture
def small(tmp_path) -> str:
    return synthetic(tmp_path, {"a": 50.0, "b": 80.0}, rate=20, seconds=10)


def test_the_command_stores_the_simulation_the_api_serves_it_and_the_tables_fit(small, capsys):
    capsys.readouterr()
    assert routelens(["replay", "--db", small, "--mode", "simulate", "--router", UNIFORM, "--seed", "3",
                      "--max-ongoing-requests", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["mode"], printed["router_class"], printed["seed"], printed["runs"]) == ("simulate", UNIFORM, 3, 1)
    [deployment] = printed["result"]["deployments"]
    assert {r["replica_id"]: r["max_ongoing_requests"] for r in deployment["replicas"]} == {"a": 2, "b": 2}
    for column in ("recorded", "recorded_simulated", "replay"):
        assert deployment[column]["requests"] == deployment["recorded"]["requests"] > 0
    collector = Collector(small)
    try:
        assert collector.get(f"/v1/replays/{printed['id']}") == printed
    finally:
        collector.close()

    assert routelens(["replay", "--db", small, "--mode", "simulate", "--router", UNIFORM]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= 80
    assert any(line.strip().startswith("share of a") for line in lines) and any("latency" in line for line in lines)
    assert lines[-1].startswith("stored as replay ") and rows(small, Replay.__table__) == 2


def replay_in_a_process_of_its_own(db: str, *args: str) -> dict:
    """`routelens replay --json ...` as an operator runs it: a new process, without PYTHONHASHSEED; what it
    printed, less what is the run's own (its stored id and time)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONHASHSEED"}
    done = subprocess.run([sys.executable, "-m", "routelens.collector.cli", "replay", "--db", db, "--json", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert set(record) >= {"id", "created_at", "time"}
    return {name: value for name, value in record.items() if name not in ("id", "created_at", "time")}


@pytest.mark.parametrize("mode", ["decisions", "simulate"])
def test_the_same_seed_gives_the_same_result_in_every_process(tmp_path, mode):
    """Ray's pow-2 draws its two replicas from a set of replica ids, ordered by the process's string hashes
    (random in each process unless PYTHONHASHSEED is set); eight replicas make two processes' orders all but
    never agree. Simulate mode also simulates the recorded router, pow-2 here."""
    db = synthetic(tmp_path, {f"replica-{i}": 50.0 + 10.0 * i for i in range(8)}, rate=40, seconds=10)
    window = ("--since", "0", "--until", "4000000000")  # without one, the window ends when the command runs
    first, again = (replay_in_a_process_of_its_own(db, "--mode", mode, "--router", POW2, "--seed", "3", *window)
                    for _ in range(2))
    assert first == again


@pytest.mark.parametrize("args, message", [
    (["--mode", "simulate", "--router", "tests.test_replay_simulate:Sleeper"], "cannot be simulated"),
    (["--mode", "simulate", "--router", UNIFORM, "--since", "0", "--until", "100"], "no recorded requests"),
    (["--mode", "simulate", "--router", UNIFORM, "--runs", "3"], "--runs is not an option of --mode simulate"),
    (["--router", UNIFORM, "--max-ongoing-requests", "2"], "--max-ongoing-requests is not an option of --mode "
                                                             "decisions"),
])
def test_what_cannot_be_simulated_is_one_line_and_stores_nothing(small, capsys, args, message):
    capsys.readouterr()
    assert routelens(["replay", "--db", small, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert rows(small, Replay.__table__) == 0
