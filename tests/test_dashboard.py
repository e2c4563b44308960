"""The dashboard in a real headless Chromium, served by `routelens up` (real
uvicorn, real SQLite): what it shows equals what the API answers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
import uuid

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest

from routelens.collector.cli import main as routelens
from routelens.collector.settings import Settings
from routelens.dashboard.components import deployment_name, number, percent, seconds
from routelens.dashboard.up import create_up_app
from routelens.dashboard.views.rank_hits import quality_cells
from tests.support import sse
from tests.support.browser import downloaded, shown_rows, shown_text
from tests.support.collector_server import CollectorServer
from tests.support.trace_checks import wait_for
from tests.support.wire_source import WireSource

pytestmark = pytest.mark.browser


def _traffic(src: WireSource, t0: float, replicas, counts, explained: bool = False, held_ms=None) -> list:
    """`counts[i]` requests to `replicas[i]`, each a decision, a routing and a completion.
    The router saw every chosen replica at 1 and the shortest queue at 1 when it chose
    replicas[0] (regret 0, belief error 0: it reported 2, this request included), else
    at 0 (regret 1, belief error -1: the replica reported 3). `explained`: the router gave
    each decision a reason, "shortest queue" for replicas[0], else "pow-2 fallback".
    `held_ms`: the send to routed times of the routings to replicas[0] and to the others
    (None: an older tracer's, without them)."""
    events = [src.replicas(t0, replicas)]
    t = t0
    for replica, n in zip(replicas, counts):
        first = replica == replicas[0]
        for _ in range(n):
            t += 0.01
            others = [r for r in replicas if r != replica]
            explanation = {"reason": "shortest queue" if first else "pow-2 fallback",
                           "scores": {"queue_len": 1, "match_rate": 0.5}} if explained else {}
            d = src.decision(t, [[replica], others[:1]], candidates={replica: {
                "queue_len": 1, "stats_age_s": 0.4, "stats_age_source": "stamped"}}, **explanation)
            r = src.routed(t + 0.001, replica, d, quality=(1, 1 if first else 0, 2 if first else 3),
                           send_to_routed_ms=held_ms and held_ms[0 if first else 1])
            events += [d, r, src.completed(t + 0.002, replica, r)]
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`routelens up` on a SQLite file holding two apps' traffic (shop skewed, search even)."""
    db = tmp_path_factory.mktemp("dashboard") / "routelens.db"
    with CollectorServer(Settings(db_url=f"sqlite:///{db}"), app_factory=create_up_app) as up:
        t0 = time.time() - 300
        shop = WireSource("shop-proxy", app="shop", labels={"router_version": "a"})
        search = WireSource("search-proxy", app="search", deployment="Search", labels={"router_version": "b"})
        batches = [shop.batch(_traffic(shop, t0, ["r1", "r2", "r3"], [30, 10, 0], explained=True,
                                       held_ms=(2.0, 8.0))),
                   search.batch(_traffic(search, t0, ["s1", "s2"], [12, 12]), dropped={"queue_full": 3})]
        for batch in batches:
            response = httpx.post(f"{up.url}/v1/events", content=json.dumps(batch),
                                  headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text
        yield up


def api(server, path, **params):
    return httpx.get(f"{server.url}{path}", params={"window": "1h", **params}).json()


def test_overview_shows_the_api_figures(server, page):
    page.goto(server.url + "/")
    summary = api(server, "/v1/summary")
    assert shown_text(page, "#overview-routed-per-s") == number(summary["routed_per_s"], 2)
    assert shown_text(page, "#overview-decisions-per-s") == number(summary["decisions_per_s"], 2)
    assert shown_text(page, "#overview-rank0-rate") == percent(summary["rank0_rate"])
    # Two deployments in view: the card is the least balanced one's, named; the table has both.
    worst = summary["deployments"][0]
    assert shown_text(page, "#overview-jain") == number(summary["imbalance"]["jain"], 3) == \
        number(worst["imbalance"]["jain"], 3)
    assert shown_text(page, "#overview-jain-note") == f'{worst["app"]}/{worst["deployment"]} (worst of 2 deployments)'
    assert [row[0] for row in shown_rows(page, "#overview-deployments")] == \
        [f'{d["app"]}/{d["deployment"]}' for d in summary["deployments"]]
    assert shown_text(page, "#overview-dropped-events") == "3"
    assert "alert" in page.get_attribute("#overview-dropped-events >> xpath=..", "class")
    assert not page.console_errors


def test_a_filter_in_the_url_changes_the_figures(server, page):
    page.goto(server.url + "/?app=search")
    search = api(server, "/v1/summary", app="search")
    assert shown_text(page, "#overview-routed-per-s") == number(search["routed_per_s"], 2)
    assert search["routed"] != api(server, "/v1/summary")["routed"]
    assert not page.console_errors


def test_choosing_a_window_puts_it_in_the_url(server, page):
    page.goto(server.url + "/distribution?app=shop")
    page.wait_for_selector("#distribution-table")
    page.click("#window")
    page.click("text=24h")
    page.wait_for_url("**window=24h**")
    assert "app=shop" in page.url
    assert not page.console_errors


def test_distribution_lists_every_replica_with_its_count(server, page):
    page.goto(server.url + "/distribution?app=shop")
    dist = api(server, "/v1/distribution", app="shop")
    rows = shown_rows(page, "#distribution-table")
    assert [(row[0], row[5]) for row in rows] == [(r["replica_id"], number(r["routed"])) for r in dist["replicas"]]
    assert ("r3", "0") in [(row[0], row[5]) for row in rows]  # a member that got nothing is listed
    assert shown_text(page, "#distribution-max-over-mean") == \
        number(dist["deployments"][0]["imbalance"]["max_over_mean"], 2)
    assert not page.console_errors


def test_with_no_data_the_page_says_how_to_start(tmp_path, page):
    with CollectorServer(Settings(db_url=f"sqlite:///{tmp_path / 'empty.db'}"), app_factory=create_up_app) as up:
        page.goto(up.url + "/")
        assert "No routing decisions yet" in shown_text(page, "#empty-state")
        assert "collector_url" in shown_text(page, "#empty-state")
        page.goto(up.url + "/whatif")
        assert "routelens replay --router" in shown_text(page, "#whatif-empty")
    assert not page.console_errors


def test_staleness_shows_the_api_figures(server, page):
    page.goto(server.url + "/staleness?app=shop")
    s = api(server, "/v1/staleness", app="shop")
    (shop,) = s["deployments"]
    assert shown_text(page, "#staleness-p95") == seconds(shop["p95_s"])
    assert shown_text(page, "#staleness-stamped") == f'{number(shop["stamped"])} / {number(shop["observed"])}'
    shown = [row[0] for row in shown_rows(page, "#staleness-table")]
    assert shown == [r["replica_id"] for r in s["replicas"]]
    page.wait_for_selector("#staleness-heatmap .main-svg")
    assert not page.console_errors


def test_rank_hits_shows_the_api_figures(server, page):
    page.goto(server.url + "/rank-hits?app=search")
    r = api(server, "/v1/rank-hits", app="search")
    assert shown_text(page, "#rank-hits-rank0-rate") == percent(r["rank0_rate"])
    assert shown_text(page, "#rank-hits-handoff-rate") == percent(r["handoff_rate"])
    rows = shown_rows(page, "#rank-hits-ranks")
    assert [(x[0], x[1]) for x in rows] == [(e["rank"], number(e["routed"])) for e in r["ranks"]]
    # search's tracer recorded no send to routed times: unknown, said for how many, never 0.
    assert r["send_to_routed_ms"]["samples"] == 0
    assert shown_text(page, "#rank-hits-send-to-routed-p50") == shown_text(page, "#rank-hits-send-to-routed-p99") \
        == "unknown"
    assert shown_text(page, "#rank-hits-send-to-routed-p50-note") == "unknown for 24 routed"
    assert not page.console_errors


def test_rank_hits_shows_send_to_routed_beside_choose_replicas(server, page):
    page.goto(server.url + "/rank-hits?app=shop")
    send = api(server, "/v1/rank-hits", app="shop")["send_to_routed_ms"]
    # By hand: 30 routings at 2.0 ms (bin (1, 2]), 10 at 8.0 ms (bin (5, 10], capped at the maximum, 8).
    assert (send["samples"], send["p50"], send["p99"], send["max"]) == (
        40, pytest.approx(5 / 3), pytest.approx(7.88), 8.0)
    assert shown_text(page, "#rank-hits-send-to-routed-p50") == f'{number(send["p50"], 1)} ms' == "1.7 ms"
    assert shown_text(page, "#rank-hits-send-to-routed-p99") == f'{number(send["p99"], 1)} ms' == "7.9 ms"
    assert page.query_selector("#rank-hits-send-to-routed-p50-note") is None  # known for every routing
    assert not page.console_errors


def test_rank_hits_shows_decision_quality_per_replica_and_over_time(server, page):
    page.goto(server.url + "/rank-hits?app=shop")
    r = api(server, "/v1/rank-hits", app="shop")
    regret, belief = r["decision_quality"]["regret"], r["decision_quality"]["belief_error"]
    # By hand: 30 answers from r1 (regret 0, belief error 0), 10 from r2 (regret 1, belief error -1).
    assert (regret["samples"], regret["mean"], regret["positive_share"], regret["p95"]) == (40, 0.25, 0.25, 1.0)
    assert (belief["samples"], belief["mean"], belief["mean_abs"], belief["p95_abs"]) == (40, -0.25, 0.25, 1.0)
    assert shown_text(page, "#rank-hits-regret-mean") == number(regret["mean"], 2) == "0.25"
    assert shown_text(page, "#rank-hits-regret-positive") == percent(regret["positive_share"])
    assert shown_text(page, "#rank-hits-regret-p95") == number(regret["p95"])
    assert shown_text(page, "#rank-hits-belief-error-mean-abs") == number(belief["mean_abs"], 2)
    assert shown_text(page, "#rank-hits-belief-error-p95") == number(belief["p95_abs"])
    assert shown_rows(page, "#rank-hits-quality-replicas") == [
        [x["replica_id"], deployment_name(x), *quality_cells(x["decision_quality"])] for x in r["replicas"]]
    assert [row[:3] for row in shown_rows(page, "#rank-hits-quality-replicas")] == [
        ["r1", "shop/Checkout", "30"], ["r2", "shop/Checkout", "10"]]
    assert shown_rows(page, "#rank-hits-quality-deployments") == [
        [deployment_name(x), *quality_cells(x["decision_quality"])] for x in r["deployments"]]
    # Over time: one line per deployment, its points the API's.
    page.wait_for_selector("#rank-hits-regret-over-time .main-svg")
    lines = page.evaluate("document.querySelector('#rank-hits-regret-over-time .js-plotly-plot').data")
    (shop,) = r["decision_quality_over_time"]["deployments"]
    assert [(line["name"], line["y"]) for line in lines] == [
        ("shop/Checkout", [p["regret"]["mean"] for p in shop["points"]])]
    page.wait_for_selector("#rank-hits-belief-over-time .main-svg")
    # Exportable: the decisions download holds each answer's figures, which give the view's.
    with page.expect_download() as download:
        page.click("#rank-hits-download-csv")
    frame = pd.read_csv(download.value.path())
    assert frame["regret"].count() == regret["samples"] and frame["regret"].mean() == regret["mean"]
    assert frame["belief_error"].abs().mean() == belief["mean_abs"]
    assert not page.console_errors


def test_rank_hits_shows_decisions_by_reason_and_the_explorer_filters_by_reason(server, page):
    page.goto(server.url + "/rank-hits?app=shop")
    reasons = api(server, "/v1/rank-hits", app="shop")["reasons"]["deployments"]
    (shop,) = reasons
    assert [(r["reason"], r["decisions"]) for r in shop["reasons"]] == [("shortest queue", 30), ("pow-2 fallback", 10)]
    assert shown_rows(page, "#rank-hits-reasons") == [
        ["shop/Checkout", r["reason"], number(r["decisions"]), percent(r["share"])] for r in shop["reasons"]]
    page.wait_for_selector("#rank-hits-reasons-over-time .main-svg")
    lines = page.evaluate("document.querySelector('#rank-hits-reasons-over-time .js-plotly-plot').data")
    assert {line["name"]: sum(line["y"]) for line in lines} == {"shortest queue": 30, "pow-2 fallback": 10}
    # The reason filter: in the URL, in its control, and narrowing the explorer's decisions.
    page.goto(server.url + "/explorer?app=shop&reason=pow-2+fallback")
    page.wait_for_selector("#explorer-table tbody tr")
    assert "pow-2 fallback" in shown_text(page, "#reason")
    rows = shown_rows(page, "#explorer-table")
    assert len(rows) == 10 and {row[-1] for row in rows} == {"pow-2 fallback"}
    page.click("#explorer-table tbody tr:first-child a")
    page.wait_for_selector("#decision-facts")
    facts = dict(shown_rows(page, "#decision-facts"))
    assert (facts["reason"], facts["scores"]) == ("pow-2 fallback", "queue_len 1, match_rate 0.5")
    assert not page.console_errors


def test_the_navigation_keeps_the_filters(server, page):
    page.goto(server.url + "/?app=shop&window=24h")
    page.click("#nav-staleness")
    page.wait_for_url("**/staleness?**")
    assert "app=shop" in page.url and "window=24h" in page.url
    assert shown_text(page, "#staleness-p95") == seconds(api(server, "/v1/staleness", app="shop", window="24h")
                                                   ["deployments"][0]["p95_s"])
    assert not page.console_errors


def test_the_explorer_pages_through_decisions_and_opens_one(server, page):
    page.goto(server.url + "/explorer")
    first = api(server, "/v1/decisions", limit=50)
    page.wait_for_selector("#explorer-table tbody tr")
    assert page.locator("#explorer-table tbody tr").count() == len(first["decisions"]) == 50
    page.click("#explorer-older")
    page.wait_for_url("**cursor=**")
    older = api(server, "/v1/decisions", limit=50, cursor=first["next_cursor"])
    page.wait_for_function(f"document.querySelectorAll('#explorer-table tbody tr').length === "
                           f"{len(older['decisions'])}")
    page.click("#explorer-table tbody tr:first-child a")
    page.wait_for_selector("#decision-candidates")
    wanted = older["decisions"][0]
    assert f"decision={wanted['id']}" in page.url
    detail = api(server, f"/v1/decisions/{wanted['id']}")
    shown = [row[1] for row in shown_rows(page, "#decision-candidates")]
    assert shown == [c["replica_id"] for rank in detail["candidates"] for c in rank]
    assert f"routed to {detail['routed']['replica_id']} (rank 0)" in shown_text(page, "#decision-routed")
    assert "completed at" in shown_text(page, "#decision-completed")
    assert not page.console_errors


def test_a_link_to_a_decision_opens_it(server, page):
    wanted = api(server, "/v1/decisions", app="search", limit=1)["decisions"][0]
    page.goto(server.url + f"/explorer?app=search&decision={wanted['id']}")
    assert wanted["id"] in shown_text(page, "#decision-facts")
    page.goto(server.url + "/explorer?decision=not-a-decision")
    assert "No decision not-a-decision" in shown_text(page, "#decision-missing")
    assert not page.console_errors


def test_a_download_holds_the_rows_the_view_counts(server, page):
    page.goto(server.url + "/distribution?app=shop")
    page.wait_for_selector("#distribution-download-csv")
    with page.expect_download() as download:
        page.click("#distribution-download-csv")
    frame = pd.read_csv(download.value.path())
    dist = api(server, "/v1/distribution", app="shop")
    assert set(frame["app"]) == {"shop"}
    assert frame["replica_id"].value_counts().to_dict() == {r["replica_id"]: r["routed"] for r in dist["replicas"]
                                                            if r["routed"]}
    # A reason filter narrows decisions, not the routed requests the Distribution view counts.
    page.goto(server.url + "/distribution?app=shop&reason=pow-2+fallback")
    with page.expect_download() as download:
        page.click("#distribution-download-csv")
    assert len(pd.read_csv(download.value.path())) == sum(r["routed"] for r in dist["replicas"])
    page.goto(server.url + "/explorer?app=search")
    with page.expect_download() as download:
        page.click("#explorer-download-parquet")
    table = pq.read_table(download.value.path())
    assert table.num_rows == api(server, "/v1/summary", app="search")["decisions"]
    assert set(table.column("app").to_pylist()) == {"search"}
    assert not page.console_errors


def compare_rows(page) -> dict:
    return {row[0]: (row[1], row[2]) for row in shown_rows(page, "#compare-table")}


def test_compare_puts_two_label_values_side_by_side(server, page):
    page.goto(server.url + "/compare")
    assert "Choose two label values" in shown_text(page, "#compare-hint")
    page.click("#compare-a-router_version-a")
    page.wait_for_selector("#compare-a-router_version-a.active")  # the links now carry A's choice
    page.click("#compare-b-router_version-b")
    rows = compare_rows(page)
    a = api(server, "/v1/distribution", label="router_version=a")
    b = api(server, "/v1/distribution", label="router_version=b")
    assert rows["routed requests"] == (number(a["routed"]), number(b["routed"]))
    # Label a holds one deployment, b another: each side's Jain on its deployment's row, none across them.
    (shop,), (search,) = a["deployments"], b["deployments"]
    assert rows[f'Jain\'s fairness index · {shop["app"]}/{shop["deployment"]}'] == \
        (number(shop["imbalance"]["jain"], 3), "–")
    assert rows[f'Jain\'s fairness index · {search["app"]}/{search["deployment"]}'] == \
        ("–", number(search["imbalance"]["jain"], 3))
    assert "Jain's fairness index" not in rows
    hits = [api(server, "/v1/rank-hits", label=f"router_version={v}") for v in "ab"]
    assert rows["rank-0 hit rate"] == tuple(percent(h["rank0_rate"]) for h in hits)
    assert not page.console_errors


def test_compare_a_window_with_the_one_before(server, page):
    page.goto(server.url + "/compare?window=15m&compare_shift=previous")
    rows = compare_rows(page)
    now = api(server, "/v1/distribution", window="15m")
    assert rows["routed requests"] == (number(now["routed"]), "0")  # the traffic is 5 minutes old
    assert not page.console_errors


def test_a_custom_window_in_the_url(server, page):
    since, until = time.time() - 3 * 3600, time.time() + 60
    page.goto(server.url + f"/distribution?since={since}&until={until}&app=shop")
    expected = api(server, "/v1/distribution", since=since, until=until, app="shop")
    assert shown_text(page, "#distribution-routed") == number(expected["routed"])
    assert "custom window" in shown_text(page, "#custom-window")
    page.goto(server.url + f"/distribution?since={time.time() - 7200}&until={time.time() - 3600}&app=shop")
    page.wait_for_function("(document.querySelector('#distribution-routed') || {}).innerText === '0'")
    assert not page.console_errors


def test_auto_refresh_shows_new_data_and_keeps_the_filters(server, page):
    page.goto(server.url + "/distribution?app=shop&refresh=5s")
    before = api(server, "/v1/distribution", app="shop")["routed"]
    assert shown_text(page, "#distribution-routed") == number(before)
    shop = WireSource("shop-proxy-2", app="shop", labels={"router_version": "a"})
    batch = shop.batch(_traffic(shop, time.time() - 60, ["r1", "r2", "r3"], [0, 0, 7]))
    assert httpx.post(f"{server.url}/v1/events", content=json.dumps(batch),
                      headers={"content-type": "application/json"}).status_code == 200
    # Within a few refreshes; on a machine as loaded as CI's can be (load average 17) a refresh's
    # callback has taken longer than the 5 s between them.
    page.wait_for_function(f"(document.querySelector('#distribution-routed') || {{}}).innerText === "
                           f"'{number(before + 7)}'", timeout=60_000)
    assert "app=shop" in page.url and "refresh=5s" in page.url
    assert "search" not in page.inner_text("#distribution-table")
    assert not page.console_errors


def test_with_a_token_the_dashboard_asks_for_it(tmp_path, page):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'guarded.db'}", token="s3cret; with=odd chars")
    with CollectorServer(settings, app_factory=create_up_app) as up:
        assert httpx.get(up.url + "/").status_code == 401
        assert httpx.get(up.url + "/_dash-layout").status_code == 401
        assert httpx.get(up.url + "/v1/summary").status_code == 401
        page.goto(up.url + "/distribution?window=24h")
        page.fill("#token", "wrong")
        page.click("#sign-in")
        assert "Wrong token" in shown_text(page, "#wrong")
        page.fill("#token", "s3cret; with=odd chars")
        page.click("#sign-in")
        page.wait_for_url("**/distribution?window=24h")
        assert "No routing decisions yet" in shown_text(page, "#empty-state")
        # The cookie also opens the API to the browser: the download links work.
        assert page.request.get(up.url + "/v1/summary").status == 200
        assert httpx.get(up.url + "/v1/summary", headers={"authorization": "Bearer s3cret; with=odd chars"}
                         ).status_code == 200
    # A 401 page is an expected error in the console; nothing else is.
    assert all("401" in error for error in page.console_errors)


@pytest.fixture(scope="module")
def replayed(server) -> dict:
    """shop's traffic replayed by the real command through the guide's Uniform router, in each mode
    (decisions: 3 runs, so figures with intervals): mode -> the stored replay's id."""
    db_url = server.app.state.engine.url.render_as_string(hide_password=False)
    made = {}
    for mode, options in (("decisions", ["--runs", "3"]), ("simulate", [])):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert routelens(["replay", "--db", db_url, "--json", "--mode", mode, "--app", "shop", "--seed", "1",
                              "--router", "routelens.routers.examples:UniformRequestRouter", *options]) == 0
        made[mode] = json.loads(printed.getvalue())["id"]
    return made


def whatif_rows(page) -> dict:
    """The chosen replay's table (one deployment): figure -> its cells."""
    return {row[0]: row[1:] for row in shown_rows(page, "#whatif-table-0")}


def test_whatif_shows_a_decisions_replay_as_the_api_says(server, replayed, page):
    """The list, a replay opened from it; its figures with their intervals, the shares charted; the CSV
    holds the rows shown, the JSON is the API's answer."""
    page.goto(server.url + "/whatif")
    listed = httpx.get(f"{server.url}/v1/replays").json()["replays"]
    assert [row[1:3] for row in shown_rows(page, "#whatif-replays")] == [[r["mode"], r["router_class"]]
                                                                        for r in listed]
    page.click(f"#whatif-open-{replayed['decisions']}")
    page.wait_for_url(f"**replay={replayed['decisions']}**")
    record = httpx.get(f"{server.url}/v1/replays/{replayed['decisions']}").json()
    (d,) = record["result"]["deployments"]
    rows = whatif_rows(page)
    assert rows["pick = real replica (agreement)"][1].startswith(percent(d["replay"]["agreement"]["mean"]))
    assert rows["real replica in the first tier"][0] == percent(d["recorded"]["rank0_rate"])
    assert rows["real replica at rank 0"][1].startswith(percent(d["replay"]["ranks"]["0"]["mean"]))
    # A randomized router: where its runs differ, the mean is shown with its 95% interval.
    varied = [r for r in d["replicas"] if r["replay_share"]["low"] < r["replay_share"]["high"]]
    assert varied
    for replica in varied:
        share = replica["replay_share"]
        assert rows[f'share of {replica["replica_id"]}'] == [
            percent(replica["recorded_share"]), f'{percent(share["mean"])} ({percent(share["low"])} to '
                                                f'{percent(share["high"])})']
    page.wait_for_selector("#whatif-shares-0 .main-svg")
    assert page.locator("#whatif-shares-0 .legendtext").all_text_contents() == ["recorded", "replay"]
    assert page.locator("#whatif-shares-0 .trace.bars .point").count() == 2 * len(d["replicas"])
    shown = [["shop/Checkout", *row] for row in shown_rows(page, "#whatif-table-0")]
    assert list(csv.reader(io.StringIO(downloaded(page, "#whatif-download-csv"))))[1:] == shown
    assert json.loads(downloaded(page, "#whatif-download-json")) == record
    assert not page.console_errors


def test_whatif_shows_a_simulate_replay_from_its_url(server, replayed, page):
    page.goto(server.url + f"/whatif?replay={replayed['simulate']}")
    record = httpx.get(f"{server.url}/v1/replays/{replayed['simulate']}").json()
    (d,) = record["result"]["deployments"]
    columns = ("recorded", "recorded_simulated", "replay")
    rows = whatif_rows(page)
    assert page.locator("#whatif-table-0 thead th").all_inner_texts()[1:] == [
        "recorded", "recorded router simulated", "UniformRequestRouter simulated"]
    assert rows["requests"] == [number(d[c]["requests"]) for c in columns]
    assert rows["latency (ms)"] == [" / ".join(number(d[c]["latency_ms"][p], 1) for p in ("p50", "p95", "p99"))
                                    for c in columns]
    assert rows["rejections"] == [number(d[c]["rejections"]) for c in columns]
    for replica in d["replicas"]:
        assert rows[f'share of {replica["replica_id"]}'] == [percent(replica[c]["share"]) for c in columns]
    assert not page.console_errors


def test_whatif_says_what_is_wrong_with_a_replay_id(server, replayed, page):
    page.goto(server.url + "/whatif?replay=not-a-replay")
    assert "'not-a-replay' is not a replay id" in shown_text(page, "#whatif-missing")
    unknown = str(uuid.uuid4())
    page.goto(server.url + f"/whatif?replay={unknown}")
    assert f"No replay {unknown} is stored" in shown_text(page, "#whatif-missing")
    assert shown_rows(page, "#whatif-replays")  # the list, to choose another
    assert not page.console_errors


def test_the_explorer_follows_decisions_live(server, page):
    """Last: it stores more decisions in the module's database."""
    page.goto(server.url + "/explorer?app=shop&reason=locality")
    page.click("#explorer-follow")
    page.wait_for_url("**follow=1**")
    page.wait_for_selector("#explorer-live")
    wait_for(lambda: sse.open_streams(server.url) == 1, 30, "the page to follow /v1/tail")
    src = WireSource("live-proxy", app="shop", deployment="Cart")
    decision = src.decision(time.time(), [["r1"], ["r2"]], request_id="live-1", reason="locality")
    routed = src.routed(time.time(), "r1", decision, rank=0)
    other = WireSource("live-search", app="search", deployment="Cart")
    for source, events in ((other, [other.decision(time.time(), [["s1"]], request_id="not-shop", reason="locality")]),
                           (src, [src.decision(time.time(), [["r2"]], request_id="other-reason", reason="pow2"),
                                  decision, routed, src.completed(time.time(), "r1", routed, latency_ms=7.0)])):
        assert httpx.post(server.url + "/v1/events", json=source.batch(events)).status_code == 200
    page.wait_for_selector("#explorer-live-rows tr")
    assert shown_rows(page, "#explorer-live") == [[decision_time(decision), "shop/Cart", "live-1", "[r1] [r2]",
                                                       "r1", "0", "ok 7.0 ms"]]
    page.click("#explorer-follow")  # stop following: the page lets the stream go
    wait_for(lambda: sse.open_streams(server.url) == 0, 30, "the page to close its stream")
    assert not page.console_errors


def decision_time(decision: dict) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(decision["ts"])) + f".{int(decision['ts'] * 1000) % 1000:03d}"
