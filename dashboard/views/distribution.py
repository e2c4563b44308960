"""Distribution: routed requests per replica, idle members included, against the fair share."""

from __future__ import annotations

from collections import defaultdict

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters

from ..components import card, dates, downloads, number, percent, section, table
from ..state import ViewState


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    sc = figures.scope(conn, f)
    d = figures.distribution(conn, f, sc)
    replicas = d["replicas"]
    imbalance = d["imbalance"]
    cards = html.Div(className="cards", children=[
        card("distribution-routed", "routed requests", number(d["routed"])),
        card("distribution-replicas", "replicas", number(len(replicas))),
        card("distribution-max-over-mean", "max/mean", number(imbalance["max_over_mean"], 2)),
        card("distribution-cv", "coefficient of variation", number(imbalance["cv"], 3)),
        card("distribution-jain", "Jain's fairness index", number(imbalance["jain"], 3)),
    ])
    labels = [r["replica_id"] for r in replicas]
    bars = go.Figure(go.Bar(x=labels, y=[r["routed"] for r in replicas], name="routed",
                            hovertext=[f'{r["deployment"]} · node {r["node_id"]} · {r["availability_zone"]}'
                                       for r in replicas]))
    if d["fair_share"] is not None:  # the window's requests spread evenly over its replicas
        bars.add_hline(y=d["fair_share"], line_dash="dash", annotation_text=f'fair share {d["fair_share"]:,.1f}')
    bars.update_layout(margin=dict(l=40, r=10, t=10, b=80), height=320, yaxis_title="routed requests")

    series = figures.timeseries(conn, f, per_replica=True, sc=sc)
    routed_at = defaultdict(int)
    for point in series["points"]:
        routed_at[point["t"]] += point["routed"]
    # One trace for every replica (a heatmap): 50 stacked areas take a browser a second to draw.
    times = sorted(routed_at)
    ids = sorted({p["replica_id"] for p in series["points"]}, key=str)
    share = {(p["replica_id"], p["t"]): p["routed"] / routed_at[p["t"]] for p in series["points"] if routed_at[p["t"]]}
    shares = go.Figure(go.Heatmap(x=dates(times), y=ids, z=[[share.get((r, t), 0.0) for t in times] for r in ids],
                                  colorscale="Blues", zmin=0, colorbar=dict(title="share", tickformat=".0%")))
    shares.update_layout(margin=dict(l=80, r=10, t=10, b=40), height=max(200, 18 * len(ids) + 80))

    # Imbalance per step, over every replica of the window: those with no request in a step count as 0.
    counts_at = defaultdict(dict)
    for point in series["points"]:
        counts_at[point["t"]][point["replica_id"]] = point["routed"]
    per_step = [figures.imbalance([counts_at[t].get(r["replica_id"], 0) for r in replicas]) for t in times]
    balance = go.Figure([
        go.Scatter(x=dates(times), y=[i["max_over_mean"] for i in per_step], name="max/mean"),
        go.Scatter(x=dates(times), y=[i["jain"] for i in per_step], name="Jain's index", yaxis="y2"),
    ])
    balance.update_layout(margin=dict(l=40, r=40, t=10, b=40), height=260, legend=dict(orientation="h", y=-0.3),
                          yaxis=dict(title="max/mean"), yaxis2=dict(title="Jain", overlaying="y", side="right",
                                                                    range=[0, 1.05]))

    rows = [(r["replica_id"], r["deployment"], r["node_id"] or "–", r["availability_zone"] or "–",
             ", ".join(r["model_ids"]) or "–", number(r["routed"]), percent(r["share"]), number(r["rejections"]))
            for r in replicas]
    return html.Div([
        cards,
        # The routed requests the counts are made of.
        downloads("distribution-download", prefix, state.export_query(f), "routed"),
        section("Routed requests per replica", [dcc.Graph(id="distribution-bars", figure=bars)]),
        section("Share over time", [dcc.Graph(id="distribution-shares", figure=shares)]),
        section("Imbalance over time", [dcc.Graph(id="distribution-imbalance", figure=balance)]),
        section("Replicas", [table("distribution-table", ("replica", "deployment", "node", "zone",
                                                           "models held", "routed", "share", "rejections"),
                                               rows)]),
        section("By node", [_group_table("distribution-by-node", "node_id", d["by_node"])]),
        section("By availability zone", [_group_table("distribution-by-zone", "availability_zone",
                                                      d["by_availability_zone"])]),
    ])


def _group_table(table_id: str, key: str, groups) -> html.Table:
    return table(table_id, (key.replace("_", " "), "replicas", "routed", "share"),
                 [(g[key] or "–", number(g["replicas"]), number(g["routed"]), percent(g["share"])) for g in groups])
