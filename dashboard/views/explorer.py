"""Decision explorer: the window's decisions, newest first, and one decision in full.

The page (the API's cursor) and the open decision are in the URL, like the
filters, so that a link shows the same decision to a colleague.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from dash import dcc, html
from sqlalchemy.engine import Connection

from routelens.collector.query import explore
from routelens.collector.query.filters import Filters

from ..components import downloads, number, section, table
from ..state import ViewState

PAGE_SIZE = 50


def render(conn: Connection, f: Filters, state: ViewState, prefix: str = "/") -> html.Div:
    page = explore.decisions_page(conn, f, cursor=state.cursor, limit=PAGE_SIZE)
    rows = [html.Tr([
        html.Td(dcc.Link(d["time"][11:23], href=state.with_(decision=d["id"]).href(prefix))),
        html.Td(f'{d["app"]}/{d["deployment"]}'), html.Td(d["request_id"] or "–"), html.Td(d["model_id"] or "–"),
        html.Td(d["routed"]["replica_id"] if d["routed"] else "–"),
        html.Td("–" if not d["routed"] or d["routed"]["rank"] is None else str(d["routed"]["rank"])),
        html.Td(number(d["attempt"])), html.Td(d["reason"] or "–"),
    ]) for d in page["decisions"]]
    listing = html.Table(id="explorer-table", className="figures", children=[
        html.Thead(html.Tr([html.Th(c) for c in ("time (UTC)", "deployment", "request id", "model id",
                                                  "chosen replica", "rank", "attempt", "reason")])),
        html.Tbody(rows),
    ])
    pager = [dcc.Link("newest", href=state.with_(cursor=None, decision=None).href(prefix), id="explorer-newest"),
             dcc.Link("stop following" if state.follow else "follow live",
                      href=state.with_(follow=not state.follow, cursor=None, decision=None).href(prefix),
                      id="explorer-follow", style={"marginLeft": "16px"})]
    if page["next_cursor"]:
        pager.append(dcc.Link("older →", href=state.with_(cursor=page["next_cursor"], decision=None).href(prefix),
                              id="explorer-older", style={"marginLeft": "16px"}))
    children = [section(f"Decisions ({len(rows)} shown)", [
        downloads("explorer-download", prefix, state.export_query(f, "decisions")),
        listing, html.Div(pager, className="pager")])]
    if state.follow:
        children.insert(0, _live(state))
    if state.decision:
        children.insert(0, _detail(conn, state.decision))
    return html.Div(children)


def _live(state: ViewState) -> html.Section:
    """Decisions as the collector stores them: the page's script (`LIVE_SCRIPT`) reads
    GET /v1/tail (Server-Sent Events, with the sign-in cookie) into this table, newest first."""
    query = urlencode([(key, value) for key, values in (("app", state.apps), ("deployment", state.deployments),
                                                        ("router_class", state.router_classes),
                                                        ("label", state.labels), ("reason", state.reasons))
                       for value in values])
    tail = "/v1/tail" + (f"?{query}" if query else "")
    return section("Live: decisions as they are stored", [
        html.Table(id="explorer-live", className="figures", **{"data-tail": tail},
                   children=[html.Thead(html.Tr([html.Th(c) for c in (
                       "time (UTC)", "deployment", "request id", "ranking", "chosen replica", "rank", "outcome")])),
                       html.Tbody(id="explorer-live-rows")]),
        html.P("The newest 200; what arrives while this page is away is not shown.", className="card-note")])


# Follows the live table's stream while the table is on the page (Dash redraws views: it polls for it).
LIVE_SCRIPT = """
(function () {
  var source = null, url = null;
  function text(value) { return value === null || value === undefined ? "\u2013" : String(value); }
  function outcome(o) { return !o ? "" : o.rejected ? "refused" : o.ok === false ? "failed" :
                        "ok" + (o.latency_ms === null ? "" : " " + o.latency_ms.toFixed(1) + " ms"); }
  function cells(kind, r) {
    if (kind === "missed") return ["", "", "", r.count + " events missed (this page fell behind)", "", "", ""];
    if (kind === "unavailable") return ["", "", "", "the collector cannot read its database now", "", "", ""];
    var time = new Date(r.ts * 1000).toISOString().slice(11, 23);  // (the records above have no time)
    var where = r.app + "/" + r.deployment;
    if (kind === "decision")
      return [time, where, text(r.request_id), r.ranks.map(function (rank) { return "[" + rank.join(" ") + "]"; })
              .join(" "), text(r.replica), text(r.rank), outcome(r.outcome)];
    if (kind === "routed") return [time, where, text(r.request_id), "(decided before)", r.replica, text(r.rank), ""];
    return [time, where, text(r.internal_request_id), "(decided before)", r.replica, "", outcome(r)];
  }
  function add(kind, event) {
    var rows = document.getElementById("explorer-live-rows");
    if (!rows) return;
    var tr = document.createElement("tr");
    tr.className = "live-" + kind;
    cells(kind, JSON.parse(event.data)).forEach(function (value) {
      var td = document.createElement("td"); td.textContent = value; tr.appendChild(td);
    });
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > 200) rows.removeChild(rows.lastChild);
  }
  setInterval(function () {
    var table = document.getElementById("explorer-live");
    var wanted = table ? table.getAttribute("data-tail") : null;
    if (wanted === url) return;
    if (source) source.close();
    source = null; url = wanted;
    if (!wanted) return;
    source = new EventSource(wanted);
    ["decision", "routed", "completed", "missed", "unavailable"].forEach(function (kind) {
      source.addEventListener(kind, function (event) { add(kind, event); });
    });
  }, 300);
})();
"""


def _detail(conn: Connection, decision_id: str) -> html.Section:
    try:
        d = explore.decision_detail(conn, decision_id)
    except ValueError:  # not a UUID
        d = None
    if d is None:
        return section("Decision", [html.P(f"No decision {decision_id} here.", id="decision-missing")])
    candidates = [c for rank in d["candidates"] for c in rank]
    chosen = d["routed"]["replica_id"] if d["routed"] else None
    ranking = table("decision-candidates", ("rank", "replica", "node", "queue length", "queue length age",
                                            "stats", "stats age", "age source", "chosen"),
                    [(str(c["rank"]), c["replica_id"], c["node_id"] or "–", _or_dash(c["queue_len"]),
                      _age(c["queue_len_age_s"]), json.dumps(c["stats"]) if c["stats"] else "–",
                      _age(c["stats_age_s"]), c["stats_age_source"] or "–",
                      "✓" if c["replica_id"] == chosen else "") for c in candidates])
    facts = [("decision", d["id"]), ("time", d["time"]), ("router", d["router_class"]),
             ("labels", json.dumps(d["labels"])), ("request id", d["request_id"]),
             ("internal request id", d["internal_request_id"]), ("model id", d["model_id"]),
             ("attempt", d["attempt"]), ("choose_replicas", f'{d["duration_us"]} µs'),
             ("candidates given", d["n_candidates"]), ("reason", d["reason"]),
             ("scores", None if d["scores"] is None else
              ", ".join(f"{name} {value:g}" for name, value in d["scores"].items()) or "none")]
    outcome = []
    if d["routed"]:
        r = d["routed"]
        outcome.append(html.P(id="decision-routed", children=(
            f'routed to {r["replica_id"]} (rank {r["rank"]}) at {r["time"]}, queue wait {r["queue_wait_ms"]} ms'
            + ("" if r["own_ranking"] is not False else f', a FIFO hand-off to request {r["request_id"]}'))))
    if d["completed"]:
        c = d["completed"]
        outcome.append(html.P(id="decision-completed", children=(
            f'completed at {c["time"]}: {"ok" if c["ok"] else "failed"}, {c["latency_ms"]} ms')))
    if not outcome:
        outcome.append(html.P("No routed event names this decision (yet).", id="decision-unrouted"))
    events = d["request_events"]
    history = table("decision-request-events", ("event", "time", "replica", "detail"), sorted(
        [("decision", e["time"], "–", f'attempt {e["attempt"]}') for e in events["decisions"]]
        + [("routed", e["time"], e["replica_id"], f'rank {e["rank"]}') for e in events["routed"]]
        + [("rejected" if e["rejected"] else "completed", e["time"], e["replica_id"],
            "" if e["latency_ms"] is None else f'{e["latency_ms"]:.1f} ms') for e in events["completed"]],
        key=lambda row: row[1]))
    return section("Decision", [
        table("decision-facts", ("", ""), [(k, "–" if v is None else str(v)) for k, v in facts]),
        html.H4("Ranking, with each candidate's inputs"), ranking,
        html.H4("Outcome"), *outcome,
        html.H4("Its request's events"), history,
    ])


def _or_dash(value) -> str:
    return "–" if value is None else str(value)


def _age(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f} ms"
