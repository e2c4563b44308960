"""Rank hits: whether requests got the replica their router ranked first, and what got in the way."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters
from routelens.collector.store.bins import RANK_COLUMNS

from ..components import card, dates, deployment_name, number, percent, section, table


def render(conn: Connection, f: Filters, _state=None) -> html.Div:
    sc = figures.scope(conn, f)
    r = figures.rank_hits(conn, f, sc)
    choose = r["choose_us"]
    cards = html.Div(className="cards", children=[
        card("rank-hits-rank0-rate", "rank-0 hit rate", percent(r["rank0_rate"])),
        card("rank-hits-handoff-rate", "FIFO hand-off rate", percent(r["handoff_rate"]),
             hint="routed requests given a replica found for another request"),
        card("rank-hits-rejections", "rejections", number(r["rejections"]), alert=bool(r["rejections"])),
        card("rank-hits-decisions-per-request", "decisions per request",
             number(r["decisions_per_request"]["mean"], 2)),
        card("rank-hits-choose-p50", "choose_replicas p50", f'{number(choose["p50"])} µs'),
        card("rank-hits-choose-p99", "choose_replicas p99", f'{number(choose["p99"])} µs'),
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
    return html.Div([
        cards,
        section("Routed requests by rank", [ranks]),
        section("Deployments, lowest rank-0 hit rate first", [deployments]),
        section("Share by rank over time", [dcc.Graph(id="rank-hits-shares", figure=shares)]),
        section("FIFO hand-off rate over time", [dcc.Graph(id="rank-hits-handoffs", figure=handoffs)]),
        section("Per replica", [replicas]),
        section("Decisions per request", [attempts]),
    ])


def _rank_name(column: str) -> str:
    return {"rank_5": "rank 5+", "rank_unknown": "unknown"}.get(column, column.replace("_", " "))
