"""Staleness: how old the routing stats were that decisions ranked on, per replica, against the stats period."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters

from ..components import card, dates, number, seconds, section, table


def render(conn: Connection, f: Filters, _state=None) -> html.Div:
    sc = figures.scope(conn, f)
    s = figures.staleness(conn, f, sc)
    overall, period = s["overall"], s["stats_period_s"]
    replicas = s["replicas"]
    cards = html.Div(className="cards", children=[
        card("staleness-p50", "p50", seconds(overall["p50_s"])),
        card("staleness-p95", "p95", seconds(overall["p95_s"]),
             alert=period is not None and overall["p95_s"] is not None and overall["p95_s"] > 2 * period,
             hint="highlighted beyond twice the stats period"),
        card("staleness-max", "max", seconds(overall["max_s"])),
        card("staleness-period", "stats period (seen)", seconds(period),
             hint="median interval between two collections of a replica's stats"),
        card("staleness-stamped", "stamped / observed", f'{number(overall["stamped"])} / '
                                                         f'{number(overall["observed"])}',
             hint="stamped: exact (@stamp_routing_stats); observed: since the router first saw the value, "
                  "an upper bound"),
    ])
    ids = [r["replica_id"] for r in replicas]
    bars = go.Figure([
        go.Bar(x=ids, y=[r["p50_s"] for r in replicas], name="p50"),
        go.Bar(x=ids, y=[r["p95_s"] for r in replicas], name="p95"),
        go.Bar(x=ids, y=[r["max_s"] for r in replicas], name="max"),
    ])
    if period is not None:
        bars.add_hline(y=period, line_dash="dash", annotation_text=f"stats period {period:.2f} s")
    bars.update_layout(barmode="group", margin=dict(l=40, r=10, t=10, b=80), height=320, yaxis_title="seconds")

    series = figures.timeseries(conn, f, per_replica=True, sc=sc)["points"]
    times = sorted({p["t"] for p in series})
    rows = sorted({p["replica_id"] for p in series}, key=str)
    cell = {(p["replica_id"], p["t"]): p["staleness_p95_s"] for p in series}
    heatmap = go.Figure(go.Heatmap(x=dates(times), y=rows, z=[[cell.get((r, t)) for t in times] for r in rows],
                                   colorscale="YlOrRd", colorbar=dict(title="p95 s")))
    heatmap.update_layout(margin=dict(l=80, r=10, t=10, b=40), height=max(200, 26 * len(rows) + 80))

    table_rows = [(r["replica_id"], r["deployment"], number(r["samples"]), seconds(r["p50_s"]),
                   seconds(r["p95_s"]), seconds(r["max_s"]), number(r["stamped"]), number(r["observed"]))
                  for r in replicas]
    return html.Div([
        cards,
        section("Per replica, against the stats period", [dcc.Graph(id="staleness-bars", figure=bars)]),
        section("p95 staleness, replica x time", [dcc.Graph(id="staleness-heatmap", figure=heatmap)]),
        section("Replicas", [table("staleness-table", ("replica", "deployment", "samples", "p50", "p95", "max",
                                                        "stamped", "observed"), table_rows)]),
    ])
