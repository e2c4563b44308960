"""Distribution: routed requests per replica, idle members included, against
its deployment's fair share; imbalance per deployment, least balanced first."""

from __future__ import annotations

from collections import defaultdict

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters

from ..components import (
    card,
    dates,
    deployment_name,
    downloads,
    number,
    percent,
    replica_axis,
    replica_name,
    section,
    table,
    worst_note,
)
from ..state import ViewState


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    sc = figures.scope(conn, f)
    d = figures.distribution(conn, f, sc)
    replicas, deployments = d["replicas"], d["deployments"]
    worst = deployments[0] if deployments else {"imbalance": figures.imbalance([])}
    note = worst_note(worst, len(deployments))
    cards = html.Div(className="cards", children=[
        card("distribution-routed", "routed requests", number(d["routed"])),
        card("distribution-replicas", "replicas", number(len(replicas))),
        card("distribution-deployment-count", "deployments", number(len(deployments))),
        card("distribution-max-over-mean", "max/mean", number(worst["imbalance"]["max_over_mean"], 2), note=note),
        card("distribution-cv", "coefficient of variation", number(worst["imbalance"]["cv"], 3), note=note),
        card("distribution-jain", "Jain's fairness index", number(worst["imbalance"]["jain"], 3), note=note),
    ])
    fair = {deployment_name(x): x["fair_share"] for x in deployments}
    bars = go.Figure([
        go.Bar(x=replica_axis(replicas), y=[r["routed"] for r in replicas], name="routed",
               hovertext=[f'node {r["node_id"]} · {r["availability_zone"]}' for r in replicas]),
        # Each replica against its own deployment's fair share: its requests spread evenly over its replicas.
        go.Scatter(x=replica_axis(replicas), y=[fair[deployment_name(r)] for r in replicas], name="fair share",
                   mode="markers", marker=dict(symbol="line-ew-open", size=24, line=dict(width=2), color="#333")),
    ])
    bars.update_layout(margin=dict(l=40, r=10, t=10, b=100), height=340, yaxis_title="routed requests",
                       legend=dict(orientation="h", y=1.1))

    series = figures.timeseries(conn, f, per_replica=True, sc=sc)["points"]
    times = sorted({p["t"] for p in series})
    # Shares and imbalance per step are within each deployment, over all its replicas of the window.
    routed_at = defaultdict(int)
    for point in series:
        routed_at[deployment_name(point), point["t"]] += point["routed"]
    counts_at = {(replica_name(p), p["t"]): p["routed"] for p in series}
    rows = [replica_name(r) for r in replicas]
    shares = go.Figure(go.Heatmap(
        x=dates(times), y=rows, colorscale="Blues", zmin=0, colorbar=dict(title="share", tickformat=".0%"),
        z=[[counts_at.get((name, t), 0) / routed_at[deployment_name(r), t] if routed_at[deployment_name(r), t]
            else None for t in times] for name, r in zip(rows, replicas)]))
    shares.update_layout(margin=dict(l=200, r=10, t=10, b=40), height=max(200, 18 * len(rows) + 80))
    members = defaultdict(list)  # deployment -> its replicas' names
    for name, r in zip(rows, replicas):
        members[deployment_name(r)].append(name)
    balance = go.Figure([
        go.Scatter(x=dates(times), name=deployment_name(x), y=[
            figures.imbalance([counts_at.get((name, t), 0) for name in members[deployment_name(x)]])["jain"]
            for t in times])
        for x in deployments])
    balance.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=260, legend=dict(orientation="h", y=-0.3),
                          yaxis=dict(title="Jain's index", range=[0, 1.05]))

    deployment_rows = [(deployment_name(x), number(x["replicas"]), number(x["routed"]), number(x["fair_share"], 1),
                        number(x["imbalance"]["max_over_mean"], 2), number(x["imbalance"]["cv"], 3),
                        number(x["imbalance"]["jain"], 3)) for x in deployments]
    replica_rows = [(r["replica_id"], deployment_name(r), r["node_id"] or "–", r["availability_zone"] or "–",
                     ", ".join(r["model_ids"]) or "–", number(r["routed"]), percent(r["share"]),
                     number(r["rejections"])) for r in replicas]
    return html.Div([
        cards,
        # The routed requests the counts are made of.
        downloads("distribution-download", prefix, state.export_query(f, "routed")),
        section("Deployments, least balanced first", [table(
            "distribution-deployments", ("deployment", "replicas", "routed", "fair share", "max/mean", "CV", "Jain"),
            deployment_rows)]),
        section("Routed requests per replica, against its deployment's fair share",
                [dcc.Graph(id="distribution-bars", figure=bars)]),
        section("Share of its deployment over time", [dcc.Graph(id="distribution-shares", figure=shares)]),
        section("Jain's index over time, per deployment", [dcc.Graph(id="distribution-imbalance", figure=balance)]),
        section("Replicas", [table("distribution-table", ("replica", "deployment", "node", "zone", "models held",
                                                          "routed", "share of deployment", "rejections"),
                                   replica_rows)]),
        section("By node", [_group_table("distribution-by-node", "node_id", deployments)]),
        section("By availability zone", [_group_table("distribution-by-zone", "availability_zone", deployments)]),
    ])


def _group_table(table_id: str, key: str, deployments) -> html.Table:
    group_key = {"node_id": "by_node", "availability_zone": "by_availability_zone"}[key]
    return table(table_id, ("deployment", key.replace("_", " "), "replicas", "routed", "share of deployment"),
                 [(deployment_name(x), g[key] or "–", number(g["replicas"]), number(g["routed"]), percent(g["share"]))
                  for x in deployments for g in x[group_key]])
