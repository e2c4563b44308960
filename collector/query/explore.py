"""Drill-down: decisions as rows, newest first, and one decision in full.

Reads raw tables within a window's id range (see `collector.store.ids`). A
decision's outcome is the `routed` event that names it (the request it
served may be another one: a FIFO hand-off) and the `completed` event of
that routing.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Dict, List, Optional

from sqlalchemy import or_, select
from sqlalchemy.engine import Connection

from ..store import ids
from ..store.models import ANSWER_QUEUE_LENS, REFUSAL_COLUMNS, completed, decisions, routed
from ..store.types import request_id_bytes, stored_bytes
from .figures import AGE_SOURCES, Scope, scope
from .filters import Filters

MAX_PAGE = 500
# How long after a decision its request's other events are looked for.
REQUEST_HORIZON_S = 600.0


def id_bytes(table):
    """A raw table's id as the bytes it is stored as (the comparisons and ordering of a key range)."""
    return stored_bytes(table.c.id)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def in_window(table, since: float, until: float) -> list:
    """Conditions for a raw table's rows with since <= ts < until: a key range, trimmed by ts."""
    low, high = ids.window_bounds(since, until)
    return [id_bytes(table) >= low, id_bytes(table) < high, table.c.ts >= since, table.c.ts < until]


def outcome_conditions(table, f: Filters, sc: Scope) -> list:
    """Conditions for the routed or completed rows of the window that match the
    filters (export): by their own replica, request ids and model id, where the
    table has them (a completion carries only the internal request id)."""
    where = in_window(table, f.since, f.until) + [table.c.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(table.c.replica_pk.in_(sc.replica_pks))
    if f.request_id:
        stored = request_id_bytes(f.request_id)
        where.append(or_(*(stored_bytes(table.c[name]) == stored
                           for name in ("request_id", "internal_request_id") if name in table.c)))
    if f.model_id and "model_id" in table.c:
        where.append(table.c.model_id == f.model_id)
    return where


def decision_field_conditions(f: Filters) -> list:
    """Conditions on a decision's own fields: request ids, model id, reason (also the live tail's)."""
    where = []
    if f.request_id:
        # Compared as stored (the export binds parameters without the column types' conversions).
        stored = request_id_bytes(f.request_id)
        where.append(or_(stored_bytes(decisions.c.request_id) == stored,
                         stored_bytes(decisions.c.internal_request_id) == stored))
    if f.model_id:
        where.append(decisions.c.model_id == f.model_id)
    if f.reasons:
        where.append(decisions.c.reason.in_(f.reasons))
    return where


def decision_conditions(f: Filters, sc: Scope) -> list:
    """Conditions for the decisions of the window that match the filters (drill-down and export)."""
    where = in_window(decisions, f.since, f.until) + [decisions.c.router_pk.in_(sorted(sc.routers))]
    where += decision_field_conditions(f)
    if sc.replica_pks is not None:
        # Decisions whose ranking sent a request to one of these replicas.
        where.append(id_bytes(decisions).in_(
            select(stored_bytes(routed.c.decision_id)).where(
                *in_window(routed, f.since, f.until), routed.c.replica_pk.in_(sc.replica_pks))))
    return where


def decisions_page(conn: Connection, f: Filters, cursor: Optional[str] = None, limit: int = 50,
                   sc: Optional[Scope] = None) -> dict:
    """Decisions of the window matching the filters, newest first. `cursor`
    is the `next_cursor` of the previous page."""
    sc = sc or scope(conn, f)
    limit = max(1, min(int(limit), MAX_PAGE))
    if not sc.routers:
        return {"decisions": [], "next_cursor": None}
    where = decision_conditions(f, sc)
    if cursor:
        where.append(id_bytes(decisions) < ids.to_bytes(cursor))
    rows = conn.execute(select(decisions, id_bytes(decisions).label("key")).where(*where)
                        .order_by(id_bytes(decisions).desc()).limit(limit)).all()
    out = [_decision(row._mapping, sc) for row in rows]
    _attach_outcomes(conn, out, [row.key for row in rows], sc)
    next_cursor = out[-1]["id"] if len(out) == limit else None
    return {"decisions": out, "next_cursor": next_cursor}


def _decision(row, sc: Scope) -> dict:
    router = sc.routers.get(row["router_pk"], {})
    ranking = json.loads(row["ranking"])
    extra = json.loads(row["extra"]) if row["extra"] else {}
    return {
        "id": row["id"], "ts": row["ts"], "time": iso(row["ts"]),
        "app": router.get("app"), "deployment": router.get("deployment"),
        "router_class": router.get("router_class"), "labels": router.get("labels", {}),
        "request_id": row["request_id"], "internal_request_id": row["internal_request_id"],
        "model_id": row["model_id"], "attempt": row["attempt"], "duration_us": row["duration_us"],
        "n_candidates": row["n_candidates"],
        "ranks": [[_replica_id(sc, entry[0]) for entry in rank] for rank in ranking],
        "candidates": [[_candidate(sc, entry, index) for entry in rank] for index, rank in enumerate(ranking)],
        "attributes": extra.pop("attributes", None),
        # What the router said of it (wire format v3): null reason and scores when it said nothing.
        "reason": row["reason"],
        "scores": json.loads(row["scores"]) if row["scores"] else ({} if row["reason"] is not None else None),
        "extra": extra or None,
        "routed": None, "completed": None,
    }


def _replica_id(sc: Scope, pk: int) -> Optional[str]:
    return sc.replicas.get(pk, {}).get("replica_id")


def _candidate(sc: Scope, entry: list, rank: int) -> dict:
    pk = entry[0]
    entry = entry + [None] * (6 - len(entry))
    info = sc.replicas.get(pk, {})
    return {
        "replica_id": info.get("replica_id"), "rank": rank,
        "node_id": info.get("node_id"), "availability_zone": info.get("availability_zone"),
        "queue_len": entry[1],
        "queue_len_age_s": entry[2] / 1000.0 if entry[2] is not None else None,
        "stats_age_s": entry[3] / 1000.0 if entry[3] is not None else None,
        "stats_age_source": AGE_SOURCES.get(entry[4]),
        "stats": entry[5] or {},
    }


def _routed(row, sc: Scope) -> dict:
    extra = json.loads(row["extra"]) if row["extra"] else {}
    return {
        "id": row["id"], "ts": row["ts"], "time": iso(row["ts"]),
        "replica_id": _replica_id(sc, row["replica_pk"]), "decision_id": row["decision_id"],
        "rank": row["rank"], "own_ranking": row["own_ranking"], "attempts": row["attempts"],
        "queue_wait_ms": row["queue_wait_ms"], "request_id": row["request_id"],
        "internal_request_id": row["internal_request_id"], "model_id": row["model_id"],
        "attribution": extra.get("attribution"), **{name: row[name] for name in ANSWER_QUEUE_LENS},
        "send_to_routed_ms": row["send_to_routed_ms"],
    }


def _completed(row, sc: Scope) -> dict:
    return {
        "id": row["id"], "ts": row["ts"], "time": iso(row["ts"]),
        "replica_id": _replica_id(sc, row["replica_pk"]), "internal_request_id": row["internal_request_id"],
        "routed_id": row["routed_id"], "latency_ms": row["latency_ms"], "ok": row["ok"],
        "rejected": row["rejected"], **{name: row[name] for name in REFUSAL_COLUMNS},  # a refusal's
    }


def _attach_outcomes(conn: Connection, out: List[dict], keys: List[bytes], sc: Scope) -> None:
    if not keys:
        return
    routed_rows = conn.execute(select(routed).where(
        stored_bytes(routed.c.decision_id).in_(keys))).all()
    by_decision: Dict[str, dict] = {}
    for row in routed_rows:
        by_decision.setdefault(row.decision_id, _routed(row._mapping, sc))
    routed_keys = [ids.to_bytes(r["id"]) for r in by_decision.values()]
    by_routed: Dict[str, dict] = {}
    if routed_keys:
        for row in conn.execute(select(completed).where(
                stored_bytes(completed.c.routed_id).in_(routed_keys))):
            by_routed.setdefault(row.routed_id, _completed(row._mapping, sc))
    for decision in out:
        decision["routed"] = by_decision.get(decision["id"])
        if decision["routed"] is not None:
            decision["completed"] = by_routed.get(decision["routed"]["id"])


def decision_detail(conn: Connection, decision_id: str) -> Optional[dict]:
    """One decision with every candidate's inputs, its outcome, and the other
    events of its request (earlier and later decisions, routings, rejections)."""
    wanted = ids.to_bytes(decision_id)
    row = conn.execute(select(decisions).where(id_bytes(decisions) == wanted)).first()
    if row is None:
        return None
    sc = _scope_of_router(conn, row.router_pk, row.ts)
    decision = _decision(row._mapping, sc)
    _attach_outcomes(conn, [decision], [wanted], sc)
    request = row.internal_request_id
    decision["request_events"] = {"decisions": [], "routed": [], "completed": []}
    if request:
        since, until = row.ts - REQUEST_HORIZON_S, row.ts + REQUEST_HORIZON_S
        events = decision["request_events"]
        for other in conn.execute(select(decisions).where(
                *in_window(decisions, since, until), decisions.c.internal_request_id == request)
                .order_by(id_bytes(decisions))):
            events["decisions"].append({k: v for k, v in _decision(other._mapping, sc).items()
                                        if k not in ("candidates", "routed", "completed")})
        for other in conn.execute(select(routed).where(
                *in_window(routed, since, until), routed.c.internal_request_id == request).order_by(id_bytes(routed))):
            events["routed"].append(_routed(other._mapping, sc))
        for other in conn.execute(select(completed).where(
                *in_window(completed, since, until), completed.c.internal_request_id == request)
                .order_by(id_bytes(completed))):
            events["completed"].append(_completed(other._mapping, sc))
    return decision


def _scope_of_router(conn: Connection, router_pk: int, ts: float) -> Scope:
    full = scope(conn, Filters(since=ts, until=ts))
    return Scope(routers={router_pk: full.routers[router_pk]} if router_pk in full.routers else {},
                 replicas=full.replicas)
