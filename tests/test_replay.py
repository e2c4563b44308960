"""`routelens replay --mode decisions`: a window recorded by a real traced router
(through Ray's own routing and sending code, on the offline harness), imported
as users import the tracer's JSON Lines, replayed through routers whose answers
the tests work out from the recorded inputs; the stored result read back
through the API; bad input refused in one line, nothing stored. SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import threading
from collections import Counter

import pytest
from ray.serve.request_router import RequestRouter

from routelens.collector.cli import main as routelens
from routelens.collector.ingest.importer import import_files
from routelens.collector.ingest.writer import Ingestor
from routelens.collector.query.filters import Filters
from routelens.collector.replay import decisions
from routelens.collector.replay.no_cluster import ClusterCallRefused, ClusterGuard, refusing_cluster_calls
from routelens.collector.replay.recorded import recorded_decisions
from routelens.collector.replay.spec import RouterSpec
from routelens.collector.store.db import make_engine
from routelens.collector.store.models import Replay
from routelens.routers import TracingMixin
from routelens.routers.testing import RayRouter, make_request, make_router, recorded_events, replicas_of
from tests.support.collector_app import Collector, rows
from tests.support.python_child import run_python

MAX_ONGOING = 2
N_REPLICAS = 4
REQUESTS = 240


class LeastLoaded(RequestRouter):
    """The recorded router: every replica in a rank of its own, least `load` (routing stats) first."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [[r] for r in sorted(candidate_replicas, key=lambda r: (_load(r.routing_stats), r.replica_id.unique_id))]


class ExplainedLeastLoaded(LeastLoaded):
    """LeastLoaded, saying whether its first replica is lightly loaded, and how much (routelens_explain)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        load = _load(ranks[0][0].routing_stats)
        self.routelens_explain("light" if load < 0.2 else "loaded", load=load)
        return ranks


class TracedLeastLoaded(TracingMixin, ExplainedLeastLoaded):
    pass


class MostLoaded(RequestRouter):
    """Another rule on the same routing stats: most loaded first."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [[r] for r in sorted(candidate_replicas,
                                    key=lambda r: (-_load(r.routing_stats), r.replica_id.unique_id))]


class FewestQueued(RequestRouter):
    """Reads Ray's queue-length cache, as the guide's throughput-aware router does (select_available_replicas)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        cache = self.replica_queue_len_cache
        return [[r] for r in sorted(candidate_replicas,
                                    key=lambda r: (_queued(cache.get(r.replica_id)), r.replica_id.unique_id))]


class NeedsSetting(RequestRouter):
    def initialize_state(self, setting):
        self.setting = setting

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]


def _load(stats) -> float:
    return stats.get("load", 0.0)


def _queued(queue_len):
    return 10**9 if queue_len is None else queue_len


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """The tracer's JSON Lines of a traced LeastLoaded: loads change every 10 requests,
    one replica is full for a while (Ray takes rank 1), some sends are refused."""
    path = str(tmp_path_factory.mktemp("recording") / "events.jsonl")
    rng = random.Random(25)

    async def record():
        router = make_router(TracedLeastLoaded, N_REPLICAS, record_to=path, max_ongoing_requests=MAX_ONGOING)
        await asyncio.sleep(0.05)  # Ray's probe of the new replicas fills the queue-length cache
        open_results = []
        for i in range(REQUESTS):
            replicas = replicas_of(router)
            if i % 10 == 0:
                for replica in replicas:
                    replica.routing_stats = {"load": round(rng.random(), 3)}
                router.update_replicas(replicas)
            least = min(replicas, key=lambda r: (_load(r.routing_stats), r.replica_id.unique_id))
            for replica in replicas:
                # Full for a while: Ray probes it, then takes rank 1. Now and then it refuses.
                replica.queue_len = MAX_ONGOING if replica is least and 80 <= i < 120 else 0
                replica.refuses = replica is least and i % 37 == 36
            result = await RayRouter(router).send(make_request())
            if result is not None:
                open_results.append(result)
            while len(open_results) > 1:
                open_results.pop(0).finish("ok")
            await asyncio.sleep(0)
        for result in open_results:
            result.finish("ok")
        await asyncio.sleep(0.05)
        return router

    router = asyncio.run(record())
    events = recorded_events(router)
    routed = [e for e in events if e["type"] == "routed"]
    # The recording has what the replay must get right: ranks past 0, and decisions without an outcome.
    assert {e["rank"] for e in routed} >= {0, 1}
    assert len(routed) < sum(e["type"] == "decision" for e in events)
    return path, events


@pytest.fixture
def db(db_url, recording):
    engine = make_engine(db_url)
    try:
        report = import_files(Ingestor(engine), [recording[0]], 20_000)
        assert not report.problems
    finally:
        engine.dispose()
    return db_url


def replay(db: str, capsys, *args: str) -> dict:
    """`routelens replay --json ...`: what it printed, as JSON."""
    capsys.readouterr()
    assert routelens(["replay", "--db", db, "--json", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def refused(db: str, capsys, *args: str) -> str:
    """A replay refused: exit status 2, one line, nothing stored; the line."""
    capsys.readouterr()
    assert routelens(["replay", "--db", db, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert stored_replays(db) == 0
    return err


def stored_replays(db: str) -> int:
    return rows(db, Replay.__table__)


def only_deployment(record: dict) -> dict:
    (deployment,) = record["result"]["deployments"]
    return deployment


def test_the_recorded_router_replayed_agrees_with_itself(db, capsys):
    record = replay(db, capsys, "--router", "tests.test_replay:LeastLoaded")
    result = record["result"]
    assert result["randomized"] is False and result["runs"] == 1
    d = only_deployment(record)
    assert d["recorded_router_classes"] == ["tests.test_replay.TracedLeastLoaded"]
    assert d["membership_inferred"] == 0 and d["replay"]["router_errors"]["mean"] == 0
    assert d["replay"]["agreement"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    recorded, replayed = d["recorded"], d["replay"]
    assert replayed["first_tier_hit_rate"]["mean"] == recorded["rank0_rate"] < 1.0  # the full replica's requests
    assert {b: f["mean"] for b, f in replayed["ranks"].items()} == recorded["ranks"]
    assert {name: f["mean"] for name, f in replayed["imbalance"].items()} == recorded["imbalance"]
    for replica in d["replicas"]:
        assert replica["replay_share"]["mean"] == replica["recorded_share"]
        assert replica["replay_picks"]["mean"] == replica["recorded_routed"]


def test_a_traced_class_replays_as_its_router_and_ships_nothing(db, capsys, tmp_path, monkeypatch):
    (tmp_path / "sink").mkdir()
    sink = tmp_path / "sink" / "events-{pid}.jsonl"
    monkeypatch.setenv("ROUTELENS_JSONL_PATH", str(sink))
    traced = replay(db, capsys, "--router", "tests.test_replay:TracedLeastLoaded",
                    "--kwargs", json.dumps({"jsonl_path": str(sink)}))
    plain = replay(db, capsys, "--router", "tests.test_replay:LeastLoaded")
    assert not list((tmp_path / "sink").iterdir())
    traced, plain = only_deployment(traced), only_deployment(plain)
    # The traced class explains its decisions (ExplainedLeastLoaded), the plain one does not: all else is alike.
    assert traced["replay"].pop("reasons") and plain["replay"].pop("reasons") == []
    assert traced == plain


def test_the_replayed_routers_reasons_are_counted_beside_the_recorded_ones(db, capsys, recording):
    _, events = recording
    sent = Counter(e["reason"] for e in events if e["type"] == "decision")
    assert set(sent) == {"light", "loaded"}  # every decision explained, both ways
    d = only_deployment(replay(db, capsys, "--router", "tests.test_replay:TracedLeastLoaded"))
    recorded = {r["reason"]: r["decisions"] for r in d["recorded"]["reasons"]}
    # The recorded router, on the inputs it had: the same reasons, as often.
    replayed = {r["reason"]: r["decisions"] for r in d["replay"]["reasons"]}
    assert recorded == sent
    assert replayed == {reason: {"mean": n, "low": n, "high": n} for reason, n in sent.items()}


def expected_figures(events, order):
    """A single-replica-rank router's figures, worked out from the recorded events: `order(decision)`
    is its ranking of a decision's candidates (every ranked replica, with their recorded inputs)."""
    decisions = {e["id"]: e for e in events if e["type"] == "decision"}
    real = {e["decision_id"]: e["replica_id"] for e in events if e["type"] == "routed"}
    ranks, picks, hits, agreements = Counter(), Counter(), 0, 0
    for decision_id, replica in real.items():
        decision = decisions[decision_id]
        inputs = decision["replicas"]
        assert set(inputs) == {f"replica{i:03d}" for i in range(N_REPLICAS)}
        assert all(c["queue_len"] is not None and c["queue_len_age_s"] < 10 for c in inputs.values())
        ranking = order(decision)
        rank = ranking.index(replica)
        ranks[str(rank) if rank < 5 else "5+"] += 1
        hits += rank == 0
        # Ray takes the first rank whose replica is below capacity.
        pick = next(r for r in ranking if inputs[r]["queue_len"] < MAX_ONGOING)
        picks[pick] += 1
        agreements += pick == replica
    n = len(real)
    return {"first_tier_hit_rate": hits / n, "agreement": agreements / n,
            "ranks": {b: ranks[b] / n for b in ("0", "1", "2", "3", "4", "5+", "absent")},
            "shares": {r: picks[r] / n for r in sorted(picks)}}


def by_load_descending(decision):
    inputs = decision["replicas"]
    return sorted(inputs, key=lambda r: (-_load(inputs[r]["stats"]), r))


def by_queue_len(decision):
    inputs = decision["replicas"]
    return sorted(inputs, key=lambda r: (inputs[r]["queue_len"], r))


@pytest.mark.parametrize("router, order", [("MostLoaded", by_load_descending), ("FewestQueued", by_queue_len)])
def test_another_routers_figures_are_its_rule_applied_to_the_recorded_inputs(db, capsys, recording, router, order):
    d = only_deployment(replay(db, capsys, "--router", f"tests.test_replay:{router}"))
    expected = expected_figures(recording[1], order)
    replayed = d["replay"]
    assert replayed["first_tier_hit_rate"]["mean"] == pytest.approx(expected["first_tier_hit_rate"])
    assert replayed["agreement"]["mean"] == pytest.approx(expected["agreement"])
    assert {b: f["mean"] for b, f in replayed["ranks"].items()} == pytest.approx(expected["ranks"])
    shares = {r["replica_id"]: r["replay_share"]["mean"] for r in d["replicas"] if r["replay_share"]["mean"]}
    assert shares == pytest.approx(expected["shares"])
    assert expected["agreement"] < 1.0  # another router: the figures are not the recorded ones


POW_2 = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"


def test_a_randomized_router_is_reproducible_and_reported_with_intervals(db, capsys):
    window = ("--since", "0", "--until", "4000000000")
    first = replay(db, capsys, "--router", POW_2, "--runs", "4", "--seed", "7", *window)
    again = replay(db, capsys, "--router", POW_2, "--runs", "4", "--seed", "7", *window)
    other = replay(db, capsys, "--router", POW_2, "--runs", "4", "--seed", "8", *window)
    assert first["id"] != again["id"]
    assert first["result"] == again["result"]
    assert other["result"]["deployments"] != first["result"]["deployments"]
    result = first["result"]
    assert result["randomized"] is True and result["runs"] == 4 and len(set(result["run_seeds"])) == 4
    d = only_deployment(first)
    agreement = d["replay"]["agreement"]
    assert 0 <= agreement["low"] < agreement["mean"] < agreement["high"] <= 1
    # Pow-2 ranks two of the four replicas: the real one is often not ranked at all.
    assert d["replay"]["ranks"]["absent"]["mean"] > 0.2
    assert sum(r["replay_share"]["mean"] for r in d["replicas"]) == pytest.approx(1.0)


def test_the_stored_replay_is_what_the_command_printed_and_the_api_serves_it(db, capsys):
    printed = replay(db, capsys, "--router", "tests.test_replay:MostLoaded", "--app", "offline")
    later = replay(db, capsys, "--router", "tests.test_replay:LeastLoaded")
    collector = Collector(db)
    try:
        assert collector.get(f"/v1/replays/{printed['id']}") == printed
        assert collector.get(f"/v1/replays/{printed['id'].upper()}") == printed
        listed = collector.get("/v1/replays")["replays"]
        assert [r["id"] for r in listed] == [later["id"], printed["id"]]
        assert listed[1] == {k: v for k, v in printed.items() if k != "result"}
        assert printed["filters"] == {"app": ["offline"]} and printed["router_class"] == "tests.test_replay:MostLoaded"
        assert collector.http.get("/v1/replays/0b7e4a4c-1d8e-4a7e-9c51-2f6b1c3f9a10").status_code == 404
        assert collector.http.get("/v1/replays/not-a-uuid").status_code == 422
        assert collector.get("/v1/replays", limit=1)["replays"] == listed[:1]
    finally:
        collector.close()
    guarded = Collector(db, token="s3cret")
    try:
        assert guarded.http.get("/v1/replays").status_code == 401
        assert guarded.http.get(f"/v1/replays/{printed['id']}").status_code == 401
        answer = guarded.http.get(f"/v1/replays/{printed['id']}", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and answer.json() == printed
    finally:
        guarded.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runs_replayed_in_one_pass_draw_what_each_draws_alone(db, monkeypatch):
    """The runs of a pass take turns over each batch of decisions: each must count what it counts alone."""
    monkeypatch.setattr(decisions, "BATCH", 7)  # many turns over the recording's few hundred decisions
    cls = RouterSpec(POW_2).load()
    window = Filters(since=0, until=4e9)
    engine = make_engine(db)
    try:
        with engine.connect() as connection:
            together = decisions._replay_pass(connection, window, cls, {}, [11, 12, 13], lambda n: None,
                                              ClusterGuard())
            alone = [decisions._replay_pass(connection, window, cls, {}, [seed], lambda n: None, ClusterGuard())[0]
                     for seed in (11, 12, 13)]
    finally:
        engine.dispose()
    assert [run.tally for run in together] == [run.tally for run in alone]
    assert [run.fingerprint for run in together] == [run.fingerprint for run in alone]
    assert together[0].tally != together[1].tally  # three draws, not one


def test_the_tables_fit_80_columns_and_name_the_stored_replay(db, capsys):
    capsys.readouterr()
    assert routelens(["replay", "--db", db, "--router", POW_2, "--runs", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= 80
    assert "offline/offline" in out and "share of replica003" in out and "±" in out
    replay_id = lines[-1].rpartition(" ")[2]
    collector = Collector(db)
    try:
        assert collector.get(f"/v1/replays/{replay_id}")["result"]["runs"] == 3
    finally:
        collector.close()


@pytest.mark.parametrize("args, message", [
    (["--router", "tests.no_such_module:X"], "cannot import tests.no_such_module"),
    (["--router", "tests.test_replay:NoSuchClass"], "tests.test_replay has no NoSuchClass"),
    (["--router", "tests.test_replay:Filters"], "is not a RequestRouter subclass"),
    (["--router", "ray.serve.request_router:RequestRouter"], "is abstract"),
    (["--router", "LeastLoaded"], "expected package.module:Class"),
    (["--router", "tests.test_replay:LeastLoaded", "--kwargs", "{nope"], "--kwargs: not JSON"),
    (["--router", "tests.test_replay:LeastLoaded", "--kwargs", "[1]"], "expected a JSON object"),
    (["--router", "tests.test_replay:NeedsSetting"], "cannot be built"),
    (["--router", "tests.test_replay:LeastLoaded", "--since", "0", "--until", "100"], "no recorded decisions"),
    (["--router", "tests.test_replay:LeastLoaded", "--app", "nobody"], "no recorded decisions"),
])
def test_bad_input_is_one_line_and_stores_nothing(db, capsys, args, message):
    assert message in refused(db, capsys, *args)


def test_runs_and_modes_not_offered_are_refused_by_the_parser(db, capsys):
    for args in (["--runs", "1"], ["--mode", "closed-loop"], ["--seed", "-1"], ["--max-ongoing-requests", "0"]):
        with pytest.raises(SystemExit) as exited:
            routelens(["replay", "--db", db, "--router", "tests.test_replay:LeastLoaded", *args])
        assert exited.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith("routelens replay: error: argument")


def test_without_ray_the_command_says_what_to_install(db, tmp_path):
    result = run_python(textwrap.dedent(f"""
        import sys
        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, NoRay())
        from routelens.collector.cli import main
        sys.exit(main(["replay", "--db", {db!r}, "--router", "tests.test_replay:LeastLoaded"]))
    """), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("routelens replay: ") and 'pip install "ray[serve]' in line
    assert stored_replays(db) == 0


ACTOR_ROUTERS = '''
import ray
from ray.serve.request_router import RequestRouter


class CallsAnActor(RequestRouter):
    """Asks an actor from choose_replicas, as Ray's prefix-aware router asks its prefix tree."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ray.get(ray.get_actor("routelens-test-tally").count.remote())
        return [candidate_replicas]


class CatchesTheRefusal(CallsAnActor):
    """Falls back when its actor does not answer, as routers do."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        try:
            return await super().choose_replicas(candidate_replicas, pending_request)
        except Exception:
            return [candidate_replicas]
'''


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the refusal does not depend on the database
def test_routers_that_call_a_cluster_are_refused_in_one_line_without_starting_ray(db, tmp_path):
    """Both modes, a router that lets the refusal through and one that catches it, from a module of
    the current directory; in a child process, whose timeout stops a replay that would hang (or
    start Ray) rather than refuse."""
    (tmp_path / "actor_routers.py").write_text(ACTOR_ROUTERS)
    result = run_python(f"""
        import ray
        from routelens.collector.cli import main
        db = {db!r}
        codes = [main(["replay", "--db", db, "--router", "actor_routers:CallsAnActor"]),
                 main(["replay", "--db", db, "--mode", "simulate", "--router", "actor_routers:CatchesTheRefusal"])]
        print(codes, ray.is_initialized())
    """, cwd=tmp_path)
    assert result.stdout.split() == ["[2,", "2]", "False"], result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"routelens replay: {router} cannot be replayed: CallsAnActor.choose_replicas called ray.get_actor, which "
        "needs a Ray cluster; a replay runs the router in this process, without one (docs/replay.md, "
        "\"What cannot be replayed\")" for router in ("CallsAnActor", "CatchesTheRefusal")]
    assert stored_replays(db) == 0


def test_only_the_replays_thread_is_refused(monkeypatch):
    """In a process connected to Ray, Ray's own threads go on calling it while a replay runs. Ray's
    auto-init is stood in for: called for real, without a cluster, it would start one."""
    from ray._private import auto_init_hook

    calls = []
    monkeypatch.setattr(auto_init_hook, "auto_init_ray", lambda: calls.append(threading.current_thread().name))
    with pytest.raises(ClusterCallRefused):
        with refusing_cluster_calls():
            other = threading.Thread(target=lambda: auto_init_hook.auto_init_ray(), name="ray-long-poll")
            other.start()
            other.join()
            auto_init_hook.auto_init_ray()  # refused, and kept: raised again on the way out
            assert calls == ["ray-long-poll"]
    auto_init_hook.auto_init_ray()
    assert calls == ["ray-long-poll", "MainThread"]


def test_the_reader_rebuilds_every_candidate_with_its_recorded_inputs(db, recording):
    events = recording[1]
    sent = {e["id"]: e for e in events if e["type"] == "decision"}
    real = {e["decision_id"]: (e["replica_id"], e["rank"]) for e in events if e["type"] == "routed"}
    engine = make_engine(db)
    try:
        with engine.connect() as connection:
            read = list(recorded_decisions(connection, Filters(since=0, until=4e9)))
    finally:
        engine.dispose()
    assert [d.id for d in read] == sorted(sent)  # in id order (UUIDv7: time order)
    for d in read:
        e = sent[d.id]
        assert (d.app, d.deployment, d.internal_request_id, d.attempt) == (
            "offline", "offline", e["internal_request_id"], e["attempt"])
        assert d.ranks == e["ranks"] and len(d.members) == e["n_candidates"] == N_REPLICAS
        assert (d.chosen, d.chosen_rank) == real.get(d.id, (None, None))
        for candidate in d.candidates():
            inputs = e["replicas"][candidate.replica_id]
            assert candidate.max_ongoing_requests == MAX_ONGOING and candidate.node_id == "node-0"
            assert (candidate.queue_len, candidate.stats) == (inputs["queue_len"], inputs["stats"])
            assert candidate.queue_len_age_s == pytest.approx(inputs["queue_len_age_s"], abs=2e-6)
