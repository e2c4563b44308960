"""Prefix affinity: whether requests that share a prompt prefix go to the
same replica, per prefix group (docs/design.md, Definitions).

A prefix group is the `prefix_group` attribute a traced LLM router records
with each request (routers.llm: a keyed hash of the prompt's first
characters, never the text). A routed request belongs to the group of the
decision that routed it; requests handed a replica that another request's
decision found (FIFO hand-offs) are left out, since that decision's prompt
is the other request's. The match rate is the one each decision recorded
(`scores.match_rate`), where it recorded one.

The rollups know nothing of prompts, so this reads raw rows: routed events
of the window joined to their decisions by key, grouped in the database by
router, group, replica and time step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sqlalchemy import JSON, Float, Integer, cast, func, or_, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

from ..store.models import decisions, routed
from .explore import outcome_conditions
from .figures import Scope, default_step, scope
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


def _json_member(conn: Connection, column, *path: str):
    """A member of a JSON text column as text, in the database's own JSON functions."""
    if conn.dialect.name == "postgresql":
        return cast(column, JSONB)[path].as_string()
    return type_coerce(column, JSON)[path].as_string()


def _step_start(conn: Connection, step: int):
    """Each routed event's step: the start of its `step`-second interval (ts >= 0)."""
    if conn.dialect.name == "postgresql":
        return func.floor(routed.c.ts / step) * step
    return cast(routed.c.ts / step, Integer) * step  # truncation is the floor of a positive number


def _group_rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """(router_pk, prefix_group, replica_pk, step_start, routed, match-rate sum and count, prompt_chars sum)."""
    group = _json_member(conn, decisions.c.extra, "attributes", "prefix_group")
    match_rate = cast(_json_member(conn, decisions.c.scores, "match_rate"), Float)
    prompt_chars = cast(_json_member(conn, decisions.c.extra, "attributes", "prompt_chars"), Float)
    start = _step_start(conn, step).label("step_start")
    query = (select(routed.c.router_pk, group.label("prefix_group"), routed.c.replica_pk, start,
                    func.count().label("routed"), func.sum(match_rate).label("match_rate_sum"),
                    func.count(match_rate).label("match_rates"),
                    func.sum(prompt_chars).label("prompt_chars_sum"))
             .select_from(routed.join(decisions, decisions.c.id == routed.c.decision_id))
             .where(*outcome_conditions(routed, f, sc),
                    or_(routed.c.own_ranking.is_(None), routed.c.own_ranking.is_(True)),
                    decisions.c.extra.like('%"prefix_group"%'), group.is_not(None))
             .group_by(routed.c.router_pk, group, routed.c.replica_pk, start))
    if f.reasons:  # the requests routed by decisions of these reasons
        query = query.where(decisions.c.reason.in_(f.reasons))
    return conn.execute(query).all()


class _Group:
    """One prefix group of one deployment, as the rows add up."""

    def __init__(self) -> None:
        self.by_replica: Counter = Counter()
        self.by_step: Dict[float, Counter] = defaultdict(Counter)
        self.match_rate_sum, self.match_rates, self.prompt_chars_sum = 0.0, 0, 0.0

    def add(self, row: Any) -> None:
        self.by_replica[row.replica_pk] += row.routed
        self.by_step[row.step_start][row.replica_pk] += row.routed
        self.match_rate_sum += row.match_rate_sum or 0.0
        self.match_rates += row.match_rates
        self.prompt_chars_sum += row.prompt_chars_sum or 0.0

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
        for row in _group_rows(conn, f, sc, step):
            groups[sc.routers[row.router_pk]["deployment_pk"], row.prefix_group].add(row)
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
