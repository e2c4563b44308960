"""Pieces every view uses: number cards, tables and how numbers are written.

Tests read the numbers off the page and compare them with the API's, written
by the same functions: a card's value has the id `<view>-<figure>`.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from typing import Iterable, List, Optional, Sequence
from urllib.parse import quote

from dash import html

# p95 stats staleness beyond this many of its deployment's stats periods is highlighted.
STALE_ALERT_PERIODS = 2


def too_stale(staleness: dict) -> bool:
    """Whether a deployment's p95 staleness (`p95_over_period`) is to be highlighted."""
    return staleness["p95_over_period"] is not None and staleness["p95_over_period"] > STALE_ALERT_PERIODS


def number(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def seconds(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def dates(epoch_seconds: Iterable[float]) -> List[datetime]:
    """Times for a chart's x axis (UTC)."""
    return [datetime.fromtimestamp(t, timezone.utc) for t in epoch_seconds]


def card(card_id: str, label: str, value: str, alert: bool = False, hint: str = "", note: str = "") -> html.Div:
    """A figure with its label; `alert` highlights it (dropped events, lost
    batches); `note`, under the value (id `<card_id>-note`), says whose it is."""
    return html.Div(className="card alert" if alert else "card", title=hint, children=[
        html.Div(label, className="card-label"),
        html.Div(value, id=card_id, className="card-value"),
        *([html.Div(note, id=f"{card_id}-note", className="card-note")] if note else []),
    ])


def deployment_name(row: dict) -> str:
    """`app/deployment` of a row of the API (a replica, a deployment's figures)."""
    return "–" if row.get("deployment") is None else f'{row["app"]}/{row["deployment"]}'


def replica_name(row: dict) -> str:
    """A replica with its deployment, for charts that show several deployments' replicas."""
    return f'{deployment_name(row)} · {row["replica_id"]}'


def replica_axis(rows: Sequence[dict]) -> List[List[str]]:
    """A chart's x values for replicas: a two-level axis, each replica under its deployment."""
    return [[deployment_name(r) for r in rows], [r["replica_id"] for r in rows]]


def worst_note(row: dict, count: int) -> str:
    """Whose figure a card shows when it shows one deployment's of several."""
    if row.get("deployment") is None:
        return ""
    return deployment_name(row) + (f" (worst of {count} deployments)" if count > 1 else "")


def table(table_id: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> html.Table:
    return html.Table(id=table_id, className="figures", children=[
        html.Thead(html.Tr([html.Th(c) for c in columns])),
        html.Tbody([html.Tr([html.Td(cell) for cell in row]) for row in rows]),
    ])


def downloads(element_id: str, api_prefix: str, query: str) -> html.Div:
    """Links that download what a view shows, through the export endpoint
    (the code path of `routelens export`): `query` (`ViewState.export_query`) names the table and filters."""
    return html.Div(id=element_id, className="downloads", children=["download: ", *[
        html.A(fmt.upper() if fmt != "jsonl" else "JSON Lines", download="", id=f"{element_id}-{fmt}",
               href=f"{api_prefix}v1/export?{query}&format={fmt}",
               style={"marginRight": "10px"})
        for fmt in ("csv", "jsonl", "parquet")]])


def table_downloads(element_id: str, name: str, rows: Iterable[Sequence], json_href: str) -> html.Div:
    """A view's tables as CSV (`rows`, its header first, built here into the link: no endpoint serves
    them) and the API's JSON answer the view was drawn from (`json_href`)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return html.Div(id=element_id, className="downloads", children=[
        "download: ",
        html.A("CSV", id=f"{element_id}-csv", download=f"{name}.csv",
               href="data:text/csv;charset=utf-8," + quote(text.getvalue()), style={"marginRight": "10px"}),
        html.A("JSON", id=f"{element_id}-json", download=f"{name}.json", href=json_href),
    ])


def section(title: str, children: List) -> html.Section:
    return html.Section(className="panel", children=[html.H3(title), *children])
