"""Prefix affinity: whether requests that share a prompt prefix stay on one
replica (LLM routers that record prefix groups, routers.llm): per prefix
group, the share of its requests on its top replica; groups split across
replicas over time; the match rate the router saw. The CSV download holds
the tables as shown, the JSON download is the API's answer."""

from __future__ import annotations

from typing import List

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import prefixes
from routelens.collector.query.filters import Filters

from ..components import card, dates, deployment_name, number, percent, section, table, table_downloads
from ..state import ViewState

DEPLOYMENT_COLUMNS = ("deployment", "prefix groups", "requests", "concentration", "split groups", "split share",
                      "match rate, mean")
GROUP_COLUMNS = ("prefix group", "deployment", "requests", "replicas", "top replica", "share on top replica",
                 "match rate, mean", "prompt length, mean")


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    p = prefixes.prefix_affinity(conn, f)
    deployments, groups, points = p["deployments"], p["groups"], p["over_time"]
    if not deployments:
        return html.Div(className="empty", id="prefix-affinity-empty", children=[
            html.H2("No prefix groups in this window"),
            html.P(["Prefix groups come from LLM routers that record them, such as ",
                    html.Code("routelens.routers.llm.TracedPrefixCacheAffinityRouter"),
                    " (docs/llm.md); the demo's llm app uses it."]),
        ])
    total = p["total"]
    cards = html.Div(className="cards", children=[
        card("prefix-affinity-groups", "prefix groups", number(total["groups"])),
        card("prefix-affinity-requests", "requests with a prefix group", number(total["requests"])),
        card("prefix-affinity-concentration", "concentration", number(total["concentration"], 3),
             hint="the mean, over prefix groups, of the share of a group's requests on its top replica"),
        card("prefix-affinity-split", "groups split across replicas", number(total["split_groups"])),
        card("prefix-affinity-match-rate", "match rate, mean", percent(total["match_rate_mean"]),
             hint="the share of each prompt the router found in its prefix tree, as it recorded it"),
    ])
    deployment_rows = [(deployment_name(d), number(d["groups"]), number(d["requests"]), number(d["concentration"], 3),
                        number(d["split_groups"]), percent(d["split_share"]), percent(d["match_rate_mean"]))
                       for d in deployments]
    group_rows = [(g["prefix_group"], deployment_name(g), number(g["requests"]), number(g["replicas"]),
                   g["top_replica_id"] or "–", percent(g["top_share"]), percent(g["match_rate_mean"]),
                   number(g["prompt_chars_mean"])) for g in groups]
    json_href = f"{prefix}v1/prefix-affinity?{state.read_query(f)}"
    return html.Div([
        cards,
        table_downloads("prefix-affinity-download", f"prefix-affinity-{int(f.since)}-{int(f.until)}",
                        [("table", *GROUP_COLUMNS)] + [("deployments", *row) for row in deployment_rows]
                        + [("groups", *row) for row in group_rows], json_href),
        section("Deployments", [table("prefix-affinity-deployments", DEPLOYMENT_COLUMNS, deployment_rows)]),
        section("Prefix groups split across replicas over time (share of the step's groups)", [dcc.Graph(
            id="prefix-affinity-split-over-time", figure=_over_time(points, deployments, "split_share", ".0%"))]),
        section("Concentration over time", [dcc.Graph(
            id="prefix-affinity-concentration-over-time",
            figure=_over_time(points, deployments, "concentration", ".2f"))]),
        section(f"Prefix groups, most requests first (at most {prefixes.MAX_GROUPS})", [
            dcc.Graph(id="prefix-affinity-groups-chart", figure=_by_replica(groups)),
            table("prefix-affinity-groups-table", GROUP_COLUMNS, group_rows)]),
    ])


def _over_time(points: List[dict], deployments: List[dict], figure: str, tick_format: str) -> go.Figure:
    chart = go.Figure([go.Scatter(x=dates(p["t"] for p in points if _same(p, d)),
                                  y=[p[figure] for p in points if _same(p, d)],
                                  name=deployment_name(d), mode="lines+markers") for d in deployments])
    chart.update_layout(margin=dict(l=40, r=10, t=10, b=40), height=240, yaxis_tickformat=tick_format,
                        legend=dict(orientation="h", y=-0.3))
    return chart


def _same(point: dict, deployment: dict) -> bool:
    return (point["app"], point["deployment"]) == (deployment["app"], deployment["deployment"])


def _by_replica(groups: List[dict]) -> go.Figure:
    """Each group's requests, its top replica's share apart from the rest's."""
    names = [g["prefix_group"] for g in groups]
    chart = go.Figure([
        go.Bar(x=names, y=[g["top_share"] * g["requests"] for g in groups], name="on its top replica"),
        go.Bar(x=names, y=[(1 - g["top_share"]) * g["requests"] for g in groups], name="elsewhere"),
    ])
    chart.update_layout(barmode="stack", margin=dict(l=40, r=10, t=10, b=80), height=260,
                        yaxis_title="requests", legend=dict(orientation="h", y=1.1))
    return chart
