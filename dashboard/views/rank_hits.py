"""Rank hits: whether requests got the replica their router ranked first, what got in the way,
how good the choices were (decision quality: regret and belief error), and why the routers say
they decided as they did (their reasons, `routelens_explain`)."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters
from routelens.collector.store.bins import RANK_COLUMNS

from ..components import card, dates, deployment_name, downloads, number, percent, section, table
from ..state import ViewState

SEND_TO_ROUTED_HINT = ("from a request's send to on_request_routed: the replica's answer, then however long "
                       "the router held its loop (latencies start at the send)")
QUALITY_HEADINGS = ("answers", "regret mean", "regret p95", "regret > 0", "belief error mean",
                    "|belief error| mean", "|belief error| p95")


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    sc = figures.scope(conn, f)
    r = figures.rank_hits(conn, f, sc)
    choose, send = r["choose_us"], r["send_to_routed_ms"]
    # Unknown for the routed requests without it (tracers before wire format v3; sends without the
    # rejection protocol): said so, never shown as 0.
    send_unknown = r["routed"] - send["samples"]
    send_note = f"unknown for {number(send_unknown)} routed" if send_unknown > 0 else ""
    regret, belief = r["decision_quality"]["regret"], r["decision_quality"]["belief_error"]
    cards = html.Div(className="cards", children=[
        card("rank-hits-rank0-rate", "rank-0 hit rate", percent(r["rank0_rate"])),
        card("rank-hits-handoff-rate", "FIFO hand-off rate", percent(r["handoff_rate"]),
             hint="routed requests given a replica found for another request"),
        card("rank-hits-rejections", "rejections", number(r["rejections"]), alert=bool(r["rejections"])),
        card("rank-hits-decisions-per-request", "decisions per request",
             number(r["decisions_per_request"]["mean"], 2)),
        card("rank-hits-choose-p50", "choose_replicas p50", f'{number(choose["p50"])} µs'),
        card("rank-hits-choose-p99", "choose_replicas p99", f'{number(choose["p99"])} µs'),
        card("rank-hits-send-to-routed-p50", "send → routed p50", _milliseconds(send["p50"], send["samples"]),
             hint=SEND_TO_ROUTED_HINT, note=send_note),
        card("rank-hits-send-to-routed-p99", "send → routed p99", _milliseconds(send["p99"], send["samples"]),
             hint=SEND_TO_ROUTED_HINT),
        card("rank-hits-regret-mean", "regret, mean", number(regret["mean"], 2),
             hint="the chosen replica's queue length minus the shortest among the candidates, as the router saw them"),
        card("rank-hits-regret-positive", "decisions with regret > 0", percent(regret["positive_share"]),
             hint="answers whose replica's queue was longer than another candidate's"),
        card("rank-hits-regret-p95", "regret p95", number(regret["p95"])),
        card("rank-hits-belief-error-mean-abs", "|belief error|, mean", number(belief["mean_abs"], 2),
             hint="the queue length the router believed against the one the replica reported as it answered"),
        card("rank-hits-belief-error-p95", "|belief error| p95", number(belief["p95_abs"])),
    ])
    series = figures.timeseries(conn, f, sc=sc)["points"]
    times = dates(p["t"] for p in series)
    shares = go.Figure([
        go.Scatter(x=times, y=[p[column] / p["routed"] if p["routed"] else None for p in series],
                   name=_rank_name(column), stackgroup="rank")
        for column in RANK_COLUMNS
    ])
    shares.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=300, yaxis_tickformat=".0%")
    handoffs = go.Figure(go.Scatter(x=times, y=[p["handoffs"] / p["routed"] if p["routed"] else None
                                                for p in series], name="hand-off rate"))
    handoffs.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=220, yaxis_tickformat=".0%")
    ranks = table("rank-hits-ranks", ("rank", "routed", "share"),
                  [(entry["rank"], number(entry["routed"]), percent(entry["share"])) for entry in r["ranks"]])
    deployments = table("rank-hits-deployments", ("deployment", "routed", "rank-0 rate", "FIFO hand-off rate",
                                                  "rejections", "decisions per request"),
                        [(deployment_name(x), number(x["routed"]), percent(x["rank0_rate"]),
                          percent(x["handoff_rate"]), number(x["rejections"]),
                          number(x["decisions_per_request_mean"], 2)) for x in r["deployments"]])
    replicas = table("rank-hits-replicas", ("replica", "deployment", "routed", "rank-0 rate", "hand-offs",
                                            "rejections"),
                     [(x["replica_id"], deployment_name(x), number(x["routed"]), percent(x["rank0_rate"]),
                       number(x["handoffs"]), number(x["rejections"])) for x in r["replicas"]])
    attempts = table("rank-hits-attempts", ("decisions for the request", "routed requests"),
                     [(b["attempts"], number(b["routed"])) for b in r["decisions_per_request"]["bins"]])
    quality_deployments = table("rank-hits-quality-deployments", ("deployment", *QUALITY_HEADINGS),
                                [(deployment_name(x), *quality_cells(x["decision_quality"])) for x in r["deployments"]])
    quality_replicas = table("rank-hits-quality-replicas", ("replica", "deployment", *QUALITY_HEADINGS),
                             [(x["replica_id"], deployment_name(x), *quality_cells(x["decision_quality"]))
                              for x in r["replicas"]])
    over_time = r["decision_quality_over_time"]["deployments"]
    reasons = r["reasons"]["deployments"]
    return html.Div([
        cards,
        # The decisions, each with its answer's regret and belief error (and everything else counted here).
        downloads("rank-hits-download", prefix, state.export_query(f, "decisions")),
        section("Routed requests by rank", [ranks]),
        section("Deployments, lowest rank-0 hit rate first", [deployments]),
        section("Share by rank over time", [dcc.Graph(id="rank-hits-shares", figure=shares)]),
        section("FIFO hand-off rate over time", [dcc.Graph(id="rank-hits-handoffs", figure=handoffs)]),
        section("Per replica", [replicas]),
        section("Decisions per request", [attempts]),
        section("Decision quality per deployment", [quality_deployments]),
        section("Regret over time, per deployment (mean)", [dcc.Graph(
            id="rank-hits-regret-over-time", figure=_over_time(over_time, "regret", "mean", "regret (requests)"))]),
        section("Belief error over time, per deployment (mean absolute)", [dcc.Graph(
            id="rank-hits-belief-over-time",
            figure=_over_time(over_time, "belief_error", "mean_abs", "|belief error| (requests)"))]),
        section("Decision quality per replica", [quality_replicas]),
        section("Decisions by the router's reason, per deployment", [reasons_table(reasons)]),
        section("Decisions by reason over time", [dcc.Graph(id="rank-hits-reasons-over-time",
                                                            figure=_reasons_over_time(reasons))]),
    ])


def reasons_table(deployments: list) -> html.Table:
    """Each deployment's reasons, most frequent first, and its decisions without one."""
    rows = []
    for d in deployments:
        rows += [(deployment_name(d), _reason_label(x), number(x["decisions"]), percent(x["share"]))
                 for x in d["reasons"]]
        if d["unexplained"]:
            rows.append((deployment_name(d), "(no reason)", number(d["unexplained"]),
                         percent(d["unexplained"] / d["decisions"])))
    return table("rank-hits-reasons", ("deployment", "reason", "decisions", "share of its decisions"), rows)


def _reasons_over_time(deployments: list) -> go.Figure:
    """Decisions per step, one line per reason of each deployment (named with it when several are shown)."""
    several = len(deployments) > 1
    traces = []
    for d in deployments:
        times = dates(p["t"] for p in d["points"])
        for x in d["reasons"]:
            counts = [next((y["decisions"] for y in p["reasons"] if y["other"] == x["other"]
                            and y["reason"] == x["reason"]), 0) for p in d["points"]]
            traces.append(go.Scatter(x=times, y=counts, mode="lines+markers",
                                     name=_reason_label(x) + (f" ({deployment_name(d)})" if several else "")))
    chart = go.Figure(traces)
    chart.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=300, yaxis_title="decisions per step",
                        legend=dict(orientation="h", y=-0.3))
    return chart


def _reason_label(reason: dict) -> str:
    return "(other reasons)" if reason["other"] else reason["reason"]


def quality_cells(quality: dict) -> tuple:
    """A row's decision-quality cells, in QUALITY_HEADINGS' order."""
    regret, belief = quality["regret"], quality["belief_error"]
    return (number(regret["samples"]), number(regret["mean"], 2), number(regret["p95"]),
            percent(regret["positive_share"]), number(belief["mean"], 2), number(belief["mean_abs"], 2),
            number(belief["p95_abs"]))


def _over_time(deployments: list, figure: str, statistic: str, title: str) -> go.Figure:
    """One line per deployment: `statistic` of `figure` (regret or belief_error) per step."""
    chart = go.Figure([go.Scatter(x=dates(p["t"] for p in d["points"]), y=[p[figure][statistic] for p in d["points"]],
                                  name=deployment_name(d), mode="lines+markers")
                       for d in deployments])
    chart.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=260, yaxis_title=title,
                        legend=dict(orientation="h", y=-0.3))
    return chart


def _rank_name(column: str) -> str:
    return {"rank_5": "rank 5+", "rank_unknown": "unknown"}.get(column, column.replace("_", " "))


def _milliseconds(value, samples: int) -> str:
    return f"{number(value, 1)} ms" if samples else "unknown"
