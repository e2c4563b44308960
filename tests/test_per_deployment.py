"""Figures that compare replicas are a deployment's own (issue 23, point 7).

Two deployments, each perfectly balanced, and not balanced together: `chat`
spreads 240 requests over 4 replicas, `embed` 12 over 2. Both are named
`Model` (in different apps), and their replicas report routing stats at
different periods (2 s and 10 s). Over all six replicas Jain's index would
be about 0.73; each deployment's is 1. Every endpoint, every view (in a real
Chromium), the export and the demo's closing table must give each
deployment its own figures, the worst first, and never one index over both.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import httpx
import pandas as pd
import pytest

from routelens.collector.demo.run import _final_table
from routelens.collector.query.figures import imbalance
from routelens.collector.settings import Settings
from routelens.dashboard.components import number, percent, seconds
from routelens.dashboard.up import create_up_app
from tests.support.browser import shown_rows, shown_text
from tests.support.collector_server import CollectorServer
from tests.support.wire_source import WireSource

CHAT = {"app": "chat", "replicas": ["m1", "m2", "m3", "m4"], "each": 60, "stats_period_s": 2.0, "stats_age_s": 0.5}
EMBED = {"app": "embed", "replicas": ["e1", "e2"], "each": 6, "stats_period_s": 10.0, "stats_age_s": 12.0}
DEPLOYMENTS = {"chat/Model": CHAT, "embed/Model": EMBED}
# What one index over every replica would say: the figure nothing may show.
ACROSS = imbalance([CHAT["each"]] * len(CHAT["replicas"]) + [EMBED["each"]] * len(EMBED["replicas"]))


def _events(source: WireSource, spec: dict, t0: float) -> list:
    """The deployment's members, its replicas' stats every period, and `each`
    requests per replica, every decision ranking the replica on stats of the given age."""
    replicas = spec["replicas"]
    events = [source.replicas(t0, replicas)]
    for k in range(12):
        collected = t0 + k * spec["stats_period_s"]
        events += [source.stats(collected + 0.1, r, {"load": k}, collected_at=collected) for r in replicas]
    t = t0
    for n in range(spec["each"]):
        for replica in replicas:
            t += 0.01
            candidate = {"queue_len": n % 3, "stats": {"load": 1}, "stats_age_s": spec["stats_age_s"],
                         "stats_age_source": "stamped"}
            decision = source.decision(t, [[replica]], candidates={replica: candidate})
            routed = source.routed(t + 0.001, replica, decision)
            events += [decision, routed, source.completed(t + 0.002, replica, routed)]
    return sorted(events, key=lambda e: e["ts"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`routelens up` on a SQLite file holding the two deployments' traffic."""
    db = tmp_path_factory.mktemp("per-deployment") / "routelens.db"
    with CollectorServer(Settings(db_url=f"sqlite:///{db}"), app_factory=create_up_app) as up:
        t0 = time.time() - 600
        for spec in (CHAT, EMBED):
            source = WireSource(f'{spec["app"]}-proxy', app=spec["app"], deployment="Model")
            response = httpx.post(f"{up.url}/v1/events", json=source.batch(_events(source, spec, t0)))
            assert response.status_code == 200, response.text
        yield up


def api(server, path, **params):
    response = httpx.get(f"{server.url}{path}", params={"window": "1h", **params})
    assert response.status_code == 200, response.text
    return response.json()


def name(row: dict) -> str:
    return f'{row["app"]}/{row["deployment"]}'


def test_together_they_would_look_unbalanced():
    """The premise: one index over both deployments would mislead."""
    assert ACROSS["jain"] < 0.8


def test_distribution_gives_each_deployment_its_own_figures(server):
    d = api(server, "/v1/distribution")
    assert "imbalance" not in d and "fair_share" not in d
    assert d["routed"] == sum(spec["each"] * len(spec["replicas"]) for spec in DEPLOYMENTS.values())
    assert {name(x) for x in d["deployments"]} == set(DEPLOYMENTS)
    for x in d["deployments"]:
        spec = DEPLOYMENTS[name(x)]
        assert (x["replicas"], x["routed"]) == (len(spec["replicas"]), spec["each"] * len(spec["replicas"]))
        assert x["fair_share"] == spec["each"]
        assert x["imbalance"] == {"max_over_mean": 1.0, "cv": 0.0, "jain": pytest.approx(1.0)}
        assert [(g["node_id"], g["share"]) for g in x["by_node"]] == \
            [(f"node-{r}", 1 / len(spec["replicas"])) for r in sorted(spec["replicas"])]
    for replica in d["replicas"]:
        spec = DEPLOYMENTS[name(replica)]
        assert replica["replica_id"] in spec["replicas"]
        assert replica["share"] == pytest.approx(1 / len(spec["replicas"]))


def test_the_summary_names_the_worst_deployment(server):
    s = api(server, "/v1/summary")
    assert [name(x) for x in s["deployments"]] == sorted(DEPLOYMENTS)  # equally balanced: by name
    assert s["imbalance"]["jain"] == pytest.approx(1.0) != pytest.approx(ACROSS["jain"])
    assert name(s["imbalance"]) in DEPLOYMENTS
    for x in s["deployments"]:
        spec = DEPLOYMENTS[name(x)]
        assert x["staleness"]["stats_period_s"] == spec["stats_period_s"]
        assert x["staleness"]["p95_over_period"] == pytest.approx(x["staleness"]["p95_s"] / spec["stats_period_s"])
    # embed's stats are older than its period (12 s against 10 s); chat's a quarter of its own.
    assert name(s["staleness"]) == "embed/Model"
    assert s["staleness"]["stats_period_s"] == EMBED["stats_period_s"]


def test_staleness_is_against_each_deployments_own_period(server):
    s = api(server, "/v1/staleness")
    assert "overall" not in s and "stats_period_s" not in s
    assert [name(x) for x in s["deployments"]] == ["embed/Model", "chat/Model"]  # stalest first
    for x in s["deployments"]:
        spec = DEPLOYMENTS[name(x)]
        assert x["stats_period_s"] == spec["stats_period_s"]
        assert x["samples"] == spec["each"] * len(spec["replicas"])
        assert x["max_s"] == spec["stats_age_s"]
        assert x["p95_over_period"] == pytest.approx(x["p95_s"] / spec["stats_period_s"])
    assert {r["replica_id"]: name(r) for r in s["replicas"]} == \
        {r: key for key, spec in DEPLOYMENTS.items() for r in spec["replicas"]}


def test_rank_hits_and_timeseries_name_each_deployment(server):
    hits = api(server, "/v1/rank-hits")
    assert {name(x): (x["routed"], x["rank0_rate"]) for x in hits["deployments"]} == \
        {key: (spec["each"] * len(spec["replicas"]), 1.0) for key, spec in DEPLOYMENTS.items()}
    routed = Counter()
    for point in api(server, "/v1/timeseries", per_replica="true")["points"]:
        routed[name(point), point["replica_id"]] += point["routed"]
    assert routed == {(key, r): spec["each"] for key, spec in DEPLOYMENTS.items() for r in spec["replicas"]}


def test_the_export_holds_each_deployments_rows(server):
    """Grouped by app and deployment, the exported routed rows give the API's per-deployment figures."""
    response = httpx.get(f"{server.url}/v1/export", params={"window": "1h", "what": "routed", "format": "csv"})
    assert response.status_code == 200, response.text
    rows = pd.read_csv(io.StringIO(response.text))
    counts = rows.groupby(["app", "deployment", "replica_id"]).size()
    dist = api(server, "/v1/distribution")
    for x in dist["deployments"]:
        per_replica = counts.loc[(x["app"], x["deployment"])]
        assert per_replica.sum() == x["routed"]
        assert imbalance(list(per_replica)) == pytest.approx(x["imbalance"])


def test_the_demos_closing_table_has_a_row_per_deployment(server):
    class Server:  # the demo's ServerProcess, answering from this collector
        def get(self, path, **params):
            return api(server, path, **params)

    class Sent:
        sent = 0

    table = _final_table(Server(), time.time() - 3600, {"chat": Sent(), "embed": Sent()})
    columns = {column.header: list(column.cells) for column in table.columns}
    assert columns["deployment"] == ["chat", "embed"]  # one deployment each: named by their app
    assert columns["Jain"] == ["1.000", "1.000"]
    assert columns["routed"] == [str(CHAT["each"] * 4), str(EMBED["each"] * 2)]


# --- the dashboard, in a real Chromium ---

def page_text(page) -> str:
    return page.inner_text("#view")


def open_view(page, server, path: str, ready: str, endpoint: str) -> dict:
    """The view at `path`, once `ready` shows, and what `endpoint` answers for the same window."""
    page.goto(server.url + path)
    page.wait_for_selector(ready)
    return api(server, endpoint)


@pytest.mark.browser
def test_the_overview_shows_the_worst_deployment_named_and_no_index_across(server, page):
    s = open_view(page, server, "/", "#overview-deployments", "/v1/summary")
    assert shown_text(page, "#overview-jain") == number(s["imbalance"]["jain"], 3) == "1.000"
    assert shown_text(page, "#overview-jain-note") == f'{name(s["imbalance"])} (worst of 2 deployments)'
    assert shown_text(page, "#overview-staleness-p95") == seconds(s["staleness"]["p95_s"])
    assert shown_text(page, "#overview-staleness-p95-note").startswith("embed/Model (worst of 2 deployments)")
    rows = shown_rows(page, "#overview-deployments")
    assert [(row[0], row[5]) for row in rows] == [(name(x), "1.000") for x in s["deployments"]]
    assert number(ACROSS["jain"], 3) not in page_text(page)
    assert not page.console_errors


@pytest.mark.browser
def test_the_distribution_view_shows_each_deployment_against_its_own_fair_share(server, page):
    d = open_view(page, server, "/distribution", "#distribution-deployments", "/v1/distribution")
    assert [(row[0], row[3], row[6]) for row in shown_rows(page, "#distribution-deployments")] == \
        [(name(x), number(x["fair_share"], 1), "1.000") for x in d["deployments"]]
    assert [(row[0], row[1], row[6]) for row in shown_rows(page, "#distribution-table")] == \
        [(r["replica_id"], name(r), percent(r["share"])) for r in d["replicas"]]
    assert shown_text(page, "#distribution-jain") == "1.000"
    # The bar chart's axis shows each replica under its deployment.
    page.wait_for_selector("#distribution-bars .main-svg")
    axis = page.text_content("#distribution-bars .main-svg")
    assert all(key in axis for key in DEPLOYMENTS), axis
    assert number(ACROSS["jain"], 3) not in page_text(page)
    assert number(ACROSS["max_over_mean"], 2) not in page_text(page)
    assert not page.console_errors


@pytest.mark.browser
def test_the_staleness_view_measures_each_deployment_against_its_period(server, page):
    s = open_view(page, server, "/staleness", "#staleness-deployments", "/v1/staleness")
    stalest = s["deployments"][0]
    assert shown_text(page, "#staleness-p95") == seconds(stalest["p95_s"])
    assert shown_text(page, "#staleness-period") == seconds(EMBED["stats_period_s"])
    assert "alert" not in page.get_attribute("#staleness-p95 >> xpath=..", "class")  # 1.2 periods: not beyond 2
    assert [(row[0], row[1], row[6]) for row in shown_rows(page, "#staleness-deployments")] == \
        [(name(x), seconds(x["stats_period_s"]), number(x["p95_over_period"], 2)) for x in s["deployments"]]
    assert not page.console_errors


@pytest.mark.browser
def test_rank_hits_and_compare_list_each_deployment(server, page):
    hits = open_view(page, server, "/rank-hits", "#rank-hits-deployments", "/v1/rank-hits")
    assert [(row[0], row[1], row[2]) for row in shown_rows(page, "#rank-hits-deployments")] == \
        [(name(x), number(x["routed"]), percent(x["rank0_rate"])) for x in hits["deployments"]]
    page.goto(server.url + "/compare?compare_shift=24h")
    page.wait_for_selector("#compare-table")
    rows = {row[0]: (row[1], row[2]) for row in shown_rows(page, "#compare-table")}
    assert "Jain's fairness index" not in rows
    for key in DEPLOYMENTS:  # this window against a day earlier, which holds nothing
        assert rows[f"Jain's fairness index · {key}"] == ("1.000", "–")
    assert not page.console_errors

