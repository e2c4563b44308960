"""Overview: the window's figures at a glance, per deployment, and traffic over time."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters

from ..components import (
    STALE_ALERT_PERIODS,
    card,
    dates,
    deployment_name,
    number,
    percent,
    seconds,
    section,
    table,
    too_stale,
    worst_note,
)


def render(conn: Connection, f: Filters, _state=None) -> html.Div:
    sc = figures.scope(conn, f)
    s = figures.summary(conn, f, sc)
    series = figures.timeseries(conn, f, sc=sc)
    # Imbalance and staleness compare replicas: each deployment has its own, and a card shows the worst one's.
    imbalance, staleness, deployments = s["imbalance"], s["staleness"], s["deployments"]
    period = staleness["stats_period_s"]
    least_balanced = worst_note(imbalance, len(deployments))
    cards = html.Div(className="cards", children=[
        card("overview-decisions-per-s", "decisions/s", number(s["decisions_per_s"], 2)),
        card("overview-routed-per-s", "routed/s", number(s["routed_per_s"], 2)),
        card("overview-rank0-rate", "rank-0 hit rate", percent(s["rank0_rate"]),
             hint="share of routed requests whose replica came from rank 0 of its decision"),
        card("overview-staleness-p95", "p95 stats staleness", seconds(staleness["p95_s"]),
             alert=too_stale(staleness),
             hint="the deployment whose stats are the oldest against its own stats period; "
                  f"highlighted beyond {STALE_ALERT_PERIODS} periods",
             note=worst_note(staleness, len(deployments)) + ("" if period is None else f", period {seconds(period)}")),
        card("overview-max-over-mean", "imbalance (max/mean)", number(imbalance["max_over_mean"], 2),
             hint="the least balanced deployment's (lowest Jain's index)", note=least_balanced),
        card("overview-jain", "Jain's fairness index", number(imbalance["jain"], 3),
             hint="the least balanced deployment's", note=least_balanced),
        card("overview-active-routers", "active routers", number(s["active_routers"])),
        card("overview-dropped-events", "dropped events", number(s["dropped_events"]),
             alert=bool(s["dropped_events"]), hint="events the tracers could not deliver, by their own count"),
        card("overview-batch-gaps", "lost batches", number(s["batch_gaps"]), alert=bool(s["batch_gaps"]),
             hint="gaps in the batch numbers the collector received"),
    ])
    rows = [(deployment_name(d), number(d["replicas"]), number(d["routed"]), percent(d["rank0_rate"]),
             number(d["rejections"]), number(d["imbalance"]["jain"], 3), number(d["imbalance"]["max_over_mean"], 2),
             seconds(d["staleness"]["p95_s"]), seconds(d["staleness"]["stats_period_s"]))
            for d in deployments]
    points = series["points"]
    times = [p["t"] for p in points]
    step = series["step_s"]
    figure = go.Figure([
        go.Scatter(x=dates(times), y=[p["decisions"] / step for p in points], name="decisions/s"),
        go.Scatter(x=dates(times), y=[p["routed"] / step for p in points], name="routed/s"),
        go.Scatter(x=dates(times), y=[p["rejections"] / step for p in points], name="rejections/s"),
    ])
    figure.update_layout(margin=dict(l=40, r=10, t=10, b=50), height=320, legend=dict(orientation="h", y=-0.25),
                         yaxis_title=f"per second ({step // 60} min steps)")
    return html.Div([
        cards,
        section("Deployments, least balanced first", [table(
            "overview-deployments", ("deployment", "replicas", "routed", "rank-0 rate", "rejections", "Jain",
                                     "max/mean", "p95 staleness", "stats period"), rows)]),
        section("Traffic", [dcc.Graph(id="overview-traffic", figure=figure)]),
    ])
