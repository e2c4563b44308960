"""Compare: two label values (say `router_version=a` vs `b`), or the window
against an earlier one, side by side for distribution, staleness and rank hits."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import figures
from routelens.collector.query.filters import Filters
from routelens.collector.settings import parse_duration

from ..components import deployment_name, number, percent, replica_axis, seconds, section, table
from ..state import SHIFTS, ViewState

# Totals over what each side holds: (label, how it is written, how to get it from distribution and rank hits).
FIGURES = [
    ("routed requests", number, lambda d, r: d["routed"]),
    ("replicas", number, lambda d, r: len(d["replicas"])),
    ("rank-0 hit rate", percent, lambda d, r: r["rank0_rate"]),
    ("FIFO hand-off rate", percent, lambda d, r: r["handoff_rate"]),
    ("rejections", number, lambda d, r: r["rejections"]),
    ("decisions per request", lambda v: number(v, 2), lambda d, r: r["decisions_per_request"]["mean"]),
]
# Figures that compare replicas, one row each per deployment: (label, how it is written,
# how to get it from the deployment's entry in distribution and in staleness).
PER_DEPLOYMENT = [
    ("imbalance (max/mean)", lambda v: number(v, 2), lambda d, s: d["imbalance"]["max_over_mean"]),
    ("Jain's fairness index", lambda v: number(v, 3), lambda d, s: d["imbalance"]["jain"]),
    ("staleness p50", seconds, lambda d, s: s["p50_s"]),
    ("staleness p95", seconds, lambda d, s: s["p95_s"]),
    ("staleness max", seconds, lambda d, s: s["max_s"]),
]


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    choices = _choices(conn, state, prefix)
    sides = _sides(f, state)
    if sides is None:
        return html.Div([choices, html.P("Choose two label values, or an earlier window, to compare.",
                                         id="compare-hint")])
    (name_a, f_a), (name_b, f_b) = sides
    side_figures = []
    for f_side in (f_a, f_b):
        sc = figures.scope(conn, f_side)
        side_figures.append((figures.distribution(conn, f_side, sc), figures.staleness(conn, f_side, sc),
                             figures.rank_hits(conn, f_side, sc)))
    (dist_a, stale_a, hits_a), (dist_b, stale_b, hits_b) = side_figures
    rows = [(label, write(get(dist_a, hits_a)), write(get(dist_b, hits_b))) for label, write, get in FIGURES]
    per_a, per_b = _per_deployment(dist_a, stale_a), _per_deployment(dist_b, stale_b)
    for deployment in [*per_a, *(name for name in per_b if name not in per_a)]:
        for label, write, get in PER_DEPLOYMENT:
            rows.append((f"{label} · {deployment}", *(write(get(*per[deployment])) if deployment in per else "–"
                                                     for per in (per_a, per_b))))
    bars = go.Figure([
        go.Bar(name=name, x=replica_axis(d["replicas"]), y=[r["share"] for r in d["replicas"]])
        for name, d in ((name_a, dist_a), (name_b, dist_b))
    ])
    bars.update_layout(barmode="group", height=320, margin=dict(l=40, r=10, t=10, b=100), yaxis_tickformat=".1%",
                       yaxis_title="share of its deployment's routed requests")
    ranks = go.Figure([
        go.Bar(name=name, x=[e["rank"] for e in r["ranks"]], y=[e["share"] for e in r["ranks"]])
        for name, r in ((name_a, hits_a), (name_b, hits_b))
    ])
    ranks.update_layout(barmode="group", height=260, margin=dict(l=40, r=10, t=10, b=40), yaxis_tickformat=".0%",
                        xaxis_title="rank")
    return html.Div([
        choices,
        section("Side by side", [table("compare-table", ("", name_a, name_b), rows)]),
        section("Share of its deployment's routed requests, per replica",
                [dcc.Graph(id="compare-distribution", figure=bars)]),
        section("Routed requests by rank", [dcc.Graph(id="compare-ranks", figure=ranks)]),
    ])


def _per_deployment(dist: dict, stale: dict) -> Dict[str, Tuple[dict, dict]]:
    """Deployment name -> (its distribution entry, its staleness entry), least balanced first."""
    no_samples = {"p50_s": None, "p95_s": None, "max_s": None}
    staleness = {deployment_name(x): x for x in stale["deployments"]}
    return {deployment_name(x): (x, staleness.get(deployment_name(x), no_samples)) for x in dist["deployments"]}


def _sides(f: Filters, state: ViewState) -> Optional[List[Tuple[str, Filters]]]:
    """(name, filters) of the two sides, or None while the choice is incomplete."""
    if state.compare_shift:
        shift = f.seconds if state.compare_shift == "previous" else parse_duration(state.compare_shift)
        earlier = replace(f, since=f.since - shift, until=f.until - shift)
        return [("this window", f), (SHIFTS[state.compare_shift], earlier)]
    if state.compare_a and state.compare_b:
        return [(label, replace(f, labels=f.labels + (tuple(label.split("=", 1)),)))
                for label in (state.compare_a, state.compare_b)]
    return None


def _choices(conn: Connection, state: ViewState, prefix: str) -> html.Div:
    """Links that set what is compared (each a URL, like everything else)."""
    labels = figures.deployments(conn)["labels"]
    links: List = []
    for key, values in labels.items():
        for side in ("a", "b"):
            chosen = getattr(state, f"compare_{side}")
            links.append(html.Span(f"{side.upper()}: ", style={"marginLeft": "12px"}))
            for value in values:
                label = f"{key}={value}"
                target = state.with_(**{f"compare_{side}": label}, compare_shift=None)
                links.append(dcc.Link(label, href=target.href(prefix), id=f"compare-{side}-{key}-{value}",
                                      className="active" if chosen == label else "", style={"marginRight": "8px"}))
    links.append(html.Span("or this window against: ", style={"marginLeft": "12px"}))
    for shift, title in SHIFTS.items():
        target = state.with_(compare_shift=shift, compare_a=None, compare_b=None)
        links.append(dcc.Link(title, href=target.href(prefix), id=f"compare-shift-{shift}",
                              className="active" if state.compare_shift == shift else "",
                              style={"marginRight": "8px"}))
    return html.Div(links, id="compare-choices", className="panel")
