"""The Grafana dashboard's and the rules' queries, run by a real Prometheus,
against what routelens' read API says of the same window.

Prometheus extrapolates `increase` and `rate` to the edges of their range.
Given a range that ends exactly at a sample and begins at a sample taken
before any traffic (the series at 0), or before the series existed when
each was born at 0 (Prometheus then extrapolates to that 0, no further), it
extrapolates nothing: over that range a query over counters sees exactly
what the collector counted, which is what the API says of a window holding
all the traffic.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest

from routelens.collector.store.bins import STALENESS
from tests.support.prometheus import PrometheusServer, dashboard_queries, grafana_expr, rule_exprs

# The counters the comparisons below read: each must be at 0 at its first sample in the range (module docstring).
COMPARED_COUNTERS = ("routelens_routed_requests_total", "routelens_routed_requests_by_rank_total",
                     "routelens_fifo_handoffs_total", "routelens_refusals_total",
                     "routelens_stats_staleness_seconds_bucket")
RANK_GROUPS = {"0": "0", "1": "1", "2": "2+", "3": "2+", "4": "2+", "5+": "2+", "unknown": "unknown"}


def sample_times(prom: PrometheusServer, selector: str, seconds: int = 600) -> List[float]:
    """Timestamps of the scrapes that saw `selector` (its first series), oldest first."""
    series = prom.samples(selector, seconds)
    return [float(ts) for ts, _value in series[0]["values"]] if series else []


class Evaluator:
    """Queries evaluated at `until` over the range (since, until], both scrape times."""

    def __init__(self, prom: PrometheusServer, since: float, until: float):
        self.prom, self.until = prom, until
        self.range = f"{round((until - since) * 1000)}ms"
        self.seconds = round((until - since) * 1000) / 1000

    def panel(self, expr: str) -> List[dict]:
        return self.prom.query(grafana_expr(expr, self.range, rate_interval=self.range), at=self.until)

    def rule(self, expr: str) -> List[dict]:
        """A rule's expression over the range, the recorded series it reads computed over it as well
        (Prometheus recorded them over their own windows)."""
        for name, recorded in rule_exprs().items():
            if name.startswith("routelens:"):
                expr = expr.replace(name, f"({recorded})")
        for window in ("[5m]", "[10m]"):
            expr = expr.replace(window, f"[{self.range}]")
        return self.prom.query(expr, at=self.until)


def keyed(result: List[dict], *labels: str) -> Dict[Tuple, float]:
    """Each series' value by its `labels`; NaN (a ratio of nothing to nothing) left out."""
    out = {}
    for series in result:
        key = tuple(series["metric"].get(label) for label in labels)
        assert key not in out, f"two series for {key}: {result}"
        value = float(series["value"][1])
        if not math.isnan(value):
            out[key] = value
    return out


@dataclass(frozen=True)
class ApiFigures:
    """What the read API says of one window: the figures the dashboard and the rules are held to."""
    distribution: dict
    rank_hits: dict
    staleness: dict
    ranks: Dict[Tuple[str, str], List[dict]]  # each deployment's routed requests by rank (its /v1/rank-hits)


def api_figures(get: Callable[..., dict], api_window: dict) -> ApiFigures:
    """Read through `get(path, **params)` (a parsed 200 answer); `api_window`: the window's parameters."""
    distribution = get("/v1/distribution", **api_window)
    ranks = {(d["app"], d["deployment"]): get("/v1/rank-hits", app=d["app"], deployment=d["deployment"],
                                              **api_window)["ranks"] for d in distribution["deployments"]}
    return ApiFigures(distribution, get("/v1/rank-hits", **api_window), get("/v1/staleness", **api_window), ranks)


# The events that the figures compared come from. Others go on arriving without traffic (a deployment's
# stamped routing stats change every period) and change none of them (the stats period aside: see below).
ROUTING_EVENTS = 'routelens_events_ingested_total{type=~"decision|routed|completed"}'


def scrape_after(prom: PrometheusServer, selector: str, after: float, timeout_s: float = 30) -> Tuple[float, float]:
    """The first scrape after `after` (epoch seconds) that saw `selector`: its time, and its series' sum then."""
    def found():
        sums: Dict[float, float] = defaultdict(float)
        for series in prom.samples(selector, 120):
            for ts, value in series["values"]:
                if float(ts) > after:
                    sums[float(ts)] += float(value)
        return min(sums.items()) if sums else None

    return prom.wait_for(found, timeout_s, f"a scrape of {selector} after {after:.3f}")


def figures_at_a_quiet_scrape(prom: PrometheusServer, get: Callable[..., dict], api_window: dict,
                              timeout_s: float = 60) -> Tuple[float, ApiFigures]:
    """Once the traffic has stopped: the API's figures, and the time of a scrape that counted
    exactly the events they were computed from. A scrape before the reading and one after it
    counted as many routing events stored: none was stored in between. Until then, again."""
    deadline = time.monotonic() + timeout_s
    before = scrape_after(prom, ROUTING_EVENTS, time.time())
    while True:
        figures = api_figures(get, api_window)
        after = scrape_after(prom, ROUTING_EVENTS, time.time())
        if after[1] == before[1]:
            return before[0], figures
        assert time.monotonic() < deadline, f"routing events still stored {timeout_s} s after the traffic stopped"
        before = after


def check_dashboard_and_rules(prom: PrometheusServer, api: ApiFigures, since: float, until: float) -> None:
    """Every dashboard query and recording rule returns the series it should, equal to
    the API's figures `api` of a window that holds all the traffic; alerts' queries run."""
    ev = Evaluator(prom, since, until)
    counted_before = {}
    for name in COMPARED_COUNTERS:
        for series in prom.samples(name, ev.seconds, at=until):
            if float(series["values"][0][1]):
                counted_before[tuple(sorted(series["metric"].items()))] = series["values"][0]
    assert not counted_before, f"series that counted before their first scrape in the range: {counted_before}"
    panels, rules = dashboard_queries(), rule_exprs()
    distribution, rank_hits, staleness = api.distribution, api.rank_hits, api.staleness
    deployments = {(d["app"], d["deployment"]) for d in distribution["deployments"]}
    assert deployments, "no traffic to compare"
    replicas = {(r["app"], r["deployment"], r["replica_id"]): r for r in distribution["replicas"]}
    routed_in = {(d["app"], d["deployment"]): d for d in distribution["deployments"]}
    hits = {(d["app"], d["deployment"]): d for d in rank_hits["deployments"]}
    refused = {(r["app"], r["deployment"], r["replica_id"]): r["rejections"] for r in rank_hits["replicas"]}
    approx = lambda value: pytest.approx(value, rel=1e-9, abs=1e-9)  # noqa: E731

    def panel(title: str, index: int = 0) -> List[dict]:
        return ev.panel(panels[title][index])

    # Distribution.
    per_replica = keyed(panel("Routed requests per replica"), "app", "deployment", "replica")
    assert per_replica == {key: approx(r["routed"]) for key, r in replicas.items()}
    jain = keyed(panel("Imbalance per deployment", 0), "app", "deployment")
    max_over_mean = keyed(panel("Imbalance per deployment", 1), "app", "deployment")
    busy = {key for key, d in routed_in.items() if d["routed"]}
    assert jain == {key: approx(routed_in[key]["imbalance"]["jain"]) for key in busy}
    assert max_over_mean == {key: approx(routed_in[key]["imbalance"]["max_over_mean"]) for key in busy}
    rates = keyed(panel("Routed requests/s per replica"), "app", "deployment", "replica")
    assert {key: rate * ev.seconds for key, rate in rates.items()} == \
        {key: approx(r["routed"]) for key, r in replicas.items()}
    shares = keyed(panel("Share of its deployment per replica"), "app", "deployment", "replica")
    assert shares == {key: approx(r["share"]) for key, r in replicas.items() if r["share"] is not None}

    # Rank hits.
    assert keyed(panel("Rank-0 hit rate"), "app", "deployment") == \
        {key: approx(d["rank0_rate"]) for key, d in hits.items() if d["routed"]}
    by_rank = keyed(panel("Routed requests by rank"), "app", "deployment", "rank")
    expected = defaultdict(float)
    for (app, deployment), ranks in api.ranks.items():
        for rank in ranks:
            expected[(app, deployment, RANK_GROUPS[rank["rank"]])] += rank["routed"]
    assert by_rank == {key: approx(value) for key, value in expected.items()}
    assert keyed(panel("FIFO hand-off rate"), "app", "deployment") == \
        {key: approx(d["handoff_rate"]) for key, d in hits.items() if d["routed"]}
    refusal_rates = keyed(panel("Refusals/s per replica"), "app", "deployment", "replica")
    assert {key: rate * ev.seconds for key, rate in refusal_rates.items()} == \
        {key: approx(refused.get(key, 0)) for key in replicas}
    refused_share = {key: d["rejections"] / (d["rejections"] + d["routed"])
                     for key, d in hits.items() if d["rejections"] + d["routed"]}
    assert keyed(panel("Refused share of send attempts"), "app", "deployment") == \
        {key: approx(value) for key, value in refused_share.items()}

    # The rules' figures, over the same range.
    assert keyed(ev.rule(rules["routelens:rank0_hit_rate:5m"]), "app", "deployment") == \
        {key: approx(d["rank0_rate"]) for key, d in hits.items() if d["routed"]}
    assert {key: rate * ev.seconds for key, rate in
            keyed(ev.rule(rules["routelens:routed_requests:rate5m"]), "app", "deployment", "replica").items()} == \
        {key: approx(r["routed"]) for key, r in replicas.items()}
    assert keyed(ev.rule(rules["routelens:refusal_ratio:5m"]), "app", "deployment") == \
        {key: approx(value) for key, value in refused_share.items()}

    # Staleness: Prometheus' p95 from the same bins lies in the bin of the API's (both interpolate within it).
    stale = {(d["app"], d["deployment"]): d for d in staleness["deployments"] if d["samples"]}
    p95 = keyed(ev.rule(rules["routelens:stats_staleness_p95_seconds:5m"]), "app", "deployment")
    assert set(p95) == set(stale)
    for key, value in p95.items():
        assert _bin(value) == _bin(stale[key]["p95_s"]), (key, value, stale[key]["p95_s"])
    over_period = keyed(ev.rule(rules["routelens:stats_staleness_p95_over_period:5m"]), "app", "deployment")
    assert set(over_period) == {key for key, d in stale.items() if d["stats_period_s"]}
    for key in over_period:
        # Stamped stats change every period, traffic or not: the newest 400 changes go on moving between the
        # last scrape and the API's answer, and their median interval with them, by a little.
        assert over_period[key] == pytest.approx(p95[key] / stale[key]["stats_period_s"], rel=0.05)

    # Every panel shows something (but counters by reason, whose series come with a first event of the reason:
    # dropped events, refused batches), and names only deployments of the window.
    for title, exprs in panels.items():
        results = [ev.panel(expr) for expr in exprs]
        assert any(results) or all("reason" in expr for expr in exprs), f"{title}: no series for {exprs}"
        for result in results:
            for series in result:
                labels = series["metric"]
                if "deployment" in labels:
                    assert (labels["app"], labels["deployment"]) in deployments, (title, labels)
    for expr in rules.values():
        prom.query(expr, at=until)  # alerts' expressions: valid PromQL over these series


def _bin(value: float) -> int:
    return bisect.bisect_left(STALENESS.bounds, value)
