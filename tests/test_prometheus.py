"""The alert rules and the Grafana dashboard under a real Prometheus (Debian's
package), scraping a real collector fed with wire-format batches as traced
routers send them: promtool accepts the rules, every dashboard and rule query
returns what the read API says of the same window, and the alerts fire on
what they describe. (The tracer's batches from a real Serve deployment, into
the same ingest: tests/test_collector_e2e.py.)"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from routelens.collector.settings import Settings
from tests.support.collector_server import CollectorServer
from tests.support.dashboard_checks import api_figures, check_dashboard_and_rules, sample_times
from tests.support.prometheus import DASHBOARD, RULES, PrometheusServer, alert_key, need_prometheus, shortened_rules
from tests.support.wire_source import WireSource

TOKEN = "prometheus-scrapes-with-this"
TRAFFIC_S = 6  # seconds, a batch from each router each; the shortened rules' windows are 20 s
STATS_STOP_S = 3  # when one replica of shop/Models stops sending its routing stats


def test_promtool_accepts_the_rules_and_refuses_a_broken_copy(tmp_path):
    need_prometheus()
    checked = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(open(RULES).read().replace("sum by (app, deployment, replica) (rate(",
                                                 "sum by (app, deployment, replica) (rate((", 1))
    assert subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True).returncode != 0


def test_the_dashboard_is_a_grafana_dashboard_with_app_and_deployment_variables():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"app", "deployment"} <= set(variables)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        if "routelens_source" not in json.dumps(panel["targets"]) and "routelens_events" not in \
                json.dumps(panel["targets"]) and "routelens_batches" not in json.dumps(panel["targets"]) and \
                "routelens_ingest" not in json.dumps(panel["targets"]):
            assert all('app=~"$app"' in t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("distribution", "imbalance", "rank", "staleness", "refus", "source"):
        assert subject in titles, subject


class Traffic:
    """Three traced routers as the tracer would send, once a second: `shop/Checkout`
    routes to r1 and r2 of its members r1-r3 (r3 idle), refused now and then, its
    tracer dropping events; `shop/Search` loses every third batch; `shop/Models`
    ranks m1 and m2 on their stamped stats (a period of 1 s), until m2's stop
    coming and its router ranks it on ever older ones."""

    def __init__(self, collector: CollectorServer):
        self.url = collector.url
        self.checkout = WireSource("checkout-proxy", app="shop", deployment="Checkout")
        self.search = WireSource("search-proxy", app="shop", deployment="Search")
        self.models = WireSource("models-proxy", app="shop", deployment="Models")
        import httpx

        self.http = httpx.Client(base_url=collector.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        self.dropped = 0

    def send(self, source: WireSource, events, **batch) -> None:
        answer = self.http.post("/v1/events", json=source.batch(events, **batch))
        assert answer.status_code == 200, answer.text

    def members(self) -> None:
        t = time.time()
        self.send(self.checkout, [self.checkout.replicas(t, ["r1", "r2", "r3"])])
        self.send(self.search, [self.search.replicas(t, ["s1", "s2"])])
        self.send(self.models, [self.models.replicas(t, ["m1", "m2"])])

    def second(self, i: int) -> None:
        t = time.time()
        events = []
        for k in range(6):
            chosen = ("r1", "r2")[k % 2]
            decision = self.checkout.decision(t, [[chosen], ["r3"]], request_id=f"c{i}-{k}",
                                              candidates={chosen: {"stats_age_s": 0.2 * k,
                                                                   "stats_age_source": "stamped"}})
            routed = self.checkout.routed(t + 0.001, chosen, decision, rank=k % 3, own_ranking=k != 4,
                                          send_to_routed_ms=0.3 + k)
            events += [decision, routed, self.checkout.completed(t + 0.002, chosen, routed, latency_ms=5.0 + k)]
        events.append(self.checkout.completed(t, "r2", rejected=True))
        events.append(self.checkout.stats(t, "r1", {"n": i}, collected_at=t))
        self.dropped += 2
        self.send(self.checkout, events, dropped={"queue_full": self.dropped})
        decision = self.search.decision(t, [["s1", "s2"]], request_id=f"s{i}")
        search_events = [decision, self.search.routed(t + 0.001, "s1", decision)]
        if i % 3 == 2:
            self.search.seq += 1  # a batch lost on the way
        self.send(self.search, search_events)
        self.send(self.models, self.models_second(t, i))

    def models_second(self, t: float, i: int) -> list:
        m2_age = 0.2 if i < STATS_STOP_S else 3.5 + i - STATS_STOP_S  # its last stats, ever older
        events = [self.models.stats(t, "m1", {"n": i}, collected_at=t)]
        if i < STATS_STOP_S:
            events.append(self.models.stats(t, "m2", {"n": i}, collected_at=t))
        for k in range(4):
            chosen = ("m1", "m2")[k % 2]
            decision = self.models.decision(t, [["m1", "m2"]], request_id=f"m{i}-{k}", candidates={
                "m1": {"stats_age_s": 0.2, "stats_age_source": "stamped"},
                "m2": {"stats_age_s": m2_age, "stats_age_source": "stamped"}})
            events += [decision, self.models.routed(t + 0.001, chosen, decision, rank=0)]
        return events


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A collector (with a token) scraped every second by Prometheus with the shortened
    rules, TRAFFIC_S seconds of traffic, then everything settled and scraped."""
    need_prometheus()
    tmp = tmp_path_factory.mktemp("prometheus")
    settings = Settings(db_url=f"sqlite:///{tmp / 'routelens.db'}", token=TOKEN, retention_s=None,
                        minute_rollup_retention_s=None)
    with CollectorServer(settings) as collector:
        with PrometheusServer([f"127.0.0.1:{collector.port}"], [shortened_rules(str(tmp))], token=TOKEN) as prom:
            traffic = Traffic(collector)
            traffic.members()  # the series exist, at 0, before any request
            selector = 'routelens_routed_requests_total{replica="r1"}'
            prom.wait_for(lambda: len(sample_times(prom, selector)) >= 2, 30, "two scrapes before the traffic")
            since = sample_times(prom, selector)[-1]
            for i in range(TRAFFIC_S):
                started = time.monotonic()
                traffic.second(i)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
            sent_at = time.time()
            prom.wait_for(lambda: sample_times(prom, selector)[-1] > sent_at + 0.1, 30, "a scrape after the traffic")
            until = sample_times(prom, selector)[-1]
            yield {"prom": prom, "collector": collector, "traffic": traffic, "since": since, "until": until}
            traffic.http.close()


def firing(prom: PrometheusServer):
    return {alert_key(a["labels"]) for a in prom.alerts() if a["state"] == "firing"}


def test_alerts_fire_on_stale_stats_an_idle_replica_dropped_events_and_lost_batches(scraped):
    """First, while the traffic is within the rules' windows."""
    prom = scraped["prom"]
    expected = {("RoutelensRoutingStatsStale", "Models"), ("RoutelensReplicaWithoutTraffic", "r3"),
                ("RoutelensTracerDroppingEvents", "checkout-proxy"), ("RoutelensTracerLosingBatches", "search-proxy")}
    prom.wait_for(lambda: expected <= firing(prom), 30, f"{expected} firing")
    fired = firing(prom)
    assert not fired & {("RoutelensReplicaWithoutTraffic", "r1"), ("RoutelensTracerDroppingEvents", "search-proxy"),
                        ("RoutelensRoutingStatsStale", "Checkout"), ("RoutelensRoutingStatsStale", "Search")}, fired
    assert "RoutelensCollectorDown" not in {name for name, _ in fired}
    (stale,) = [a for a in prom.alerts() if a["labels"]["alertname"] == "RoutelensRoutingStatsStale"]
    assert float(stale["value"]) > 3 and "Staleness" in stale["annotations"]["description"]
    # What the alert tells to open: one replica's stats stale, not all.
    staleness = scraped["traffic"].http.get("/v1/staleness", params={"window": "1h", "deployment": "Models"}).json()
    ages = {replica["replica_id"]: replica["max_s"] for replica in staleness["replicas"]}
    assert ages["m2"] > 3 * staleness["deployments"][0]["stats_period_s"] > ages["m1"]


def test_every_dashboard_and_rule_query_equals_the_api_over_the_same_window(scraped):
    traffic = scraped["traffic"]

    def get(path, **params):
        answer = traffic.http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    check_dashboard_and_rules(scraped["prom"], api_figures(get, {"window": "1h"}), scraped["since"], scraped["until"])


def test_the_collector_down_alert_fires_when_it_stops_answering(scraped):
    """Last: the collector goes away; Prometheus says so."""
    prom = scraped["prom"]
    scraped["collector"]._server.should_exit = True
    scraped["collector"]._thread.join(timeout=30)
    prom.wait_for(lambda: any(name == "RoutelensCollectorDown" for name, _ in firing(prom)), 30,
                  "RoutelensCollectorDown firing")
    annotations = {a["labels"]["alertname"]: a["annotations"] for a in prom.alerts()}
    for name, notes in annotations.items():
        assert notes["summary"] and "routelens" in (notes["summary"] + notes["description"]).lower(), name
