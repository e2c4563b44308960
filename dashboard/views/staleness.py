"""Staleness: how old the routing stats were that decisions ranked on, per
replica, against its deployment's stats period; stalest deployment first."""

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
    replica_axis,
    replica_name,
    seconds,
    section,
    table,
    too_stale,
    worst_note,
)


def render(conn: Connection, f: Filters, _state=None) -> html.Div:
    sc = figures.scope(conn, f)
    s = figures.staleness(conn, f, sc)
    replicas, deployments = s["replicas"], s["deployments"]
    # The cards show the stalest deployment's figures (against its own period); the table, every deployment's.
    worst = deployments[0] if deployments else {
        "p50_s": None, "p95_s": None, "max_s": None, "stats_period_s": None, "p95_over_period": None,
        "stamped": 0, "observed": 0}
    note = worst_note(worst, len(deployments))
    cards = html.Div(className="cards", children=[
        card("staleness-p50", "p50", seconds(worst["p50_s"]), note=note),
        card("staleness-p95", "p95", seconds(worst["p95_s"]), alert=too_stale(worst),
             hint=f"highlighted beyond {STALE_ALERT_PERIODS} stats periods", note=note),
        card("staleness-max", "max", seconds(worst["max_s"]), note=note),
        card("staleness-period", "stats period (seen)", seconds(worst["stats_period_s"]),
             hint="median interval between two collections of a replica's stats", note=note),
        card("staleness-stamped", "stamped / observed", f'{number(worst["stamped"])} / {number(worst["observed"])}',
             hint="stamped: exact (@stamp_routing_stats); observed: since the router first saw the value, "
                  "an upper bound", note=note),
    ])
    period = {deployment_name(x): x["stats_period_s"] for x in deployments}
    axis = replica_axis(replicas)
    bars = go.Figure([
        go.Bar(x=axis, y=[r["p50_s"] for r in replicas], name="p50"),
        go.Bar(x=axis, y=[r["p95_s"] for r in replicas], name="p95"),
        go.Bar(x=axis, y=[r["max_s"] for r in replicas], name="max"),
        go.Scatter(x=axis, y=[period.get(deployment_name(r)) for r in replicas], name="its stats period",
                   mode="markers", marker=dict(symbol="line-ew-open", size=24, line=dict(width=2), color="#333")),
    ])
    bars.update_layout(barmode="group", margin=dict(l=40, r=10, t=10, b=100), height=340, yaxis_title="seconds",
                       legend=dict(orientation="h", y=1.1))

    series = figures.timeseries(conn, f, per_replica=True, sc=sc)["points"]
    times = sorted({p["t"] for p in series})
    rows = [replica_name(r) for r in replicas]
    cell = {(replica_name(p), p["t"]): p["staleness_p95_s"] for p in series}
    heatmap = go.Figure(go.Heatmap(x=dates(times), y=rows, z=[[cell.get((r, t)) for t in times] for r in rows],
                                   colorscale="YlOrRd", colorbar=dict(title="p95 s")))
    heatmap.update_layout(margin=dict(l=200, r=10, t=10, b=40), height=max(200, 26 * len(rows) + 80))

    deployment_rows = [(deployment_name(x), seconds(x["stats_period_s"]), number(x["samples"]), seconds(x["p50_s"]),
                        seconds(x["p95_s"]), seconds(x["max_s"]), number(x["p95_over_period"], 2),
                        number(x["stamped"]), number(x["observed"])) for x in deployments]
    replica_rows = [(r["replica_id"], deployment_name(r), number(r["samples"]), seconds(r["p50_s"]),
                     seconds(r["p95_s"]), seconds(r["max_s"]), number(r["stamped"]), number(r["observed"]))
                    for r in replicas]
    return html.Div([
        cards,
        section("Deployments, stalest against their stats period first", [table(
            "staleness-deployments", ("deployment", "stats period", "samples", "p50", "p95", "max", "p95 / period",
                                      "stamped", "observed"), deployment_rows)]),
        section("Per replica, against its deployment's stats period", [dcc.Graph(id="staleness-bars", figure=bars)]),
        section("p95 staleness, replica x time", [dcc.Graph(id="staleness-heatmap", figure=heatmap)]),
        section("Replicas", [table("staleness-table", ("replica", "deployment", "samples", "p50", "p95", "max",
                                                        "stamped", "observed"), replica_rows)]),
    ])

