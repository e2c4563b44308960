"""The routing KPIs on /metrics (collector.api.routing_metrics): counted at
ingest, equal to what the read API says of the same data, once per stored
event, bounded in series, and valid for promtool."""

from __future__ import annotations

import subprocess
import time
from collections import defaultdict
from typing import Dict, FrozenSet, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.collector_app import Collector
from tests.support.prometheus import need_prometheus
from tests.support.wire_source import WireSource

Sample = Tuple[str, FrozenSet[Tuple[str, str]]]


def scrape(collector) -> Dict[Sample, float]:
    text = collector.http.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def pick(samples: Dict[Sample, float], name: str, **labels) -> Dict[FrozenSet[Tuple[str, str]], float]:
    """The samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key: value for (sample, key), value in samples.items() if sample == name and want <= key}


def one(samples, name: str, **labels) -> float:
    found = pick(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def by(samples, name: str, label: str, **labels) -> Dict[str, float]:
    return {dict(key)[label]: value for key, value in pick(samples, name, **labels).items()}


def traffic(src, t0: float):
    """Two batches of one deployment: members r1..r4 (r3 refuses, r4 idle), stamped and observed
    stats ages, ranks 0 to 6 and unknown, a hand-off, refusals, a failure, stats changes, decisions
    with and without a reason, one routed event without send_to_routed_ms (an older tracer's)."""
    members = ["r1", "r2", "r3", "r4"]
    first = [src.replicas(t0, members)]
    for i in range(12):
        t = t0 + 1 + i
        chosen = members[i % 2]
        decision = src.decision(t, [[chosen], ["r3"]], request_id=f"q{i}", duration_us=40 + 300 * i,
                                candidates={chosen: {"stats_age_s": 0.05 * i, "stats_age_source": "stamped"},
                                            "r3": {"stats_age_s": 2.5 + i, "stats_age_source": "observed"}},
                                reason=["fast path", "fallback", None][i % 3])
        rank = [0, 0, 1, 2, 6, None][i % 6]
        routed = src.routed(t + 0.01, chosen, decision, rank=rank, own_ranking=i != 5,
                            send_to_routed_ms=None if i == 3 else 0.4 * (i + 1))
        first += [decision, routed, src.completed(t + 0.02, chosen, routed, latency_ms=3.0 * (i + 1), ok=i != 7)]
    first += [src.completed(t0 + 3, "r3", rejected=True), src.completed(t0 + 4, "r3", rejected=True)]
    first += [src.stats(t0 + 2 + k, "r1", {"n": k}, collected_at=t0 + 2 + k) for k in range(4)]
    second = [src.decision(t0 + 30, [["r1"]], request_id="late"), src.completed(t0 + 31, "r2", rejected=True)]
    return first, second


# Counting is the same code on both databases, from what a batch stored: the tests of what the
# database tells it (a source's record before a batch, the members at start, a re-sent batch) run on both.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """One collector on SQLite for the tests that only read what it counted."""
    collector = Collector(f"sqlite:///{tmp_path_factory.mktemp('routing-metrics') / 'routelens.db'}")
    t0 = time.time() - 300
    src = WireSource("s1", app="shop", deployment="Checkout")
    first, second = traffic(src, t0)
    collector.store(src.batch(first, produced=len(first)))
    collector.store(src.batch(second, produced=len(first) + len(second) + 4, dropped={"queue_full": 4}))
    other = WireSource("s2", app="shop", deployment="Search")
    collector.store(other.batch([other.replicas(t0, ["a"]), other.decision(t0 + 1, [["a"]])]))
    yield collector, {"since": t0 - 60, "until": t0 + 600}
    collector.close()


def test_counters_equal_what_the_api_says_of_the_same_data(loaded):
    collector, window = loaded
    samples = scrape(collector)
    distribution = collector.get("/v1/distribution", **window)
    for replica in distribution["replicas"]:
        labels = {"app": replica["app"], "deployment": replica["deployment"], "replica": replica["replica_id"]}
        assert one(samples, "routelens_routed_requests_total", **labels) == replica["routed"], labels
        assert one(samples, "routelens_completed_requests_total", **labels) == replica["completions"], labels
        assert one(samples, "routelens_failed_requests_total", **labels) == replica["failures"], labels
        assert one(samples, "routelens_refusals_total", **labels) == replica["rejections"], labels
        assert one(samples, "routelens_replica_member", **labels) == 1
    assert by(samples, "routelens_routed_requests_total", "replica", deployment="Checkout")["r4"] == 0  # idle

    rank_hits = collector.get("/v1/rank-hits", **window)
    for deployment in rank_hits["deployments"]:
        labels = {"app": deployment["app"], "deployment": deployment["deployment"]}
        assert one(samples, "routelens_decisions_total", **labels) == deployment["decisions"]
        assert one(samples, "routelens_fifo_handoffs_total", **labels) == deployment["handoffs"]
    checkout = collector.get("/v1/rank-hits", app="shop", deployment="Checkout", **window)
    shares = {r["rank"]: r["routed"] for r in checkout["ranks"]}
    ranks = by(samples, "routelens_routed_requests_by_rank_total", "rank", deployment="Checkout")
    assert ranks == {"0": shares["0"], "1": shares["1"], "unknown": shares["unknown"],
                     "2+": shares["2"] + shares["3"] + shares["4"] + shares["5+"]}
    assert ranks["0"] / sum(ranks.values()) == checkout["rank0_rate"]
    (reasons,) = checkout["reasons"]["deployments"]
    assert by(samples, "routelens_decisions_by_reason_total", "reason", deployment="Checkout") == \
        {r["reason"]: r["decisions"] for r in reasons["reasons"]} == {"fast path": 4, "fallback": 4}


def test_histograms_have_the_rollups_bins_and_the_staleness_split_by_age_source(loaded):
    collector, window = loaded
    samples = scrape(collector)
    staleness = collector.get("/v1/staleness", app="shop", deployment="Checkout", **window)
    (deployment,) = staleness["deployments"]
    both = defaultdict(float)
    for source in ("stamped", "observed"):
        buckets = pick(samples, "routelens_stats_staleness_seconds_bucket", deployment="Checkout", age_source=source)
        cumulative = sorted((float(dict(k)["le"]), v) for k, v in buckets.items())
        assert [le for le, _ in cumulative] == [*staleness["bin_bounds_s"], float("inf")]
        previous = 0.0
        for i, (_le, count) in enumerate(cumulative):
            both[i] += count - previous
            previous = count
        assert previous == deployment[source]  # stamped and observed counted apart, as the API does
    assert [both[i] for i in range(len(both))] == deployment["histogram"]
    # Sums of what was sent (traffic()): ages 0.05 i stamped, 2.5 + i observed; 40 + 300 i us; 3 (i + 1) ms.
    assert one(samples, "routelens_stats_staleness_seconds_sum", deployment="Checkout", age_source="stamped") == \
        pytest.approx(sum(0.05 * i for i in range(12)))
    assert one(samples, "routelens_stats_staleness_seconds_sum", deployment="Checkout", age_source="observed") == \
        pytest.approx(sum(2.5 + i for i in range(12)))
    assert one(samples, "routelens_choose_replicas_duration_seconds_count", deployment="Checkout") == 13
    assert one(samples, "routelens_choose_replicas_duration_seconds_sum", deployment="Checkout") == \
        pytest.approx((sum(40 + 300 * i for i in range(12)) + 120) / 1e6)
    assert one(samples, "routelens_request_latency_seconds_sum", deployment="Checkout") == \
        pytest.approx(sum(3.0 * (i + 1) for i in range(12)) / 1e3)
    latency = by(samples, "routelens_request_latency_seconds_bucket", "le", deployment="Checkout")
    assert latency["0.005"] == 1 and latency["0.01"] == 3 and latency["+Inf"] == 12  # 3 ms; 3, 6, 9; all
    # Send to routed: 0.4 (i + 1) ms, but request 3's routed event had none: unknown, so not counted.
    assert one(samples, "routelens_send_to_routed_seconds_sum", deployment="Checkout") == \
        pytest.approx(sum(0.4 * (i + 1) for i in range(12) if i != 3) / 1e3)
    held = by(samples, "routelens_send_to_routed_seconds_bucket", "le", deployment="Checkout")
    assert held["0.0005"] == 1 and held["0.002"] == 4 and held["+Inf"] == 11  # 0.4; 0.4, 0.8, 1.2, 2.0; all
    assert collector.get("/v1/rank-hits", app="shop", deployment="Checkout", **window)["send_to_routed_ms"][
        "samples"] == 11
    assert one(samples, "routelens_stats_period_seconds", deployment="Checkout") == \
        deployment["stats_period_s"] == 1.0


def test_source_health_counts_what_each_new_batch_changed(collector, make_source):
    src = make_source("s1")
    t = time.time()
    for seq, dropped, produced in ((2, {"queue_full": 1}, 10), (1, {}, 5), (4, {"queue_full": 3}, 20),
                                   (6, {"queue_full": 3, "spool_full": 2}, 30), (5, {"queue_full": 2}, 25)):
        collector.store(src.batch([src.decision(t + seq, [["r1"]])], seq=seq, dropped=dropped, produced=produced))
    collector.store(src.batch([], seq=6, dropped={"queue_full": 3, "spool_full": 2}, produced=30))  # re-sent
    samples = scrape(collector)
    labels = {"source_id": "s1", "app": "shop", "deployment": "Checkout"}
    (source,) = collector.get("/v1/sources", window="1h")["sources"]
    skipped = one(samples, "routelens_source_batches_skipped_total", **labels)
    late = one(samples, "routelens_source_batches_late_total", **labels)
    assert (skipped, late) == (3, 2)  # 1, 3 and 5 skipped over; 1 and 5 came late
    assert skipped - late == source["batch_gaps"] == 1
    assert by(samples, "routelens_source_events_dropped_total", "reason", **labels) == source["dropped"] == \
        {"queue_full": 3, "spool_full": 2}
    assert one(samples, "routelens_source_events_produced_total", **labels) == source["produced"] == 30
    assert one(samples, "routelens_source_last_batch_timestamp_seconds", **labels) == \
        pytest.approx(source["last_seen"])


def test_a_resent_batch_counts_nothing(collector, make_source):
    src = make_source("s1", app="shop", deployment="Checkout")
    first, _second = traffic(src, time.time() - 300)
    before = scrape(collector)
    collector.store(src.batch(first, seq=7))
    once = scrape(collector)
    collector.store(src.batch(first, seq=7))
    twice = scrape(collector)

    def routing(samples):
        return {key: value for key, value in samples.items()
                if not key[0].startswith(("routelens_events", "routelens_ingest", "routelens_source_last_batch"))}

    assert routing(once) != routing(before)  # counted the first time...
    assert routing(twice) == routing(once)  # ...and only then


@SQLITE_ONLY
def test_replicas_beyond_the_limit_share_the_label_other(make_collector, make_source):
    collector = make_collector(metrics_replica_limit=2)
    src = make_source("s1")
    t = time.time() - 100
    events = [src.replicas(t, ["r1", "r2", "r3", "r4"])]
    for i, replica in enumerate(["r1", "r2", "r3", "r4", "r4"]):
        decision = src.decision(t + i, [[replica]])
        events += [decision, src.routed(t + i + 0.1, replica, decision)]
    collector.store(src.batch(events))
    samples = scrape(collector)
    routed = by(samples, "routelens_routed_requests_total", "replica")
    assert routed == {"r1": 1, "r2": 1, "_other": 3}
    assert one(samples, "routelens_metrics_overflow_total", kind="replica") == 2


@SQLITE_ONLY
def test_reasons_beyond_a_deployments_bound_are_counted_together(make_collector, make_source, monkeypatch):
    """Stored with each decision whatever the bound; counted by name up to it, in the rollups and on
    /metrics, and the rest together (the rollups' other reasons, the label _other)."""
    monkeypatch.setattr("routelens.collector.ingest.writer.MAX_REASONS_PER_DEPLOYMENT", 2)
    collector = make_collector()
    src = make_source("s1", app="shop", deployment="Checkout")
    t = time.time() - 100
    reasons = ["a", "b", "c", "c", "d"]
    collector.store(src.batch([src.decision(t + i, [["r1"]], reason=reasons[i]) for i in range(2)]))
    collector.store(src.batch([src.decision(t + i, [["r1"]], reason=reasons[i]) for i in range(2, 5)]))
    window = {"since": t - 60, "until": t + 60}
    (got,) = collector.get("/v1/rank-hits", **window)["reasons"]["deployments"]
    assert [(r["reason"], r["other"], r["decisions"]) for r in got["reasons"]] == [
        (None, True, 3), ("a", False, 1), ("b", False, 1)]
    assert by(scrape(collector), "routelens_decisions_by_reason_total", "reason") == {"a": 1, "b": 1, "_other": 3}
    stored = collector.get("/v1/decisions", **window, reason="c")["decisions"]
    assert [d["reason"] for d in stored] == ["c", "c"]


def test_membership_gauges_follow_the_newest_replicas_event_and_are_seeded_at_start(collector, make_source,
                                                                                    db_url):
    src = make_source("s1")
    t = time.time() - 100
    collector.store(src.batch([src.replicas(t, ["r1", "r2", "r3"])]))
    collector.store(src.batch([src.replicas(t + 10, ["r1", "r3", "r4"])]))
    collector.store(src.batch([src.replicas(t + 5, ["r1", "r2"])]))  # late, older news: changes nothing
    assert by(scrape(collector), "routelens_replica_member", "replica") == {"r1": 1, "r2": 0, "r3": 1, "r4": 1}
    restarted = Collector(db_url)  # a new process on the same database: the members, before any batch
    try:
        samples = scrape(restarted)
        assert by(samples, "routelens_replica_member", "replica") == {"r1": 1, "r3": 1, "r4": 1}
        assert by(samples, "routelens_routed_requests_total", "replica") == {"r1": 0, "r3": 0, "r4": 0}
        assert one(samples, "routelens_decisions_total", app="shop", deployment="Checkout") == 0
    finally:
        restarted.close()


@SQLITE_ONLY
def test_routing_metrics_can_be_left_off(make_collector, make_source):
    collector = make_collector(routing_metrics=False)
    src = make_source("s1")
    collector.store(src.batch([src.decision(time.time(), [["r1"]])]))
    names = {name for name, _labels in scrape(collector)}
    assert "routelens_events_ingested_total" in names
    assert not {name for name in names if name.startswith(("routelens_decisions", "routelens_routed"))}


def test_promtool_finds_the_exposition_valid(loaded):
    need_prometheus()
    collector, _window = loaded

    def check(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)

    bad = check("# HELP requests Requests.\n# TYPE requests counter\nrequests 1\n")
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr  # it does lint
    result = check(collector.http.get("/metrics").text)
    assert result.returncode == 0, result.stdout + result.stderr
