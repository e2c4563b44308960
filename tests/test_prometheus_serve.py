"""Prometheus scraping a collector fed by a traced Serve deployment: the
Grafana dashboard's and the rules' queries equal what the read API says of
the same window, and the staleness alert fires when one replica's stats stop
arriving. (Without Serve, with more alerts: test_prometheus.py.)"""

from __future__ import annotations

import contextlib
import os
import time

import httpx
import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from routelens.collector.settings import Settings
from routelens.routers.examples import TracedModelAwareRequestRouter
from tests.support import serve_apps
from tests.support.collector_server import CollectorServer
from tests.support.dashboard_checks import check_dashboard_and_rules, sample_times
from tests.support.prometheus import PrometheusServer, PrometheusUnavailable, check_available, shortened_rules
from tests.support.serve_traffic import send_handle
from tests.support.system_deps import require
from tests.support.trace_checks import wait_for

pytestmark = pytest.mark.ray

TOKEN = "prometheus-scrapes-serve"
APP = "prom-stats"  # a name no other test deploys (a proxy keeps an app's router across redeploys)
REPLICAS = 3


@pytest.fixture(scope="module")
def deployed(serve_instance, tmp_path_factory):
    """The app (3 replicas on the model-then-locality router, which ranks every replica,
    stats stamped every second) traced to a collector that Prometheus scrapes every
    second; its series at 0 in two scrapes, then a few seconds of traffic, settled."""
    require(check_available, PrometheusUnavailable, "CI must test with Prometheus", "Prometheus unavailable")
    tmp = tmp_path_factory.mktemp("prometheus-serve")
    settings = Settings(db_url=f"sqlite:///{tmp / 'routelens.db'}", token=TOKEN, retention_s=None,
                        minute_rollup_retention_s=None)
    with contextlib.ExitStack() as stack:
        collector = stack.enter_context(CollectorServer(settings))
        prom = stack.enter_context(PrometheusServer([f"127.0.0.1:{collector.port}"], [shortened_rules(str(tmp))],
                                                    token=TOKEN))
        api = stack.enter_context(httpx.Client(base_url=collector.url, timeout=30,
                                               headers={"Authorization": f"Bearer {TOKEN}"}))
        config = RequestRouterConfig(request_router_class=TracedModelAwareRequestRouter,
                                     request_router_kwargs={"collector_url": collector.url, "token": TOKEN},
                                     request_routing_stats_period_s=1.0, request_routing_stats_timeout_s=1.0)
        stack.callback(serve_apps.delete_apps, [APP])  # before the collector and Prometheus stop
        handle = serve.run(serve_apps.StatsStopApp.options(request_router_config=config, num_replicas=REPLICAS)
                           .bind(str(tmp)), name=APP, route_prefix=f"/{APP}")
        selector = f'routelens_routed_requests_total{{app="{APP}"}}'
        prom.wait_for(lambda: len(prom.query(selector)) == REPLICAS and len(sample_times(prom, selector)) >= 2,
                      90, "every replica's series at 0, scraped twice")
        since = sample_times(prom, selector)[-1]
        for _ in range(8):  # about 8 s: some 50 requests a second
            send_handle(handle, 50, 25)
            time.sleep(0.5)
        window = {"window": "1h", "app": APP}

        def held_still(seen=[]) -> bool:
            time.sleep(2.5)  # longer than the exporter's flush interval and the refusals' grace period
            seen.append(api.get("/v1/summary", params=window).json()["completions"])
            return len(seen) > 1 and seen[-1] == seen[-2] > 0

        wait_for(held_still, timeout_s=60, what="the collector's totals to settle")
        settled = time.time()
        prom.wait_for(lambda: sample_times(prom, selector)[-1] > settled, 30, "a scrape after the traffic")
        yield {"prom": prom, "api": api, "handle": handle, "since": since,
               "until": sample_times(prom, selector)[-1], "window": window, "flag": os.path.join(tmp, "stale")}


def test_dashboard_and_rule_queries_equal_the_api_over_the_same_window(deployed):
    def get(path, **params):
        answer = deployed["api"].get(path, params={**params, "app": APP})
        assert answer.status_code == 200, answer.text
        return answer.json()

    check_dashboard_and_rules(deployed["prom"], get, deployed["since"], deployed["until"], {"window": "1h"})


def test_the_staleness_alert_fires_when_one_replicas_stats_stop(deployed):
    prom, handle = deployed["prom"], deployed["handle"]

    def stale_firing():
        return [a for a in prom.alerts() if a["labels"]["alertname"] == "RoutelensRoutingStatsStale"
                and a["labels"].get("app") == APP and a["state"] == "firing"]

    send_handle(handle, 40, 20)
    time.sleep(2)
    assert not stale_firing()  # every replica's stats fresh
    open(deployed["flag"], "w").close()
    deadline = time.monotonic() + 90
    while not stale_firing():
        assert time.monotonic() < deadline, "RoutelensRoutingStatsStale did not fire"
        send_handle(handle, 40, 20)
        time.sleep(1)
    (alert,) = stale_firing()
    assert float(alert["value"]) > 3 and "Staleness" in alert["annotations"]["description"]
    staleness = deployed["api"].get("/v1/staleness", params={"window": "5m", "app": APP}).json()
    ages = sorted(replica["max_s"] or 0 for replica in staleness["replicas"])
    assert ages[-1] > 3 * staleness["deployments"][0]["stats_period_s"] > ages[0]  # one replica, not all
