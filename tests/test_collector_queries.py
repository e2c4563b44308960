"""The read API against truth computed here from the raw events sent.

One scenario (four traced routers of two deployments, five hours of traffic
with skew, retries, hand-offs, rejections, unknown ranks, stale stats, a
replica leaving, one router on wire format v1, whose answers carry no
queue lengths, and the others explaining most decisions, Ranker's with more
reasons than a deployment's bound) is stored once per backend through the real app; every
test reads it through the HTTP API and compares with figures computed from
the events as sent.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import uuid
from collections import Counter, defaultdict

import pytest

from routelens.collector.ingest.rollups import MAX_REASONS_PER_DEPLOYMENT
from routelens.collector.store.bins import BELIEF_ERROR, CHOOSE_US, LATENCY_MS, REGRET, STALENESS
from routelens.collector.store.models import ANSWER_QUEUE_LENS
from tests.support.collector_app import Collector
from tests.support.wire_source import WireSource

POW2 = "routelens.routers.examples.TracedPowerOfTwoChoicesRequestRouter"
UNIFORM = "routelens.routers.examples.TracedUniformRequestRouter"
MINUTE, HOUR = 60, 3600
# Five whole hours ago: the scenario's data lies in the past, in several hours.
BASE = (int(time.time()) // HOUR - 5) * HOUR
START, END = BASE + 7 * MINUTE + 13, BASE + 4 * HOUR + 3 * MINUTE
C7_LEAVES = BASE + 2 * HOUR  # replica c7 of Checkout is removed then
STATS_PERIOD_S = 5.0  # Ranker's replicas collect their routing stats this often
V1_SOURCE = "b1"  # an older tracer: wire format v1
CHECKOUT_REASONS = ("prefix match", "smallest tenant", "pow-2: imbalance")
RANKER_REASONS = tuple(f"bucket {n}" for n in range(MAX_REASONS_PER_DEPLOYMENT + 8))
CHECKOUT, RANKER = ("shop", "Checkout"), ("search", "Ranker")


def deployment_of(replica_id: str):
    """(app, deployment) of a replica of the scenario."""
    return CHECKOUT if replica_id.startswith("c") else RANKER


class Scenario:
    """The events sent, each with the source that sent it."""

    def __init__(self, seed: int = 3):
        rng = random.Random(seed)
        self.rng = rng
        self.reasons_rng = random.Random(seed + 1)  # the routers' explanations, apart from the traffic's draws
        self.sources = {
            "a1": WireSource("a1", "shop", "Checkout", POW2, {"router_version": "a", "zone": "eu"}),
            "a2": WireSource("a2", "shop", "Checkout", POW2, {"router_version": "a", "zone": "eu"}),
            "b1": WireSource("b1", "shop", "Checkout", POW2, {"router_version": "b", "zone": "eu"}),
            "u1": WireSource("u1", "search", "Ranker", UNIFORM, {"zone": "us"}),
        }
        self.sent = []  # (source info, event)
        a1, u1 = self.sources["a1"], self.sources["u1"]
        self._add(a1, a1.replicas(BASE, [f"c{i}" for i in range(1, 8)]))  # c6 never gets traffic
        self._add(a1, a1.replicas(C7_LEAVES, [f"c{i}" for i in range(1, 7)]))
        self._add(u1, u1.replicas(BASE, ["k1", "k2", "k3", "k4"]))  # k4 never gets traffic
        for k in range(100):  # routing stats changes, as the router sees them a little after collection
            for replica in ("k1", "k2", "k3"):
                collected = START + k * STATS_PERIOD_S
                self._add(u1, u1.stats(collected + rng.uniform(0, 1), replica, {"qps": k}, collected_at=collected))
        for n in range(1500):
            name = rng.choices(list(self.sources), weights=[3, 2, 2, 2])[0]
            self._request(self.sources[name], n, rng.uniform(START, END))

    def _add(self, source, event):
        self.sent.append((source.info, event))
        return event

    def _pool(self, source, ts):
        if source.info["deployment"] == "Ranker":
            return ["k1", "k2", "k3"], [5, 2, 1]
        if ts < C7_LEAVES:
            return ["c1", "c2", "c3", "c4", "c5", "c7"], [6, 3, 2, 1, 1, 1]
        return ["c1", "c2", "c3", "c4", "c5"], [6, 3, 2, 1, 1]

    def _ranks(self, pool, weights):
        rng = self.rng
        if rng.random() < 0.03:  # a deep ranking: every replica a rank of its own
            return [[r] for r in rng.sample(pool, len(pool))]
        chosen = []
        while len(chosen) < min(len(pool), rng.choice([1, 2, 3, 4])):
            pick = rng.choices(pool, weights=weights)[0]
            if pick not in chosen:
                chosen.append(pick)
        return [chosen[i:i + 2] for i in range(0, len(chosen), 2)]

    def _candidate(self):
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            return {"queue_len": rng.randint(0, 9)}  # stats never seen
        age = -0.002 if roll < 0.12 else rng.lognormvariate(-1.0, 1.3)  # clocks may disagree a little
        return {"queue_len": rng.randint(0, 9), "queue_len_age_s": rng.uniform(0, 2),
                "stats": {"qps": round(rng.uniform(0, 50), 2)}, "stats_age_s": age,
                "stats_age_source": rng.choice(["stamped", "observed"])}

    def _request(self, source, n, ts):
        rng = self.rng
        request_id, internal = f"req-{n}", str(uuid.UUID(int=rng.getrandbits(128)))
        pool, weights = self._pool(source, ts)
        attempts = rng.choice([1, 1, 1, 1, 2, 2, 3, 4])
        decision = None
        for attempt in range(attempts):
            ranks = self._ranks(pool, weights)
            candidates = {r: self._candidate() for rank in ranks for r in rank}
            decision = self._add(source, source.decision(
                ts + attempt * 0.05, ranks, candidates, request_id=request_id, internal_request_id=internal,
                attempt=attempt, duration_us=rng.randint(20, 3000), **self._explanation(source)))
        t = ts + attempts * 0.05
        if rng.random() < 0.1:  # a replica refuses the request first (a refusal of v2 names its decision)
            self._add(source, source.completed(t, rng.choice(pool), rejected=True, internal_request_id=internal,
                                               decision=None if source.info["source_id"] == V1_SOURCE else decision,
                                               quality=self._quality(source, rng.randint(0, 9))))
        if rng.random() < 0.05:  # never routed (cancelled)
            return
        ranks = decision["ranks"]
        index = min(rng.choices([0, 1, 2], weights=[75, 20, 5])[0], len(ranks) - 1)
        if len(ranks) > 5 and rng.random() < 0.5:
            index = 5
        replica = rng.choice(ranks[index])
        routed = self._add(source, source.routed(
            t + 0.001, replica, decision, rank=None if rng.random() < 0.05 else index,
            own_ranking=rng.random() >= 0.1, attempts=attempts,
            quality=self._quality(source, decision["replicas"][replica]["queue_len"])))
        self._add(source, source.completed(t + 0.002, replica, routed, latency_ms=rng.lognormvariate(2, 1),
                                           ok=rng.random() >= 0.05))

    def _explanation(self, source):
        """What the router says of a decision: nothing for the v1 tracer and one decision in ten."""
        rng = self.reasons_rng
        if source.info["source_id"] == V1_SOURCE or rng.random() < 0.1:
            return {}
        reasons = RANKER_REASONS if source.info["deployment"] == "Ranker" else CHECKOUT_REASONS
        return {"reason": rng.choice(reasons), "scores": {"match_rate": round(rng.random(), 3), "tenants": 3}}

    def _quality(self, source, believed):
        """An answer's (believed, shortest, reported) queue lengths; None where
        the tracer sends none (v1, or a router without a queue-length cache)."""
        rng = self.rng
        if source.info["source_id"] == V1_SOURCE or rng.random() < 0.1:
            return None
        return believed, rng.randint(0, believed), None if rng.random() < 0.1 else rng.randint(0, 12)

    def batches(self):
        """Each source's events in time order, 150 to a batch; the sources'
        batches interleaved at random, each source's in order. (Out of order
        within a source: see test_collector_ingest.)"""
        per_source = defaultdict(list)
        for info, event in sorted(self.sent, key=lambda pair: pair[1]["ts"]):
            per_source[info["source_id"]].append(event)
        queues = [[self.sources[name].batch(events[i:i + 150], schema_version=1 if name == V1_SOURCE else 3)
                   for i in range(0, len(events), 150)]
                  for name, events in per_source.items()]
        out = []
        while queues:
            queue = self.rng.choice(queues)
            out.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
        return out

    def events(self, since, until, exact=False, where=lambda info: True, kind=None):
        """Events in the window (widened to whole minutes, as panels are, unless
        `exact`) sent by sources for which `where(info)` holds."""
        if not exact:
            since, until = math.floor(since / MINUTE) * MINUTE, math.ceil(until / MINUTE) * MINUTE
        return [(info, e) for info, e in self.sent
                if since <= e["ts"] < until and where(info) and (kind is None or e["type"] == kind)]


SCENARIO = Scenario()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    """A collector holding the scenario (some batches sent twice)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('queries') / 'routelens.db'}"
        server = None
    else:
        server = request.getfixturevalue("postgres")
        url = server.new_database()
    collector = Collector(url)
    batches = SCENARIO.batches()
    for batch in batches + batches[::7]:  # re-sent batches must change nothing
        collector.store(batch)
    yield collector
    collector.close()
    if server is not None:
        server.drop(url)


# --- truth, from the events as sent ---

def truth(since, until, where=lambda info: True, replicas=None):
    """Every panel figure for the window, filtered to sources where `where`
    holds and (if given) to the replicas named."""
    events = SCENARIO.events(since, until, where=where)
    keep = (lambda r: r in replicas) if replicas is not None else (lambda r: True)
    routed_by = Counter()
    rank_counts = Counter()
    handoffs = rejections = completions = failures = 0
    rejections_by = Counter()
    attempts = []
    decisions = 0
    durations, latencies = [], []
    touched = set()  # replicas with a rollup row in the window
    ages = defaultdict(list)
    age_sources = defaultdict(Counter)
    by_deployment = defaultdict(Counter)  # (app, deployment) -> rank-hit counts
    attempts_by_deployment = defaultdict(list)
    # Decision quality: each answer's regret and belief error, per replica (design.md, Definitions).
    regrets, belief_errors = defaultdict(list), defaultdict(list)
    for info, e in events:
        kind = e["type"]
        deployment = by_deployment[(info["app"], info["deployment"])]
        regret, belief_error = answer_figures(e)
        if regret is not None and keep(e["replica_id"]):
            regrets[e["replica_id"]].append(regret)
        if belief_error is not None and keep(e["replica_id"]):
            belief_errors[e["replica_id"]].append(belief_error)
        if kind == "decision":
            decisions += 1
            deployment["decisions"] += 1
            durations.append(e["duration_us"])
            for replica_id, candidate in e["replicas"].items():
                if not keep(replica_id):
                    continue
                touched.add(replica_id)
                if candidate["stats_age_s"] is not None:
                    ages[replica_id].append(max(candidate["stats_age_s"], 0.0))
                    age_sources[replica_id][candidate["stats_age_source"]] += 1
        elif kind == "routed" and keep(e["replica_id"]):
            touched.add(e["replica_id"])
            routed_by[e["replica_id"]] += 1
            rank = e["rank"]
            rank_counts["unknown" if rank is None else ("5+" if rank >= 5 else str(rank))] += 1
            handoffs += e["own_ranking"] is False
            attempts.append(e["attempts"])
            deployment["routed"] += 1
            deployment["rank_0"] += rank == 0
            deployment["handoffs"] += e["own_ranking"] is False
            attempts_by_deployment[(info["app"], info["deployment"])].append(e["attempts"])
        elif kind == "completed" and keep(e["replica_id"]):
            touched.add(e["replica_id"])
            if e["rejected"]:
                rejections += 1
                rejections_by[e["replica_id"]] += 1
                deployment["rejections"] += 1
            else:
                completions += 1
                failures += e["ok"] is False
                latencies.append(e["latency_ms"])
    deployments = {s.info["deployment"] for s in SCENARIO.sources.values() if where(s.info)}
    members = set()
    if "Checkout" in deployments:
        members |= {f"c{i}" for i in range(1, 7)} | ({"c7"} if C7_LEAVES >= since else set())
    if "Ranker" in deployments:
        members |= {"k1", "k2", "k3", "k4"}
    listed = touched | {m for m in members if keep(m)}
    routed_total = sum(routed_by.values())
    return {
        "routed": {r: routed_by[r] for r in listed}, "routed_total": routed_total, "touched": touched,
        "rejections": {r: rejections_by[r] for r in listed}, "rejections_total": rejections,
        "ranks": rank_counts, "handoffs": handoffs, "decisions": decisions, "completions": completions,
        "failures": failures, "attempts_mean": statistics.mean(attempts) if attempts else None,
        "ages": ages, "age_sources": age_sources, "durations": durations, "latencies": latencies,
        "by_deployment": {key: counts for key, counts in by_deployment.items() if counts},
        "attempts_by_deployment": attempts_by_deployment,
        "regrets": regrets, "belief_errors": belief_errors,
    }


def answer_figures(e):
    """(regret, belief error) of an event, by the definitions (design.md); None where unknown (no answer: a
    decision, a completion of an accepted request; an answer of v1 or of a router without a queue-length cache)."""
    answer = e["type"] == "routed" or (e["type"] == "completed" and e["rejected"])
    if not answer or e.get("believed_queue_len") is None:
        return None, None
    believed, shortest, reported = e["believed_queue_len"], e["shortest_queue_len"], e["reported_queue_len"]
    regret = None if shortest is None else believed - shortest
    if reported is None:
        return regret, None
    # An accepting replica counts the request it accepted (and so is at 1 or more); a refusing one does not.
    before = reported if e["type"] == "completed" else max(reported - 1, 0)
    return regret, believed - before


def check_quality(got: dict, regrets: list, belief_errors: list, where: str) -> None:
    """Decision-quality figures (the API's) against the answers' values."""
    regret, belief = got["regret"], got["belief_error"]
    assert regret["samples"] == len(regrets) and belief["samples"] == len(belief_errors), where
    if not regrets:
        assert regret["mean"] is regret["p95"] is regret["positive_share"] is None, where
    else:
        assert regret["mean"] == pytest.approx(statistics.mean(regrets)), where
        assert regret["max"] == max(regrets), where
        assert regret["positive_share"] == pytest.approx(sum(r > 0 for r in regrets) / len(regrets)), where
        # Whole numbers, in bins of one request up to 4: exact there, else exact to the bin.
        assert REGRET.column(regret["p95"]) == REGRET.column(nearest_rank(regrets, 0.95)), where
    if not belief_errors:
        assert belief["mean"] is belief["mean_abs"] is belief["p95_abs"] is None, where
    else:
        sizes = [abs(e) for e in belief_errors]
        assert belief["mean"] == pytest.approx(statistics.mean(belief_errors)), where
        assert belief["mean_abs"] == pytest.approx(statistics.mean(sizes)), where
        assert belief["max_abs"] == max(sizes), where
        assert BELIEF_ERROR.column(belief["p95_abs"]) == BELIEF_ERROR.column(nearest_rank(sizes, 0.95)), where


def imbalance(counts):
    mean = sum(counts) / len(counts)
    return {"max_over_mean": max(counts) / mean, "cv": statistics.pstdev(counts) / mean,
            "jain": sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))}


def nearest_rank(values, q):
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def same_bin(reported, raw):
    return STALENESS.column(reported) == STALENESS.column(raw)


FULL = {"since": BASE, "until": BASE + 5 * HOUR}
# Not on minute or hour boundaries: hour rollups inside, minute rollups at the edges.
ODD = {"since": BASE + HOUR + 23 * MINUTE + 17, "until": BASE + 3 * HOUR + 41 * MINUTE + 5}
LATE = {"since": C7_LEAVES + 10 * MINUTE, "until": END + MINUTE}

FILTERS = {
    "all": ({}, lambda info: True, None),
    "app": ({"app": "search"}, lambda info: info["app"] == "search", None),
    "deployment": ({"deployment": "Checkout"}, lambda info: info["deployment"] == "Checkout", None),
    "router_class": ({"router_class": UNIFORM}, lambda info: info["router_class"] == UNIFORM, None),
    "label": ({"label": "router_version=a"}, lambda info: info["labels"].get("router_version") == "a", None),
    "labels": ({"label": ["zone=eu", "router_version=b"]},
               lambda info: info["labels"] == {"zone": "eu", "router_version": "b"}, None),
    "replica": ({"replica": ["c1", "c4"]}, lambda info: True, {"c1", "c4"}),
    "two_apps": ({"app": ["shop", "search"], "label": "zone=eu"}, lambda info: info["labels"]["zone"] == "eu",
                 None),
}
WINDOWS = {"full": FULL, "odd": ODD, "late": LATE}


def per_deployment(per_replica: dict) -> dict:
    """{replica: value} -> {(app, deployment): {replica: value}}."""
    out = defaultdict(dict)
    for replica_id, value in per_replica.items():
        out[deployment_of(replica_id)][replica_id] = value
    return dict(out)


def worst_first(values):
    """Whether values run from the worst (lowest) to the best, those without one last."""
    known = [v for v in values if v is not None]
    return known == sorted(known) and values == known + [None] * (len(values) - len(known))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", FILTERS)
def test_distribution(api, name, window):
    params, where, replicas = FILTERS[name]
    w = WINDOWS[window]
    expected = truth(w["since"], w["until"], where, replicas)
    got = api.get("/v1/distribution", **w, **params)
    assert {r["replica_id"]: r["routed"] for r in got["replicas"]} == expected["routed"]
    assert {r["replica_id"]: r["rejections"] for r in got["replicas"]} == expected["rejections"]
    assert all((r["app"], r["deployment"]) == deployment_of(r["replica_id"]) for r in got["replicas"])
    assert got["routed"] == expected["routed_total"] > 0
    # Figures that compare replicas, per deployment only: no index over all of them.
    assert "imbalance" not in got and "fair_share" not in got
    by_deployment = per_deployment(expected["routed"])
    deployments = {(d["app"], d["deployment"]): d for d in got["deployments"]}
    assert set(deployments) == set(by_deployment)
    assert worst_first([d["imbalance"]["jain"] for d in got["deployments"]])
    for key, counts in by_deployment.items():
        d, total = deployments[key], sum(counts.values())
        assert (d["routed"], d["replicas"]) == (total, len(counts)), key
        assert d["fair_share"] == pytest.approx(total / len(counts)), key
        assert d["imbalance"] == (pytest.approx(imbalance(list(counts.values()))) if total else
                                  {"max_over_mean": None, "cv": None, "jain": None}), key
        # Every member is in zone az-1 (see WireSource.replicas), each on a node of its own.
        assert d["by_availability_zone"] == [{"availability_zone": "az-1", "replicas": len(counts), "routed": total,
                                              "share": 1.0 if total else None}], key
        assert {g["node_id"]: g["routed"] for g in d["by_node"]} == {f"node-{r}": n for r, n in counts.items()}
    for replica in got["replicas"]:
        total = sum(by_deployment[deployment_of(replica["replica_id"])].values())
        assert replica["share"] == (pytest.approx(replica["routed"] / total) if total else None)


@pytest.mark.parametrize("params", [{"replica": "no-such-replica"}, {"app": "no-such-app"},
                                    {"label": "router_version=z"}])
def test_filters_matching_nothing(api, params):
    dist = api.get("/v1/distribution", **FULL, **params)
    assert (dist["routed"], dist["replicas"], dist["deployments"]) == (0, [], [])
    summary = api.get("/v1/summary", **FULL, **params)
    assert (summary["decisions"], summary["routed"], summary["rank0_rate"], summary["deployments"]) == (0, 0, None, [])
    assert summary["imbalance"] == {"app": None, "deployment": None, "max_over_mean": None, "cv": None, "jain": None}
    assert summary["staleness"] == {"app": None, "deployment": None, "p95_s": None, "stats_period_s": None,
                                    "p95_over_period": None}
    staleness = api.get("/v1/staleness", **FULL, **params)
    assert (staleness["deployments"], staleness["replicas"]) == ([], [])
    assert api.get("/v1/decisions", **FULL, **params)["decisions"] == []
    assert api.get("/v1/timeseries", **FULL, **params)["points"] == []


def test_idle_members_are_in_the_distribution(api):
    got = {r["replica_id"]: r for r in api.get("/v1/distribution", **FULL)["replicas"]}
    assert (got["c6"]["routed"], got["c6"]["member"]) == (0, True)
    assert (got["k4"]["routed"], got["k4"]["member"]) == (0, True)
    assert got["c7"]["routed"] > 0  # a member until it left, inside this window
    assert "c7" not in {r["replica_id"] for r in api.get("/v1/distribution", **LATE)["replicas"]}


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", FILTERS)
def test_rank_hits(api, name, window):
    params, where, replicas = FILTERS[name]
    w = WINDOWS[window]
    expected = truth(w["since"], w["until"], where, replicas)
    got = api.get("/v1/rank-hits", **w, **params)
    total = expected["routed_total"]
    assert got["routed"] == total
    assert {r["rank"]: r["routed"] for r in got["ranks"]} == \
        {k: expected["ranks"][k] for k in ("0", "1", "2", "3", "4", "5+", "unknown")}
    assert {r["rank"]: r["share"] for r in got["ranks"]} == \
        pytest.approx({k: expected["ranks"][k] / total for k in ("0", "1", "2", "3", "4", "5+", "unknown")})
    assert expected["ranks"]["unknown"] > 0 and expected["ranks"]["1"] > 0
    assert got["rank0_rate"] == pytest.approx(expected["ranks"]["0"] / total)
    assert got["handoffs"] == expected["handoffs"] > 0
    assert got["handoff_rate"] == pytest.approx(expected["handoffs"] / total)
    assert got["rejections"] == expected["rejections_total"]
    # Per replica: those with any traffic in the window (ranked, routed or refusing).
    assert {r["replica_id"]: (r["routed"], r["rejections"]) for r in got["replicas"]} == \
        {r: (expected["routed"][r], expected["rejections"][r]) for r in expected["touched"]}
    deployments = {(d["app"], d["deployment"]): d for d in got["deployments"]}
    assert worst_first([d["rank0_rate"] for d in got["deployments"]])
    # Filtered to replicas: the deployments they belong to.
    expected_deployments = {key: counts for key, counts in expected["by_deployment"].items()
                            if replicas is None or key in {deployment_of(r) for r in replicas}}
    assert set(deployments) == set(expected_deployments)
    for key, counts in expected_deployments.items():
        d = deployments[key]
        assert (d["routed"], d["handoffs"], d["rejections"]) == \
            (counts["routed"], counts["handoffs"], counts["rejections"]), key
        assert d["rank0_rate"] == pytest.approx(counts["rank_0"] / counts["routed"]), key
        if replicas is None:
            assert d["decisions"] == counts["decisions"], key
            assert d["decisions_per_request_mean"] == \
                pytest.approx(statistics.mean(expected["attempts_by_deployment"][key])), key
    # Decision quality: over everything in view, per deployment, per replica.
    regrets, belief_errors = expected["regrets"], expected["belief_errors"]
    check_quality(got["decision_quality"], sum(regrets.values(), []), sum(belief_errors.values(), []), "all")
    for key in expected_deployments:
        of = [r for r in set(regrets) | set(belief_errors) if deployment_of(r) == key]
        check_quality(deployments[key]["decision_quality"], sum((regrets[r] for r in of), []),
                      sum((belief_errors[r] for r in of), []), str(key))
    for replica in got["replicas"]:
        check_quality(replica["decision_quality"], regrets.get(replica["replica_id"], []),
                      belief_errors.get(replica["replica_id"], []), replica["replica_id"])
    if name == "all" and window == "full":
        assert sum(map(len, regrets.values())) > 100 and any(e < 0 for v in belief_errors.values() for e in v)
    if replicas is None:  # decisions are a router's, not a replica's
        assert got["decisions"] == expected["decisions"]
        assert got["decisions_per_request"]["mean"] == pytest.approx(expected["attempts_mean"])
        durations = expected["durations"]
        assert got["choose_us"]["max"] == max(durations)
        assert got["choose_us"]["mean"] == pytest.approx(statistics.mean(durations))
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            assert CHOOSE_US.column(got["choose_us"][key]) == CHOOSE_US.column(nearest_rank(durations, q))


REASON_FILTERS = {
    "all": ({}, lambda info: True, None),
    "label": ({"label": "router_version=a"}, lambda info: info["labels"].get("router_version") == "a", None),
    "reasons": ({"reason": ["prefix match", "bucket 3"]}, lambda info: True, {"prefix match", "bucket 3"}),
    # The reasons of the replica's deployment's routers; decisions, a router's, are unknown per replica.
    "replica": ({"replica": "c1"}, lambda info: info["deployment"] == "Checkout", None),
}


@pytest.mark.parametrize("window", ["full", "odd"])
@pytest.mark.parametrize("name", REASON_FILTERS)
def test_decisions_per_reason(api, name, window):
    """Rank hits' reasons: per deployment, decisions per reason over the window and per step; Ranker's
    reasons beyond the bound counted together as other."""
    params, where, reasons = REASON_FILTERS[name]
    w = WINDOWS[window]
    sent = [(info, e) for info, e in SCENARIO.events(w["since"], w["until"], where=where, kind="decision")]
    got = api.get("/v1/rank-hits", **w, **params)["reasons"]
    deployments = {(d["app"], d["deployment"]): d for d in got["deployments"]}
    expected = defaultdict(Counter)
    decisions = Counter()
    for info, e in sent:
        key = (info["app"], info["deployment"])
        decisions[key] += 1
        if e.get("reason") is not None and (reasons is None or e["reason"] in reasons):
            expected[key][e["reason"]] += 1
    assert set(deployments) == set(expected)
    for key, counts in expected.items():
        d = deployments[key]
        named = {r["reason"]: r["decisions"] for r in d["reasons"] if not r["other"]}
        other = sum(r["decisions"] for r in d["reasons"] if r["other"])
        assert d["explained"] == sum(counts.values()) == sum(named.values()) + other, key
        assert all(counts[reason] == n for reason, n in named.items()), key
        assert [r["decisions"] for r in d["reasons"]] == sorted((r["decisions"] for r in d["reasons"]), reverse=True)
        assert sum(r["decisions"] for p in d["points"] for r in p["reasons"]) == d["explained"], key
        if name == "replica":
            assert (d["decisions"], d["unexplained"]) == (None, None) and d["reasons"][0]["share"] is None, key
        else:
            assert d["decisions"] == decisions[key], key
            assert d["unexplained"] == (None if reasons else decisions[key] - d["explained"]), key
        if key == RANKER and reasons is None:  # more reasons than the bound: the rest counted as other
            assert len(named) == MAX_REASONS_PER_DEPLOYMENT and other > 0
        else:
            assert named == counts and other == 0, key


def test_decisions_filtered_by_reason_carry_their_scores(api):
    w = ODD
    wanted = {"smallest tenant", "bucket 3"}
    sent = {e["id"]: e for _, e in SCENARIO.events(w["since"], w["until"], exact=True, kind="decision")
            if e.get("reason") in wanted}
    ids, _ = _all_pages(api, 97, **w, reason=sorted(wanted))
    assert set(ids) == set(sent) and sent
    page = api.get("/v1/decisions", **w, reason="smallest tenant", limit=5)["decisions"]
    assert page and all((d["reason"], d["scores"]) == (sent[d["id"]]["reason"], sent[d["id"]]["scores"])
                        for d in page)
    unexplained = next(e for _, e in SCENARIO.events(w["since"], w["until"], exact=True, kind="decision")
                       if "reason" not in e)
    got = api.get(f"/v1/decisions/{unexplained['id']}")
    assert (got["reason"], got["scores"]) == (None, None)


@pytest.mark.parametrize("params, periods", [({}, {RANKER: STATS_PERIOD_S, CHECKOUT: None}),
                                             ({"app": "search"}, {RANKER: STATS_PERIOD_S}),
                                             ({"app": "shop"}, {CHECKOUT: None})])
def test_stats_period_is_each_deployments_own(api, params, periods):
    """Ranker's replicas report stats every STATS_PERIOD_S; Checkout's none."""
    got = api.get("/v1/staleness", **FULL, **params)["deployments"]
    assert {(d["app"], d["deployment"]): d["stats_period_s"] for d in got} == periods
    for d in got:
        assert d["p95_over_period"] == (d["p95_s"] / d["stats_period_s"] if d["stats_period_s"] else None)


def test_rank_5_and_deeper_are_counted_together(api):
    expected = truth(**FULL)
    assert expected["ranks"]["5+"] > 0
    got = api.get("/v1/rank-hits", **FULL)
    assert {r["rank"]: r["routed"] for r in got["ranks"]}["5+"] == expected["ranks"]["5+"]


def in_us(seconds: float) -> float:
    """Stats ages are kept in whole microseconds, as raw rankings store them."""
    return round(seconds * 1e6) / 1e6


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", ["all", "label", "app", "replica"])
def test_staleness(api, name, window):
    params, where, replicas = FILTERS[name]
    w = WINDOWS[window]
    expected = truth(w["since"], w["until"], where, replicas)
    got = api.get("/v1/staleness", **w, **params)
    assert got["bin_bounds_s"] == list(STALENESS.bounds)
    by_replica = {r["replica_id"]: r for r in got["replicas"]}
    assert set(expected["ages"]) <= set(by_replica)
    for replica_id, row in by_replica.items():
        ages = expected["ages"].get(replica_id, [])
        assert row["samples"] == len(ages)
        assert (row["stamped"], row["observed"]) == (expected["age_sources"][replica_id]["stamped"],
                                                     expected["age_sources"][replica_id]["observed"])
        if not ages:
            assert row["p50_s"] is None and row["max_s"] is None
            continue
        assert row["max_s"] == in_us(max(ages))
        for q, key in ((0.5, "p50_s"), (0.95, "p95_s")):
            assert same_bin(row[key], nearest_rank(ages, q)), (replica_id, key, row[key], nearest_rank(ages, q))
            assert row[key] <= row["max_s"]
    assert all((r["app"], r["deployment"]) == deployment_of(r["replica_id"]) for r in got["replicas"])
    # Per deployment, and no figure over all of them.
    assert "overall" not in got and "stats_period_s" not in got
    deployments = {(d["app"], d["deployment"]): d for d in got["deployments"]}
    for key, ages_by_replica in per_deployment(expected["ages"]).items():
        every = [age for ages in ages_by_replica.values() for age in ages]
        d = deployments[key]
        assert d["samples"] == len(every), key
        assert d["max_s"] == in_us(max(every)), key
        assert same_bin(d["p50_s"], nearest_rank(every, 0.5)), key
        assert same_bin(d["p95_s"], nearest_rank(every, 0.95)), key


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", ["all", "deployment", "labels", "replica"])
def test_summary(api, name, window):
    params, where, replicas = FILTERS[name]
    w = WINDOWS[window]
    expected = truth(w["since"], w["until"], where, replicas)
    got = api.get("/v1/summary", **w, **params)
    assert got["routed"] == expected["routed_total"]
    assert (got["completions"], got["failures"], got["rejections"], got["handoffs"]) == \
        (expected["completions"], expected["failures"], expected["rejections_total"], expected["handoffs"])
    assert got["replicas"] == len(expected["routed"])
    if replicas is None:
        assert got["decisions"] == expected["decisions"]
    # Per deployment, least balanced first; the overview's imbalance and staleness are the worst deployment's.
    routed, ages = per_deployment(expected["routed"]), per_deployment(expected["ages"])
    deployments = {(d["app"], d["deployment"]): d for d in got["deployments"]}
    assert set(deployments) == set(routed)
    assert worst_first([d["imbalance"]["jain"] for d in got["deployments"]])
    for key, counts in routed.items():
        d = deployments[key]
        assert (d["routed"], d["replicas"]) == (sum(counts.values()), len(counts)), key
        assert d["imbalance"] == pytest.approx(imbalance(list(counts.values()))), key
        every = [age for replica_ages in ages.get(key, {}).values() for age in replica_ages]
        assert same_bin(d["staleness"]["p95_s"], nearest_rank(every, 0.95)), key
    worst = got["deployments"][0]
    assert got["imbalance"] == {"app": worst["app"], "deployment": worst["deployment"], **worst["imbalance"]}
    stalest = max(got["deployments"], key=lambda d: (d["staleness"]["p95_over_period"] is not None,
                                                       d["staleness"]["p95_over_period"] or d["staleness"]["p95_s"]))
    assert got["staleness"] == {"app": stalest["app"], "deployment": stalest["deployment"], **stalest["staleness"]}
    for q, key in ((0.5, "latency_ms_p50"), (0.99, "latency_ms_p99")):
        assert LATENCY_MS.column(got[key]) == LATENCY_MS.column(nearest_rank(expected["latencies"], q))


TIMESERIES_SUMS = ("decisions", "routed", "completions", "rejections", "handoffs", "failures", "rank_0")


@pytest.mark.parametrize("window, step", [
    ("full", "1m"), ("full", "1h"), ("full", "5m"), ("odd", "1m"), ("odd", "5m"), ("odd", "7m"), ("odd", "1h"),
    ("odd", None), ("late", "2h"),
])
def test_timeseries_sums_equal_window_totals(api, window, step):
    w = WINDOWS[window]
    params = {**w, **({"step": step} if step else {})}
    points = api.get("/v1/timeseries", **params)["points"]
    summary = api.get("/v1/summary", **w)
    rank_hits = api.get("/v1/rank-hits", **w)
    totals = {name: sum(p[name] for p in points) for name in TIMESERIES_SUMS}
    assert totals == {"decisions": summary["decisions"], "routed": summary["routed"],
                      "completions": summary["completions"], "rejections": summary["rejections"],
                      "handoffs": summary["handoffs"], "failures": summary["failures"],
                      "rank_0": {r["rank"]: r["routed"] for r in rank_hits["ranks"]}["0"]}
    # Decision quality per step (its own steps): each deployment's answers add up to the window's.
    over_time = {(d["app"], d["deployment"]): d["points"]
                 for d in rank_hits["decision_quality_over_time"]["deployments"]}
    for figure in ("regret", "belief_error"):
        for deployment in rank_hits["deployments"]:
            assert sum(p[figure]["samples"] for p in over_time.get((deployment["app"], deployment["deployment"]), [])) \
                == deployment["decision_quality"][figure]["samples"] > 0
    step_s = api.get("/v1/timeseries", **params)["step_s"]
    assert all(p["t"] % step_s == 0 for p in points)
    m0, m1 = math.floor(w["since"] / MINUTE) * MINUTE, math.ceil(w["until"] / MINUTE) * MINUTE
    assert all(m0 - step_s < p["t"] < m1 for p in points)


# A day: steps of an hour, read from hourly rows (shorter windows' steps are whole minutes).
DAY = {"since": BASE + 5 * HOUR - 24 * HOUR, "until": BASE + 5 * HOUR}


@pytest.mark.parametrize("window", ["odd", "day"])
@pytest.mark.parametrize("replicas", [None, ["c1"], ["k2", "k3"]], ids=["deployments", "c1", "k2-k3"])
def test_decision_quality_over_time(api, window, replicas):
    """Each step's figures against the answers sent in that step: per
    deployment, and filtered to replicas, theirs (a replica's over time)."""
    w = {**WINDOWS, "day": DAY}[window]
    over_time = api.get("/v1/rank-hits", **w, **({} if replicas is None else {"replica": replicas}))[
        "decision_quality_over_time"]
    step = over_time["step_s"]
    assert step == {"odd": 300, "day": HOUR}[window]
    expected = defaultdict(lambda: ([], []))  # (deployment, step) -> (regrets, belief errors)
    for _, e in SCENARIO.events(w["since"], w["until"]):
        figures = answer_figures(e)
        if figures != (None, None) and (replicas is None or e["replica_id"] in replicas):
            for values, value in zip(expected[deployment_of(e["replica_id"]), e["ts"] // step * step], figures):
                if value is not None:
                    values.append(value)
    got = {((d["app"], d["deployment"]), p["t"]): p for d in over_time["deployments"] for p in d["points"]}
    assert set(got) == {key for key, figures in expected.items() if figures != ([], [])} and len(got) > 3
    for key, point in got.items():
        check_quality(point, *expected[key], str(key))


def test_hours_and_minute_edges_give_the_minutes_totals(api):
    """ODD covers two whole hours (hour rollups) and minutes on both sides."""
    expected = truth(**ODD)
    summary = api.get("/v1/summary", **ODD)
    minutes = api.get("/v1/timeseries", **ODD, step="1m")["points"]
    assert summary["routed"] == sum(p["routed"] for p in minutes) == expected["routed_total"]
    assert summary["decisions"] == sum(p["decisions"] for p in minutes) == expected["decisions"]
    per_replica = api.get("/v1/timeseries", **ODD, step="1m", per_replica="true")["points"]
    by_replica = Counter()
    for point in per_replica:
        by_replica[point["replica_id"]] += point["routed"]
    assert {r: n for r, n in by_replica.items() if n} == {r: n for r, n in expected["routed"].items() if n}


def test_catalogue(api):
    got = api.get("/v1/deployments", since=BASE, until=time.time() + 60)
    assert got["apps"] == ["search", "shop"]
    assert got["labels"] == {"router_version": ["a", "b"], "zone": ["eu", "us"]}
    routers = {(d["deployment"], r["router_class"], tuple(sorted(r["labels"].items()))):
               sorted(s["source_id"] for s in r["sources"]) for d in got["deployments"] for r in d["routers"]}
    assert routers == {
        ("Checkout", POW2, (("router_version", "a"), ("zone", "eu"))): ["a1", "a2"],
        ("Checkout", POW2, (("router_version", "b"), ("zone", "eu"))): ["b1"],
        ("Ranker", UNIFORM, (("zone", "us"),)): ["u1"],
    }


# --- drill-down ---

def _all_pages(api, limit, **params):
    ids, cursor, pages = [], None, 0
    while True:
        page = api.get("/v1/decisions", limit=limit, **params, **({"cursor": cursor} if cursor else {}))
        ids += [d["id"] for d in page["decisions"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, pages


@pytest.mark.parametrize("name", ["all", "label", "app", "replica"])
def test_decision_pages_hold_every_decision_once_newest_first(api, name):
    params, where, replicas = FILTERS[name]
    w = ODD
    sent = SCENARIO.events(w["since"], w["until"], exact=True, where=where, kind="decision")
    if replicas is not None:  # decisions whose request was routed to one of these replicas
        routed_to = {e["decision_id"] for _, e in SCENARIO.events(w["since"], w["until"], exact=True)
                     if e["type"] == "routed" and e["replica_id"] in replicas}
        sent = [(info, e) for info, e in sent if e["id"] in routed_to]
    ids, pages = _all_pages(api, 97, **w, **params)
    assert len(ids) == len(set(ids))
    assert set(ids) == {e["id"] for _, e in sent}
    assert ids == sorted(ids, key=lambda i: uuid.UUID(i).bytes, reverse=True)
    assert pages == len(ids) // 97 + 1


def test_decisions_of_one_request(api):
    internal, events = next((internal, events) for internal, events in _requests().items()
                            if sum(e["type"] == "decision" for e in events) == 3)
    request_id = next(e["request_id"] for e in events if e["type"] == "decision")
    for asked in (request_id, internal):
        got = api.get("/v1/decisions", **FULL, request_id=asked)["decisions"]
        assert [d["attempt"] for d in got] == [2, 1, 0]
        assert {d["internal_request_id"] for d in got} == {internal}


def _requests():
    by_request = defaultdict(list)
    for _, e in SCENARIO.sent:
        if e.get("internal_request_id"):
            by_request[e["internal_request_id"]].append(e)
    return by_request


def test_decision_detail(api):
    internal, events = next(
        (internal, events) for internal, events in _requests().items()
        if sum(e["type"] == "decision" for e in events) >= 2 and any(e["type"] == "routed" for e in events)
        and any(e["type"] == "completed" and e["rejected"] and e.get("decision_id") for e in events))
    routed = next(e for e in events if e["type"] == "routed")
    decision = next(e for e in events if e["id"] == routed["decision_id"])
    done = next(e for e in events if e["type"] == "completed" and not e["rejected"])
    got = api.get(f"/v1/decisions/{decision['id']}")
    assert (got["id"], got["ts"], got["attempt"], got["request_id"], got["duration_us"]) == \
        (decision["id"], decision["ts"], decision["attempt"], decision["request_id"], decision["duration_us"])
    info = next(info for info, e in SCENARIO.sent if e is decision)
    assert (got["app"], got["deployment"], got["router_class"], got["labels"]) == \
        (info["app"], info["deployment"], info["router_class"], info["labels"])
    assert got["ranks"] == decision["ranks"]
    assert (got["reason"], got["scores"]) == (decision.get("reason"), decision.get("scores"))
    for rank_index, rank in enumerate(got["candidates"]):
        for candidate in rank:
            sent = decision["replicas"][candidate["replica_id"]]
            assert candidate["rank"] == rank_index
            assert candidate["queue_len"] == sent["queue_len"]
            for key in ("queue_len_age_s", "stats_age_s"):
                assert candidate[key] == (pytest.approx(sent[key], abs=1e-6) if sent[key] is not None else None)
            assert candidate["stats_age_source"] == sent["stats_age_source"]
            assert candidate["stats"] == (sent["stats"] or {})
    assert got["routed"]["id"] == routed["id"]
    assert (got["routed"]["replica_id"], got["routed"]["rank"], got["routed"]["own_ranking"],
            got["routed"]["attempts"]) == (routed["replica_id"], routed["rank"], routed["own_ranking"],
                                           routed["attempts"])
    assert (got["completed"]["id"], got["completed"]["latency_ms"], got["completed"]["ok"]) == \
        (done["id"], pytest.approx(done["latency_ms"]), done["ok"])
    other = got["request_events"]
    assert [d["id"] for d in other["decisions"]] == [e["id"] for e in events if e["type"] == "decision"]
    assert [r["id"] for r in other["routed"]] == [routed["id"]]
    assert sorted(c["id"] for c in other["completed"]) == sorted(e["id"] for e in events if e["type"] == "completed")
    # Each answer with its queue lengths as sent; a refusal names its decision too.
    sent = {e["id"]: e for e in events}
    assert all(r[name] == sent[r["id"]].get(name) for r in [got["routed"], *other["routed"]]
               for name in ("decision_id", *ANSWER_QUEUE_LENS))
    assert all(c[name] == sent[c["id"]].get(name) for c in other["completed"]
               for name in ("decision_id", *ANSWER_QUEUE_LENS))
    assert any(c["rejected"] and c["decision_id"] for c in other["completed"])


def test_unknown_and_bad_decision_ids(api):
    unknown = WireSource._id(BASE + 10)
    response = api.http.get(f"/v1/decisions/{unknown}")
    assert response.status_code == 404 and unknown in response.json()["detail"]
    response = api.http.get("/v1/decisions/not-a-uuid")
    assert response.status_code == 422 and "decision_id" in response.json()["detail"]
    response = api.http.get("/v1/decisions", params={"cursor": "nope", **FULL})
    assert response.status_code == 422 and "cursor" in response.json()["detail"]


@pytest.mark.parametrize("params, fragment", [
    ({"since": "yesterday"}, "since"),
    ({"until": "soon"}, "until"),
    ({"since": BASE + 100, "until": BASE}, "before"),
    ({"since": BASE, "until": BASE}, "before"),
    ({"window": "5x"}, "window"),
    ({"window": "0m"}, "window"),
    ({"window": "-1h"}, "window"),
    ({"since": "nan"}, "since"),
    ({"until": "inf"}, "until"),
    ({"since": "-inf"}, "since"),
    ({"since": "1e300"}, "since"),
    ({"until": "1e12"}, "until"),
    ({"since": "-5", "until": BASE}, "since"),
    ({"since": "0001-01-01T00:00:00Z"}, "since"),
    ({"since": "-1e300", "until": BASE}, "since"),
    ({"since": "2026-13-45T00:00:00Z"}, "since"),
    ({"label": "no-equals-sign"}, "label"),
    ({"label": "=value"}, "label"),
    ({"app": "sh\x00p"}, "app"),  # PostgreSQL cannot compare a NUL character: no 503 for it
    ({"replica": ["c1", "c\x002"]}, "replica"),
    ({"label": "zone=e\x00u"}, "label"),
    ({"model_id": "\x00"}, "model_id"),
])
@pytest.mark.parametrize("path", ["/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits",
                                  "/v1/timeseries", "/v1/decisions", "/v1/deployments", "/v1/sources"])
def test_bad_window_or_filter_is_422(api, path, params, fragment):
    response = api.http.get(path, params=params)
    assert response.status_code == 422, response.text
    assert fragment in str(response.json()["detail"])


@pytest.mark.parametrize("params", [{"step": "often"}, {"step": "0s"}, {"step": "9" * 400 + "w"}, {"limit": 0},
                                    {"limit": 100000}])
def test_bad_step_or_limit_is_422(api, params):
    path = "/v1/timeseries" if "step" in params else "/v1/decisions"
    assert api.http.get(path, params={**FULL, **params}).status_code == 422


@pytest.mark.parametrize("window", ["99999999999999999999999w", "9" * 400 + "w"])
def test_window_reaching_before_1970_starts_in_1970(api, window):
    got = api.get("/v1/summary", window=window, until=BASE + 5 * HOUR)
    assert got["window"]["since"] == 0
    assert got["routed"] == api.get("/v1/summary", **FULL)["routed"]


def test_iso_times_are_the_same_window(api):
    iso = {k: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v)) for k, v in ODD.items()}
    assert api.get("/v1/summary", **iso)["routed"] == api.get("/v1/summary", **ODD)["routed"]
