"""End to end: traced routers on real Ray Serve -> a real collector -> the read API.

One set of traced apps (the seed's routers and Ray's pow-2 router) gets its
traffic both through Serve's HTTP proxy and through a DeploymentHandle, so
that the proxy's and the driver's routers are both traced. Their batches go
to a tee that passes each on to a collector on each backend (SQLite,
PostgreSQL) and keeps it as the JSON Lines sink would.

The trace itself (the raw batches) is checked against the invariants of
`trace_checks.check_trace` and the counts the replicas kept themselves. On
each backend, the API's figures are checked against those counts and
against figures computed here from the raw events the collector stored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections import Counter, defaultdict

import httpx
import pandas as pd
import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig
from sqlalchemy import select

from routelens.collector.ingest.importer import import_files
from routelens.collector.ingest.writer import Ingestor
from routelens.collector.settings import Settings
from routelens.collector.store.bins import STALENESS
from routelens.collector.store.models import Deployment, Replica, Router, completed, decisions, routed
from routelens.dashboard.components import number, percent, seconds
from routelens.dashboard.up import create_up_app
from routelens.routers.examples import TracedPowerOfTwoChoicesRequestRouter, TracedThroughputAwareRequestRouter
from tests.support import serve_apps
from tests.support.browser import shown_rows, shown_text
from tests.support.collector_app import Collector
from tests.support.collector_server import CollectorServer
from tests.support.serve_traffic import send_handle, send_http
from tests.support.tee_server import TeeServer
from tests.support.trace_checks import check_trace, read_events, wait_for

pytestmark = pytest.mark.ray

STATS_PERIOD_S = 1.0
SOURCE_FIGURES = ("active_routers", "dropped_events", "batch_gaps")
# app name -> (deployment class, router class, options, HTTP requests, handle requests, concurrency)
APPS = {
    "uniform": (serve_apps.UniformRequestRouterApp, "routelens.routers.examples:TracedUniformRequestRouter",
                {"num_replicas": 10}, 100, 100, 10),
    "throughput": (serve_apps.ThroughputAwareRequestRouterApp, TracedThroughputAwareRequestRouter,
                   {"num_replicas": 3, "router_config": {"request_routing_stats_period_s": STATS_PERIOD_S,
                                                         "request_routing_stats_timeout_s": 1}}, 100, 100, 4),
    "pow2": (serve_apps.SlowApp, TracedPowerOfTwoChoicesRequestRouter, {"num_replicas": 3}, 120, 120, 40),
}


BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="module")
def traced_apps(request, serve_instance, tmp_path_factory):
    """Deploys the apps traced to the tee, in front of `routelens up` (the
    collector and the dashboard, which browser tests read) on each backend,
    sends their traffic, and waits until every collector has every request's
    routed and completed events and its totals hold still."""
    tmp = tmp_path_factory.mktemp("e2e")
    count_dir, sink_dir = str(tmp / "counts"), str(tmp / "sink")
    os.makedirs(count_dir)
    db_urls = {"sqlite": f"sqlite:///{tmp / 'routelens.db'}"}
    try:
        db_urls["postgres"] = request.getfixturevalue("postgres").new_database()
    except pytest.skip.Exception:
        pass  # no PostgreSQL on this laptop: `traced` skips its tests, the rest run
    # Names no other test deploys: a proxy keeps the router of an app deleted
    # and deployed again under the same name, with its old request_router_kwargs
    # (the collector's URL among them).
    deployed = {name: f"e2e-{name}" for name in APPS}
    with contextlib.ExitStack() as stack:
        servers = {backend: stack.enter_context(CollectorServer(Settings(db_url=url), app_factory=create_up_app))
                   for backend, url in db_urls.items()}
        tee = stack.enter_context(TeeServer([server.url for server in servers.values()], sink_dir))
        started = time.time()
        handles = {}
        stack.callback(serve_apps.delete_apps, deployed.values())  # before the tee and the collectors stop
        for name, (app_cls, router_class, options, *_traffic) in APPS.items():
            options = dict(options)
            config = RequestRouterConfig(request_router_class=router_class,
                                         request_router_kwargs={"collector_url": tee.url},
                                         **options.pop("router_config", {}))
            handles[name] = serve.run(app_cls.options(request_router_config=config, **options).bind(count_dir),
                                      name=deployed[name], route_prefix=f"/{deployed[name]}")
        for name, (*_deploy, n_http, n_handle, concurrency) in APPS.items():
            send_http(f"{serve_instance}/{deployed[name]}", n_http, concurrency)
            send_handle(handles[name], n_handle, concurrency)
        apis = {backend: stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
                for backend, server in servers.items()}
        window = {"since": started - 5}
        for backend, api in apis.items():
            for name, (*_deploy, n_http, n_handle, _c) in APPS.items():
                wanted = n_http + n_handle

                def arrived(api=api, name=name, wanted=wanted):
                    figures = api.get("/v1/summary", params={**window, "app": deployed[name]}).json()
                    return figures["routed"] >= wanted and figures["completions"] >= wanted

                wait_for(arrived, timeout_s=60, what=f"{name}: routed and completed events at the {backend} collector")
        # The trace: every request's routed event, and the completions of those the replicas accepted.
        for name, (app_cls, _router, _options, n_http, n_handle, _c) in APPS.items():
            wanted = n_http + n_handle

            def traced_whole(deployment=app_cls.name, wanted=wanted) -> bool:
                events = read_events(sink_dir, deployment)
                return sum(e["type"] == "routed" for e in events) >= wanted and \
                    sum(e["type"] == "completed" and not e["rejected"] for e in events) >= wanted

            wait_for(traced_whole, what=f"{name}: routed and completed events in the tee's batches")
        # Rejections settle after the tracer's grace period, and late batches follow: tests compare
        # the API with raw rows read a moment later, so wait until the totals hold still.
        totals = []

        def settled() -> bool:
            time.sleep(3)  # longer than REJECTION_GRACE_S and the exporter's flush interval
            totals.append([api.get("/v1/summary", params=window).json() for api in apis.values()])
            return len(totals) > 1 and all(
                now["decisions"] == before["decisions"] and now["completions"] == before["completions"]
                for now, before in zip(totals[-1], totals[-2]))

        wait_for(settled, timeout_s=60, what="the collectors' totals to settle")
        yield {"apps": deployed, "handles": handles, "window": window, "settled_at": time.time(),
               "counts": {name: serve_apps.read_counts(count_dir, deployed[name]) for name in APPS},
               "events": {name: read_events(sink_dir, APPS[name][0].name) for name in APPS},
               "backends": {backend: {"api": apis[backend], "engine": servers[backend].app.state.engine,
                                      "url": servers[backend].url} for backend in servers}}


@pytest.fixture(params=BACKENDS)
def traced(request, traced_apps):
    """The traced apps as one backend's collector has them: its API, engine and URL."""
    if request.param not in traced_apps["backends"]:
        pytest.skip("PostgreSQL unavailable")
    return {**traced_apps, **traced_apps["backends"][request.param]}


# Browser tests beyond `test_every_view_shows_what_the_api_says` run on SQLite only: the pages read
# through the query functions that the API tests here check on both backends.
ONE_BACKEND = pytest.mark.parametrize("traced", ["sqlite"], indirect=True)


def read(traced, path, app, **params):
    """A read endpoint's answer about one app, over the traffic's window."""
    return traced["api"].get(path, params={**traced["window"], "app": traced["apps"][app], **params}).json()


def raw_rows(traced, table, app):
    """Raw events of one app, as the collector stored them."""
    with traced["engine"].connect() as connection:
        routers = select(Router.pk).join(Deployment, Deployment.pk == Router.deployment_pk).where(
            Deployment.app == traced["apps"][app])
        return connection.execute(select(table).where(table.c.router_pk.in_(routers))).mappings().all()


def replica_ids(engine):
    with engine.connect() as connection:
        return dict(connection.execute(select(Replica.pk, Replica.replica_id)).all())


# --- the trace itself: the raw batches, checked against the replicas' own counts ---

def trace_of(traced_apps, app):
    """One app's raw events, and the figures `check_trace` returns once they hold its invariants."""
    events = traced_apps["events"][app]
    return events, check_trace(events, APPS[app][3] + APPS[app][4], traced_apps["counts"][app])


def test_uniform_router_ten_replicas(traced_apps):
    # The seed deploys with an import-path string; so does APPS.
    events, figures = trace_of(traced_apps, "uniform")
    routed = [e for e in events if e["type"] == "routed"]
    # Uniform ranks a single replica: every request is placed from rank 0.
    assert {r["rank"] for r in routed} == {0}
    assert len({r["replica_id"] for r in routed}) == 10
    handle_sources = {e["source"]["handle_source"] for e in routed}
    assert handle_sources == {"PROXY", "UNKNOWN"}  # the proxy's router and the driver's
    decisions = [e for e in events if e["type"] == "decision"]
    assert all(d["n_candidates"] == 10 and len(d["ranks"]) == 1 for d in decisions)


def test_throughput_aware_router_stamped_stats(traced_apps):
    events, figures = trace_of(traced_apps, "throughput")
    decisions = [e for e in events if e["type"] == "decision"]
    ages = [
        inputs["stats_age_s"]
        for d in decisions
        for inputs in d["replicas"].values()
        if inputs["stats_age_source"] == "stamped"
    ]
    # Stats arrive stamped once the first collection reached the router; before
    # that a replica's stats are {}, which have no age.
    assert len(ages) >= 0.8 * len(decisions), (len(ages), len(decisions))
    assert max(ages) <= STATS_PERIOD_S + 1.0, sorted(ages)[-5:]
    assert min(ages) >= 0
    stats_events = [e for e in events if e["type"] == "stats" and e["collected_at"] is not None]
    assert stats_events and all("throughput" in e["stats"] for e in stats_events)


def test_pow2_router_under_rejections(traced_apps):
    events, figures = trace_of(traced_apps, "pow2")
    # 40 concurrent requests on 3 replicas x 2 slots: replicas refuse some, and
    # FIFO hands replicas found for one request to another.
    assert figures["rejections"] > 0
    assert figures["handoffs"] > 0
    rejected = [e for e in events if e["type"] == "completed" and e["rejected"]]
    assert all(e["latency_ms"] is None and e["routed_id"] is None for e in rejected)
    retried = [e for e in events if e["type"] == "routed" and e["attempts"] > 1]
    assert retried, "some request must have needed more than one decision"


# --- on each backend: the collector's figures ---

@pytest.mark.parametrize("app", list(APPS))
def test_per_replica_counts_equal_the_replicas_own(traced, app):
    figures = read(traced, "/v1/distribution", app)
    api_counts = {r["replica_id"]: r["routed"] for r in figures["replicas"] if r["routed"]}
    assert api_counts == traced["counts"][app]
    n_replicas = APPS[app][2]["num_replicas"]
    assert len(figures["replicas"]) == n_replicas
    assert figures["routed"] == APPS[app][3] + APPS[app][4]


@pytest.mark.parametrize("app", list(APPS))
def test_rank_hits_equal_the_raw_events(traced, app):
    figures = read(traced, "/v1/rank-hits", app)
    rows = raw_rows(traced, routed, app)
    ranks = Counter("unknown" if r["rank"] is None else str(min(r["rank"], 5)) for r in rows)
    assert figures["routed"] == len(rows)
    for entry in figures["ranks"]:
        label = "5" if entry["rank"] == "5+" else entry["rank"]
        assert entry["routed"] == ranks.get(label, 0), entry
        assert entry["share"] == pytest.approx(ranks.get(label, 0) / len(rows))
    handoffs = sum(r["own_ranking"] is False for r in rows)
    assert figures["handoffs"] == handoffs
    assert figures["handoff_rate"] == pytest.approx(handoffs / len(rows))
    rejected = sum(r["rejected"] for r in raw_rows(traced, completed, app))
    assert figures["rejections"] == rejected
    assert figures["decisions"] == len(raw_rows(traced, decisions, app))
    if app == "uniform":
        assert figures["rank0_rate"] == 1.0  # one replica ranked per decision
    if app == "pow2":
        assert rejected > 0 and handoffs > 0  # 40 concurrent requests on 3 replicas x 2 slots


def raw_percentile(values, q):
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def test_staleness_percentiles_equal_the_raw_events(traced):
    figures = read(traced, "/v1/staleness", "throughput")
    names = replica_ids(traced["engine"])
    ages = defaultdict(list)
    sources = Counter()
    for row in raw_rows(traced, decisions, "throughput"):
        for rank in json.loads(row["ranking"]):
            for pk, _queue_len, _queue_age, stats_age_ms, source, _stats in rank:
                if stats_age_ms is not None:
                    ages[names[pk]].append(max(stats_age_ms / 1000.0, 0.0))
                    sources[source] += 1
    by_replica = {r["replica_id"]: r for r in figures["replicas"]}
    assert set(by_replica) == set(ages)
    for replica_id, values in ages.items():
        api = by_replica[replica_id]
        assert api["samples"] == len(values)
        for q, key in ((0.5, "p50_s"), (0.95, "p95_s")):
            # Rollups keep fixed bins: the API's percentile lies in the raw percentile's bin.
            assert STALENESS.column(api[key]) == STALENESS.column(raw_percentile(values, q)), (replica_id, key)
        assert api["max_s"] == pytest.approx(max(values), abs=2e-6)  # raw rows keep microseconds
    assert sum(r["stamped"] for r in figures["replicas"]) == sources["s"]
    # Stamped stats are at most one period old, plus the time to reach the router.
    assert sources["s"] > 0
    (deployment,) = figures["deployments"]
    assert deployment["max_s"] <= STATS_PERIOD_S + 1.0
    assert deployment["stats_period_s"] == pytest.approx(STATS_PERIOD_S, rel=0.5)


def test_decision_drill_down_links_routed_and_completed(traced):
    api = traced["api"]
    page = read(traced, "/v1/decisions", "pow2", limit=200)
    decided = [d for d in page["decisions"] if d["routed"] is not None]
    assert decided
    detail = api.get(f"/v1/decisions/{decided[0]['id']}").json()
    assert detail["routed"]["decision_id"] == detail["id"]
    assert detail["routed"]["replica_id"] in {r for rank in detail["ranks"] for r in rank}
    assert detail["completed"]["routed_id"] == detail["routed"]["id"]
    assert all("queue_len" in c for rank in detail["candidates"] for c in rank)


@pytest.mark.browser
@ONE_BACKEND
def test_the_dashboard_shows_the_replicas_own_counts(traced, page):
    """Real traffic, the real dashboard in Chromium: per replica, what the page
    shows is what the replicas counted themselves."""
    for app, deployed in traced["apps"].items():
        page.goto(f'{traced["url"]}/distribution?app={deployed}&since={traced["window"]["since"]}')
        shown = {row[0]: row[5] for row in shown_rows(page, "#distribution-table")}
        assert shown == {replica: number(traced["counts"][app].get(replica, 0)) for replica in shown}, app
        assert len(shown) == APPS[app][2]["num_replicas"]
    assert not page.console_errors


def test_export_then_import_gives_the_same_numbers_in_every_panel(traced, tmp_path):
    """Traced traffic -> export (JSON Lines, wire-format events) -> import into
    an empty database -> every panel query answers the same."""
    # Rejections settle after a grace period (REJECTION_GRACE_S) and stats changes keep coming
    # while the apps run: compare a window that ended 4 s before the totals were seen settled,
    # every event of it long arrived.
    window = {**traced["window"], "until": traced["settled_at"] - 4}
    exported = traced["api"].get("/v1/export", params={**window, "what": "events", "format": "jsonl"})
    assert exported.status_code == 200, exported.text
    path = tmp_path / "events.jsonl"
    path.write_bytes(exported.content)
    copy = Collector(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        report = import_files(Ingestor(copy.engine), [str(path)], 20_000)
        assert not report.problems and report.stored > 0
        for app, deployed in traced["apps"].items():
            for panel in ("/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits", "/v1/timeseries"):
                original = traced["api"].get(panel, params={**window, "app": deployed}).json()
                copied = copy.get(panel, app=deployed, **window)
                if panel == "/v1/summary":
                    # Sources count as seen when a collector received their batches: for the
                    # copy, at the import. Their counters are compared over a window that holds it.
                    for key in SOURCE_FIGURES:
                        copied.pop(key), original.pop(key)
                assert copied == original, (app, panel)
            per_replica = {**window, "app": deployed, "per_replica": "true"}
            assert copy.get("/v1/timeseries", **per_replica) == traced["api"].get(
                "/v1/timeseries", params=per_replica).json()
            until_now = {"since": window["since"], "until": time.time() + 60, "app": deployed}
            copied = copy.get("/v1/summary", **until_now)
            original = traced["api"].get("/v1/summary", params=until_now).json()
            assert [copied[key] for key in SOURCE_FIGURES] == [original[key] for key in SOURCE_FIGURES]
    finally:
        copy.close()


def open_view(page, traced, path, app, **extra):
    """One of the dashboard's views of an app, over the traffic's window."""
    query = {"app": traced["apps"][app], "since": traced["window"]["since"], **extra}
    page.goto(f'{traced["url"]}/{path}?' + "&".join(f"{k}={v}" for k, v in query.items()))


@pytest.mark.browser
def test_every_view_shows_what_the_api_says(traced, page):
    """The dashboard in Chromium on real traced traffic: each view's figures
    (overview, distribution, staleness, rank hits, decisions, compare) are the
    API's, filters change them, a decision opens, and a download holds the rows
    counted."""
    def view(path, app, **extra):
        open_view(page, traced, path, app, **extra)

    routed = {}
    for app in ("uniform", "pow2"):
        view("", app)
        summary = read(traced, "/v1/summary", app)
        assert shown_text(page, "#overview-rank0-rate") == percent(summary["rank0_rate"]), app
        assert shown_text(page, "#overview-jain") == number(summary["imbalance"]["jain"], 3), app
        view("distribution", app)
        routed[app] = shown_text(page, "#distribution-routed")
        assert routed[app] == number(APPS[app][3] + APPS[app][4]), app
    assert routed["uniform"] != routed["pow2"]  # the filter changes what is shown

    view("staleness", "throughput")
    staleness = read(traced, "/v1/staleness", "throughput")
    (deployment,) = staleness["deployments"]
    assert shown_text(page, "#staleness-p95") == seconds(deployment["p95_s"])
    assert shown_text(page, "#staleness-stamped").startswith(number(deployment["stamped"]))

    view("rank-hits", "pow2")
    hits = read(traced, "/v1/rank-hits", "pow2")
    assert shown_text(page, "#rank-hits-rejections") == number(hits["rejections"]) != "0"
    assert shown_text(page, "#rank-hits-handoff-rate") == percent(hits["handoff_rate"])

    view("explorer", "pow2")
    page.click("#explorer-table tbody tr:first-child a")
    page.wait_for_selector("#decision-candidates")
    decision_id = page.url.split("decision=")[1].split("&")[0]
    detail = traced["api"].get(f"/v1/decisions/{decision_id}").json()
    assert [row[1] for row in shown_rows(page, "#decision-candidates")] == [
        c["replica_id"] for rank in detail["candidates"] for c in rank]

    view("compare", "pow2", compare_shift="7d")
    compared = {row[0]: row[1:] for row in shown_rows(page, "#compare-table")}
    assert compared["routed requests"] == [number(hits["routed"]), "0"]  # a week earlier: no traffic
    assert compared["rank-0 hit rate"][0] == percent(hits["rank0_rate"])

    view("distribution", "uniform")
    with page.expect_download() as download:
        page.click("#distribution-download-csv")
    routed_rows = pd.read_csv(download.value.path())
    assert routed_rows["replica_id"].value_counts().to_dict() == traced["counts"]["uniform"]
    assert not page.console_errors


@pytest.mark.browser
@ONE_BACKEND
def test_auto_refresh_shows_new_traffic_under_the_same_filters(traced, page):
    """Last in the module, after every other test: it sends more traffic."""
    apps = traced["apps"]
    open_view(page, traced, "distribution", "uniform", refresh="5s")
    before = shown_text(page, "#distribution-routed")
    # From another thread: in this one, Playwright's event loop counts as running, and a handle's
    # result() refuses to block inside a running loop.
    sender = threading.Thread(target=send_handle, args=(traced["handles"]["uniform"], 10, 5))
    sender.start()
    sender.join(60)
    wanted = number(int(before.replace(",", "")) + 10)
    page.wait_for_function(f"(document.querySelector('#distribution-routed') || {{}}).innerText === '{wanted}'",
                           timeout=20_000)
    assert f"app={apps['uniform']}" in page.url and "refresh=5s" in page.url
    assert not page.console_errors

