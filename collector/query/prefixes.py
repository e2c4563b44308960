"""Prefix affinity: whether requests that share a prompt prefix go to the
same replica, per prefix group (docs/design.md, Definitions).

A prefix group is the `prefix_group` attribute a traced LLM router records
with each request (routers.llm: a keyed hash of the prompt's first
characters, never the text). Requests are paired with their decisions as
`collector.store.prefix_pairs` says.

The figures read `prefix_rollups` (per minute and per hour, as the other
panels read `rollups`) for the window's whole minutes, and raw rows (routed
events joined to their decisions) for the seconds at its edges, so that
they count exactly the window's requests either way. Filters the rollups
cannot answer (request id, model id, the decisions' reasons) read raw rows
throughout.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..store.models import decisions, prefix_rollups, routed
from ..store.prefix_pairs import grouped_pairs
from .explore import outcome_conditions
from .figures import Scope, _step_condition, default_step, scope
from .filters import MINUTE, Filters

MAX_GROUPS = 100  # groups listed, the most requested first; the figures count them all
STEP_POINTS = 30  # steps over the window, at most


def concentration(groups: Iterable[Counter]) -> Optional[float]:
    """Prefix concentration: the mean, over prefix groups, of the share of a
    group's requests that went to its top replica (each group's requests
    counted per replica). 1 when every group stays on one replica; None
    without requests."""
    shares = [max(counts.values()) / total for counts in groups if (total := sum(counts.values()))]
    return sum(shares) / len(shares) if shares else None


def _rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """(router_pk, prefix_group, replica_pk, step_start, routed, match-rate sum and count, prompt_chars sum):
    the window's whole minutes from the rollups where the filters allow, the rest from raw rows."""
    first, last = math.ceil(f.since / MINUTE) * MINUTE, math.floor(f.until / MINUTE) * MINUTE
    if f.request_id or f.model_id or f.reasons or first >= last:
        return _raw_rows(conn, f, sc, step)
    rows = _rollup_rows(conn, replace(f, since=first, until=last), sc, step)
    for since, until in ((f.since, first), (last, f.until)):
        if since < until:
            rows += _raw_rows(conn, replace(f, since=since, until=until), sc, step)
    return rows


def _raw_rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    query = grouped_pairs(conn.dialect.name, step, *outcome_conditions(routed, f, sc))
    if f.reasons:  # the requests routed by decisions of these reasons
        query = query.where(decisions.c.reason.in_(f.reasons))
    return conn.execute(query).all()


def _rollup_rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """As `_raw_rows`, from `prefix_rollups`, over a window of whole minutes."""
    table = prefix_rollups
    where = [_step_condition(f, step, table), table.c.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(table.c.replica_pk.in_(sc.replica_pks))
    start = (table.c.start // step * step).label("step_start")
    keys = (table.c.router_pk, table.c.prefix_group, table.c.replica_pk, start)
    return conn.execute(select(*keys, *(func.sum(table.c[name]).label(name) for name in
                                        ("routed", "match_rate_sum", "match_rates", "prompt_chars_sum")))
                        .where(*where).group_by(*keys)).all()


class _Group:
    """One prefix group of one deployment, as the rows add up."""

    def __init__(self) -> None:
        self.by_replica: Counter = Counter()
        self.by_step: Dict[int, Counter] = defaultdict(Counter)
        self.match_rate_sum, self.match_rates, self.prompt_chars_sum = 0.0, 0, 0.0

    def add(self, replica_pk: int, step_start: float, routed: int, match_rate_sum: Optional[float],
            match_rates: int, prompt_chars_sum: Optional[float]) -> None:
        self.by_replica[replica_pk] += routed
        self.by_step[int(step_start)][replica_pk] += routed  # PostgreSQL's floor() is a float
        self.match_rate_sum += match_rate_sum or 0.0
        self.match_rates += match_rates
        self.prompt_chars_sum += prompt_chars_sum or 0.0

    @property
    def requests(self) -> int:
        return sum(self.by_replica.values())


def prefix_affinity(conn: Connection, f: Filters, sc: Optional[Scope] = None) -> dict:
    """Per deployment: its prefix groups, their concentration, how many were
    split over replicas, the mean match rate; the same over every group in
    view (`total`); per step, the same; and the groups themselves, the most
    requested first (at most MAX_GROUPS)."""
    sc = sc or scope(conn, f)
    step = max(MINUTE, default_step(f.seconds, STEP_POINTS) // MINUTE * MINUTE)
    groups: Dict[Tuple[int, str], _Group] = defaultdict(_Group)
    if sc.routers:
        deployment_of = {router_pk: router["deployment_pk"] for router_pk, router in sc.routers.items()}
        # Tens of thousands of rows over a week: unpacked, not read by name (a third less time).
        for router_pk, prefix_group, *sums in _rows(conn, f, sc, step):
            groups[deployment_of[router_pk], prefix_group].add(*sums)
    by_deployment: Dict[int, List[_Group]] = defaultdict(list)
    for (deployment_pk, _), group in groups.items():
        by_deployment[deployment_pk].append(group)
    deployments, points = [], []
    for deployment_pk, members in by_deployment.items():
        name = sc.deployments[deployment_pk]
        deployments.append({**name, **_figures([g.by_replica for g in members]),
                            **_match_rate(sum(g.match_rate_sum for g in members), sum(g.match_rates for g in members))})
        for t in sorted({t for g in members for t in g.by_step}):
            points.append({"t": t, **name, **_figures([g.by_step[t] for g in members if t in g.by_step])})
    deployments.sort(key=lambda d: (d["app"], d["deployment"]))
    points.sort(key=lambda p: (p["t"], p["app"], p["deployment"]))
    listed = sorted(groups.items(), key=lambda item: (-item[1].requests, item[0][1]))[:MAX_GROUPS]
    everything = list(groups.values())
    total = {**_figures([g.by_replica for g in everything]),
             **_match_rate(sum(g.match_rate_sum for g in everything), sum(g.match_rates for g in everything))}
    return {"window": {"since": f.since, "until": f.until}, "step_s": step, "total": total, "deployments": deployments,
            "groups": [_group(sc, deployment_pk, prefix_group, g) for (deployment_pk, prefix_group), g in listed],
            "over_time": points}


def _figures(groups: List[Counter]) -> dict:
    """Figures of a deployment's groups (each its requests per replica), over a window or a step."""
    requests = sum(sum(g.values()) for g in groups)
    split = sum(1 for g in groups if len(+g) > 1)
    return {"groups": len(groups), "requests": requests, "concentration": concentration(groups),
            "split_groups": split, "split_share": split / len(groups) if groups else None}


def _match_rate(total: float, count: int) -> dict:
    return {"match_rate_mean": total / count if count else None, "match_rates": count}


def _group(sc: Scope, deployment_pk: int, prefix_group: str, g: _Group) -> dict:
    requests = g.requests
    replicas = sorted(g.by_replica.items(), key=lambda item: (-item[1], _replica_id(sc, item[0]) or ""))
    top_pk, top_count = replicas[0]
    return {
        **sc.deployments[deployment_pk], "prefix_group": prefix_group, "requests": requests,
        "replicas": len(replicas), "top_replica_id": _replica_id(sc, top_pk), "top_share": top_count / requests,
        "prompt_chars_mean": g.prompt_chars_sum / requests,
        **_match_rate(g.match_rate_sum, g.match_rates),
        "by_replica": [{"replica_id": _replica_id(sc, pk), "routed": count} for pk, count in replicas],
    }


def _replica_id(sc: Scope, replica_pk: int) -> Optional[str]:
    return sc.replicas.get(replica_pk, {}).get("replica_id")
