"""What-if: the replays `routelens replay` stored, and one of them beside what was recorded.

The view reads what GET /v1/replays and GET /v1/replays/{id} answer, through
the same store functions (`collector.store.replays`): it draws the stored
result and computes no figure of its own. Each deployment gets one table, in
the layout of the command's (collector/cli/replay.py): decisions mode, the
recorded router beside the replayed one, with 95% intervals over runs for a
randomized router; simulate mode, what was recorded, the recorded router
simulated and the given router simulated. The CSV download holds those
tables' rows as shown, the JSON download is the API's answer. The window and
filter controls do not apply here: each replay has its own, shown with it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import plotly.graph_objects as go
from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query.explore import iso
from routelens.collector.replay.figures import RANK_BINS
from routelens.collector.store import replays
from routelens.collector.store.ids import to_bytes

from ..components import deployment_name, number, percent, section, table, table_downloads
from ..state import ViewState

REPLAY_COMMAND = "routelens replay --router package.module:Class [--mode decisions|simulate] --window 1h --app APP"

Row = Sequence[str]


@dataclass
class Shown:
    """One deployment of a replay, as the view shows it."""

    deployment: dict  # its entry in the result
    title: str
    rows: List[Row]  # its table's, under the mode's columns
    caption: str  # whose figures, and how to read them
    chart: go.Figure  # per-replica shares


def render(conn: Connection, _f, state: ViewState, prefix: str = "/") -> html.Div:
    listed = replays.listing(conn)
    if not listed and state.replay is None:
        return _empty()
    return html.Div([
        section("Stored replays, newest first", [_listing(listed, state, prefix)]),
        *_chosen(conn, state.replay, prefix),
    ])


def _chosen(conn: Connection, replay_id: Optional[str], prefix: str) -> List[html.Div]:
    """The stored replay the URL names, or what to say instead: none chosen, not an id, none stored."""
    if replay_id is None:
        return [_message("whatif-hint", "Choose a replay above to see it beside what was recorded.")]
    try:
        canonical = str(uuid.UUID(bytes=to_bytes(replay_id)))
    except ValueError:
        return [_message("whatif-missing", f"{replay_id[:80]!r} is not a replay id (a UUID): choose a replay above.")]
    record = replays.read(conn, canonical)
    if record is None:
        return [_message("whatif-missing", f"No replay {canonical} is stored (it may have been made on another "
                                           "database): choose a replay above.")]
    return _replay(record, prefix)


def _message(element_id: str, text: str) -> html.Div:
    return html.Div(text, id=element_id, className="panel")


def _listing(listed: List[dict], state: ViewState, prefix: str) -> html.Table:
    rows = [(dcc.Link(r["time"], href=state.with_(replay=r["id"]).href(prefix), id=f"whatif-open-{r['id']}",
                      className="active" if r["id"] == state.replay else ""),
             r["mode"], r["router_class"], _window(r["window"]), _filters(r["filters"]))
            for r in listed]
    return table("whatif-replays", ("stored", "mode", "router", "window", "filters"), rows)


def _window(window: dict) -> str:
    since = "the first record" if not window["since"] else iso(window["since"])
    return f"{since} to {iso(window['until'])}"


def _filters(filters: Dict[str, object]) -> str:
    pairs = [f"{name}={value}" for name, values in filters.items()
             for value in (values if isinstance(values, list) else [values])]
    return ", ".join(pairs) or "none"


def _replay(record: dict, prefix: str) -> List[html.Section]:
    result = record["result"]
    columns, tables = LAYOUTS[record["mode"]](result)
    facts = [f"{record['mode']} mode, through {record['router_class']}",
             f"kwargs {record['router_kwargs']}" if record["router_kwargs"] else "no kwargs",
             f"seed {record['seed']}", f"{record['runs']} run{'s' if record['runs'] != 1 else ''}",
             f"window {_window(record['window'])}", f"filters {_filters(record['filters'])}",
             f"stored {record['time']}", f"id {record['id']}"]
    out = [section("Replay", [html.P("; ".join(facts), id="whatif-facts"),
                              *[html.P(f"note: {note}", className="note") for note in result.get("notes", [])],
                              _downloads(record, prefix, columns, tables)])]
    for i, shown in enumerate(tables):
        out.append(section(shown.title, [
            table(f"whatif-table-{i}", columns, shown.rows),
            html.P(shown.caption, className="note"),
            dcc.Graph(id=f"whatif-shares-{i}", figure=shown.chart),
        ]))
    return out


# --- decisions mode ---

def over_runs(figure: Optional[dict], write: Callable[[Optional[float]], str]) -> str:
    """A figure over runs: its mean, and its 95% interval when the runs differ."""
    if figure is None:
        return write(None)
    if figure["low"] == figure["high"]:
        return write(figure["mean"])
    return f"{write(figure['mean'])} ({write(figure['low'])} to {write(figure['high'])})"


def decisions_table(result: dict) -> Tuple[Row, List[Shown]]:
    """The columns (the recorded router beside the replayed one), and each deployment as shown."""
    runs = f"{result['runs']} runs: mean (95% interval)" if result["randomized"] else "deterministic: 1 run"
    tables = []
    for d in result["deployments"]:
        recorded, replay = d["recorded"], d["replay"]
        rows: List[Row] = [
            ("real replica in the first tier", percent(recorded["rank0_rate"]),
             over_runs(replay["first_tier_hit_rate"], percent)),
            ("pick = real replica (agreement)", "", over_runs(replay["agreement"], percent)),
            ("no replica below capacity", "", over_runs(replay["no_pick_rate"], percent)),
            *[(f"real replica at rank {b}" if b != "absent" else "real replica not ranked",
               percent(recorded["ranks"][b]), over_runs(replay["ranks"][b], percent)) for b in RANK_BINS],
            ("Jain's index", number(recorded["imbalance"]["jain"], 3),
             over_runs(replay["imbalance"]["jain"], lambda v: number(v, 3))),
            ("max/mean", number(recorded["imbalance"]["max_over_mean"], 2),
             over_runs(replay["imbalance"]["max_over_mean"], lambda v: number(v, 2))),
            ("router errors", "", over_runs(replay["router_errors"], number)),
            *[(f"share of {r['replica_id']}", percent(r["recorded_share"]), over_runs(r["replay_share"], percent))
              for r in d["replicas"]],
        ]
        notes = [f"recorded by {', '.join(d['recorded_router_classes'])}",
                 f"replayed through {result['router']['class']}, {runs}", "rates and shares of the decisions routed"]
        if d["membership_inferred"]:
            notes.append(f"candidates inferred for {d['membership_inferred']:,} decisions")
        if replay["first_error"]:
            notes.append(f"first router error: {replay['first_error']}")
        tables.append(Shown(d, f"{deployment_name(d)}: {d['decisions']:,} decisions, {d['with_outcome']:,} routed",
                            rows, "; ".join(notes), _decisions_chart(d["replicas"], result["randomized"])))
    return ("", "recorded", "replay"), tables


def _decisions_chart(replicas: List[dict], randomized: bool) -> go.Figure:
    """Per-replica shares, recorded beside replayed, the replayed with its interval over runs (a
    deterministic router makes one run: no interval)."""
    names = [r["replica_id"] for r in replicas]
    shares = [r["replay_share"] or {"mean": None, "low": None, "high": None} for r in replicas]
    replayed = go.Bar(name="replay", x=names, y=[s["mean"] for s in shares], error_y=dict(
        visible=randomized, type="data", symmetric=False, array=[_gap(s["high"], s["mean"]) for s in shares],
        arrayminus=[_gap(s["mean"], s["low"]) for s in shares]))
    return _share_chart([go.Bar(name="recorded", x=names, y=[r["recorded_share"] for r in replicas]), replayed])


def _gap(high: Optional[float], low: Optional[float]) -> Optional[float]:
    return None if high is None or low is None else high - low


# --- simulate mode ---

SIMULATED = ("recorded", "recorded_simulated", "replay")


def _ms(figures: Dict[str, Optional[float]]) -> str:
    return " / ".join(number(v, 1) for v in figures.values())


# (label, how a column's figures are written): a deployment's rows, then each replica's.
_DEPLOYMENT_ROWS: List[Tuple[str, Callable[[dict], str]]] = [
    ("requests", lambda c: number(c["requests"])),
    ("Jain's index", lambda c: number(c["imbalance"]["jain"], 3)),
    ("max/mean", lambda c: number(c["imbalance"]["max_over_mean"], 2)),
    ("queue wait (ms)", lambda c: _ms(c["queue_wait_ms"])),
    ("latency (ms)", lambda c: _ms(c["latency_ms"])),
    ("rejections", lambda c: number(c["rejections"])),
    ("hand-offs", lambda c: number(c["handoffs"])),
    ("decisions", lambda c: number(c.get("decisions"))),
    ("unfinished", lambda c: number(c.get("unfinished"))),
    ("router errors", lambda c: number(c.get("router_errors"))),
]
_REPLICA_ROWS: List[Tuple[str, Callable[[dict], str]]] = [
    ("share of {}", lambda c: percent(c["share"])),
    ("{} queue wait (ms)", lambda c: _ms(c["queue_wait_ms"])),
    ("{} latency (ms)", lambda c: _ms(c["latency_ms"])),
    ("{} rejections", lambda c: number(c["rejections"])),
    ("{} hand-offs", lambda c: number(c["handoffs"])),
]


def simulate_table(result: dict) -> Tuple[Row, List[Shown]]:
    """The columns (recorded, the recorded router simulated, the given one simulated), and each deployment
    as shown: its rows, then each replica's. A column the replay could not simulate (the recorded router
    not importable where it ran; a note says so) is "–"."""
    given = result["router"]["class"].replace(":", ".").rpartition(".")[2]
    columns = ("", "recorded", "recorded router simulated", f"{given} simulated")
    tables = []
    for d in result["deployments"]:
        rows: List[Row] = [(label, *(number(None) if d[c] is None else write(d[c]) for c in SIMULATED))
                           for label, write in _DEPLOYMENT_ROWS]
        for r in d["replicas"]:
            rows.extend((label.format(r["replica_id"]), *(number(None) if r[c] is None else write(r[c])
                                                           for c in SIMULATED))
                        for label, write in _REPLICA_ROWS)
        names = [r["replica_id"] for r in d["replicas"]]
        chart = _share_chart([go.Bar(name=title, x=names, y=[None if r[c] is None else r[c]["share"]
                                                             for r in d["replicas"]])
                              for c, title in zip(SIMULATED, columns[1:])])
        caption = (f"recorded by {', '.join(d['recorded_router_classes'])}; simulated through it and through "
                   f"{result['router']['class']}, seed {result['seed']}; queue wait and latency in ms, p50 / p95 / p99")
        tables.append(Shown(d, f"{deployment_name(d)}: {d['recorded']['requests']:,} requests simulated", rows,
                            caption, chart))
    return columns, tables


def _share_chart(bars: List[go.Bar]) -> go.Figure:
    chart = go.Figure(bars)
    chart.update_layout(barmode="group", height=280, margin=dict(l=40, r=10, t=10, b=40), yaxis_tickformat=".0%",
                        yaxis_title="share of the deployment's requests")
    return chart


# Each mode's tables: the columns, and each deployment as shown.
LAYOUTS: Dict[str, Callable[[dict], Tuple[Row, List[Shown]]]] = {"decisions": decisions_table,
                                                                   "simulate": simulate_table}


# --- downloads, the empty state ---

def _csv_rows(columns: Row, tables: List[Shown]) -> List[Row]:
    """The CSV download: every table's rows as shown, each headed by its deployment."""
    return [("deployment", "figure", *columns[1:])] + [(deployment_name(shown.deployment), *row)
                                                       for shown in tables for row in shown.rows]


def _downloads(record: dict, prefix: str, columns: Row, tables: List[Shown]) -> html.Div:
    """The tables as CSV, the result as the API's JSON."""
    return table_downloads("whatif-download", f"replay-{record['id']}", _csv_rows(columns, tables),
                           f"{prefix}v1/replays/{record['id']}")


def _empty() -> html.Div:
    return html.Div(className="empty", id="whatif-empty", children=[
        html.H2("No replay stored yet"),
        html.P("Replay a window of recorded traffic through another router; the result is stored and shows here:"),
        html.Pre(REPLAY_COMMAND),
        html.P(["--mode decisions (the default) asks the router each recorded decision again; --mode simulate "
                "replays the traffic closed loop. See docs/replay.md."]),
    ])
