"""Prefix affinity: whether requests that share a prompt prefix go to the
same replica, per prefix group (docs/design.md, Definitions).

A prefix group is the `prefix_group` attribute a traced LLM router records
with each request (routers.llm: a keyed hash of the prompt's first
characters, never the text). Requests are paired with their decisions as
`collector.store.prefix_pairs` says.

The figures come from `prefix_rollups` and count exactly the window's
requests. For the window's whole steps the database adds them up: per step
and group, how many requests went to the top replica, how many in all, how
many replicas they reached; per group and replica, the window's sums. Only
the steps cut by the window's edges are added up here, from rollup rows of
whole minutes and hours and from raw rows (routed events joined to their
decisions) for the seconds at the very edges. Filters the rollups cannot
answer (request id, model id, the decisions' reasons) read raw rows
throughout.

Over a week (6-hour steps: 100 busy groups reach tens of thousands of
(step, group, replica) pairs) both sums read rows already in their order,
without sorting: quarter-day rows by key, and by week in the index
`ix_prefix_rollups_by_block` (collector.store.models).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from sqlalchemy import BigInteger, case, cast, func, select
from sqlalchemy.engine import Connection

from ..store.models import (
    PREFIX_BLOCK,
    PREFIX_BLOCK_S,
    PREFIX_GRAINS,
    PREFIX_ROLLUP_VALUES,
    decisions,
    prefix_rollups,
    routed,
)
from ..store.prefix_pairs import ALL_PAIRS, grouped_pairs
from .explore import outcome_conditions
from .figures import Scope, _step_condition, default_step, scope
from .filters import MINUTE, Filters

MAX_GROUPS = 100  # groups listed, the most requested first; the figures count them all
STEP_POINTS = 30  # steps over the window, at most


class Share(NamedTuple):
    """A prefix group's requests over a window or a step: how many went to its top replica, how many in all,
    and how many replicas they reached."""

    top: int
    requests: int
    replicas: int

    @classmethod
    def of(cls, by_replica: Counter) -> "Share":
        """From the group's requests per replica (every count positive)."""
        return cls(max(by_replica.values()), sum(by_replica.values()), len(by_replica))


def concentration(shares: Iterable[Share]) -> Optional[float]:
    """Prefix concentration: the mean, over prefix groups, of the share of a
    group's requests that went to its top replica. 1 when every group stays
    on one replica; None without requests."""
    fractions = [share.top / share.requests for share in shares if share.requests]
    return sum(fractions) / len(fractions) if fractions else None


def _rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """(router_pk, prefix_group, replica_pk, step_start, routed, match-rate sum and count, prompt_chars sum):
    the window's whole minutes from the rollups where the filters allow, the rest from raw rows."""
    first, last = math.ceil(f.since / MINUTE) * MINUTE, math.floor(f.until / MINUTE) * MINUTE
    if _raw_only(f) or first >= last:
        return _raw_rows(conn, f, sc, step)
    rows = _rollup_rows(conn, replace(f, since=first, until=last), sc, step)
    for since, until in ((f.since, first), (last, f.until)):
        if since < until:
            rows += _raw_rows(conn, replace(f, since=since, until=until), sc, step)
    return rows


def _raw_only(f: Filters) -> bool:
    """Whether the filters need what only raw rows hold."""
    return bool(f.request_id or f.model_id or f.reasons)


def _raw_rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    query = grouped_pairs(conn.dialect.name, step, ALL_PAIRS, *outcome_conditions(routed, f, sc))
    if f.reasons:  # the requests routed by decisions of these reasons
        query = query.where(decisions.c.reason.in_(f.reasons))
    return conn.execute(query).all()


def _rollup_rows(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """As `_raw_rows`, from `prefix_rollups`, over a window of whole minutes."""
    table = prefix_rollups
    where = [_step_condition(f, step, table), *_scope_conditions(sc, table.c.router_pk)]
    start = (table.c.start // step * step).label("step_start")
    keys = (table.c.router_pk, table.c.prefix_group, table.c.replica_pk, start)
    return conn.execute(select(*keys, *(func.sum(table.c[name]).label(name) for name in PREFIX_ROLLUP_VALUES))
                        .where(*where).group_by(*keys)).all()


def _grain(step: int) -> int:
    """The coarsest grain of `prefix_rollups` that whole steps of `step` seconds are made of."""
    return max(grain for grain in PREFIX_GRAINS if step % grain == 0)


def _scope_conditions(sc: Scope, router_pk) -> list:
    """Conditions for the rollup rows of the scope's routers and replicas, the routers compared as
    `router_pk` (the column, or an expression of it)."""
    where = [router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        where.append(prefix_rollups.c.replica_pk.in_(sc.replica_pks))
    return where


def _grain_conditions(f: Filters, sc: Scope, grain: int, router_pk) -> list:
    """Conditions for the rollup rows of `grain` in the window (of whole steps) and the scope."""
    table = prefix_rollups
    return [table.c.grain == grain, table.c.start >= f.since, table.c.start < f.until,
            *_scope_conditions(sc, router_pk)]


def _step_shares(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Tuple[int, int, str, Share]]:
    """(step_start, deployment_pk, prefix_group, share) per whole step of the window (`f`) and group."""
    table, grain = prefix_rollups, _grain(step)
    deployment_of = {router_pk: router["deployment_pk"] for router_pk, router in sc.routers.items()}
    # The routers as a condition on `router_pk + 0`, not on the key column: SQLite would take one router's rows
    # as a key range after the range on `start`, and then sort what is in key order already (2 times slower).
    where = _grain_conditions(f, sc, grain, table.c.router_pk + 0)
    keyed_by_router = step == grain and len(set(deployment_of.values())) == len(deployment_of)
    if keyed_by_router:
        # Each row is one step's requests of a group on a replica, and each deployment has one router in view:
        # the rows are read in key order, nothing to add up first and nothing to sort.
        key = table.c.router_pk
        per_replica = select(table.c.start.label("step_start"), key.label("key"), table.c.prefix_group,
                             table.c.routed).where(*where)
    else:  # a group's requests per replica added up over the step, and over its deployment's routers
        key = case(deployment_of, value=table.c.router_pk)
        start = table.c.start if step == grain else table.c.start // step * step
        per_replica = (select(start.label("step_start"), key.label("key"), table.c.prefix_group,
                              func.sum(table.c.routed).label("routed"))
                       .where(*where).group_by(start, key, table.c.prefix_group, table.c.replica_pk))
    rows = per_replica.subquery()
    keys = (rows.c.step_start, rows.c.key, rows.c.prefix_group)
    # count(): the replicas reached, as every row counts one request at least. PostgreSQL adds up bigints (the
    # inner sums) as numeric: cast back, so that counts stay integers.
    shares = conn.execute(select(*keys, func.max(rows.c.routed), cast(func.sum(rows.c.routed), BigInteger),
                                 func.count()).group_by(*keys)).all()
    return [(int(step_start), deployment_of[key] if keyed_by_router else key, prefix_group, Share(*share))
            for step_start, key, prefix_group, *share in shares]


def _window_sums(conn: Connection, f: Filters, sc: Scope, step: int) -> List[Any]:
    """(router_pk, prefix_group, replica_pk, routed, match-rate sum and count, prompt_chars sum) over the
    window's whole steps (`f`), a block of PREFIX_BLOCK_S seconds at a time: the quarter days' index holds a
    block's rows in this order, so that the database adds them up without sorting them. Minutes and hours have
    no such index (they serve windows short enough to sort): for them the blocks only split the sort."""
    table = prefix_rollups
    keys = (table.c.router_pk, table.c.prefix_group, table.c.replica_pk)
    sums = [func.sum(table.c[name]) for name in PREFIX_ROLLUP_VALUES]
    where = _grain_conditions(f, sc, _grain(step), table.c.router_pk)
    rows: List[Any] = []
    for block in range(int(f.since) // PREFIX_BLOCK_S, (int(f.until) - 1) // PREFIX_BLOCK_S + 1):
        rows += conn.execute(select(*keys, *sums).where(*where, PREFIX_BLOCK == block).group_by(*keys)).all()
    return rows


class _Group:
    """One prefix group of one deployment, as the rows add up."""

    def __init__(self) -> None:
        self.by_replica: Counter = Counter()  # over the window
        self.step_shares: Dict[int, Share] = {}  # the window's whole steps, as the database added them up
        self.edge_steps: Dict[int, Counter] = defaultdict(Counter)  # steps cut by the window's edges, per replica
        self.match_rate_sum, self.match_rates, self.prompt_chars_sum = 0.0, 0, 0.0

    def add(self, replica_pk: int, routed: int, match_rate_sum: Optional[float], match_rates: int,
            prompt_chars_sum: Optional[float]) -> None:
        self.by_replica[replica_pk] += routed
        self.match_rate_sum += match_rate_sum or 0.0
        self.match_rates += match_rates
        self.prompt_chars_sum += prompt_chars_sum or 0.0

    def shares_by_step(self) -> Dict[int, Share]:
        # A step is whole or cut by an edge, never both: the two dicts share no start.
        return {**self.step_shares, **{t: Share.of(by_replica) for t, by_replica in self.edge_steps.items()}}

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
    groups = _groups(conn, f, sc, step) if sc.routers else {}
    by_deployment: Dict[int, List[_Group]] = defaultdict(list)
    for (deployment_pk, _), group in groups.items():
        by_deployment[deployment_pk].append(group)
    deployments, points = [], []
    for deployment_pk, members in by_deployment.items():
        name = sc.deployments[deployment_pk]
        deployments.append({**name, **_figures([Share.of(g.by_replica) for g in members]),
                            **_match_rate(sum(g.match_rate_sum for g in members), sum(g.match_rates for g in members))})
        by_step: Dict[int, List[Share]] = defaultdict(list)
        for g in members:
            for t, share in g.shares_by_step().items():
                by_step[t].append(share)
        points.extend({"t": t, **name, **_figures(shares)} for t, shares in by_step.items())
    deployments.sort(key=lambda d: (d["app"], d["deployment"]))
    points.sort(key=lambda p: (p["t"], p["app"], p["deployment"]))
    def listing_order(item) -> tuple:
        """The most requested first; ties by app, deployment and group, so that the same groups are listed
        whichever rows counted them (the rollups, or raw rows in the database's order)."""
        (deployment_pk, prefix_group), group = item
        name = sc.deployments[deployment_pk]
        return -group.requests, name["app"], name["deployment"], prefix_group

    listed = sorted(groups.items(), key=listing_order)[:MAX_GROUPS]
    everything = list(groups.values())
    replica_ids = {pk: replica.get("replica_id") for pk, replica in sc.replicas.items()}
    total = {**_figures([Share.of(g.by_replica) for g in everything]),
             **_match_rate(sum(g.match_rate_sum for g in everything), sum(g.match_rates for g in everything))}
    return {"window": {"since": f.since, "until": f.until}, "step_s": step, "total": total, "deployments": deployments,
            "groups": [_group(sc, replica_ids, deployment_pk, prefix_group, g)
                       for (deployment_pk, prefix_group), g in listed],
            "over_time": points}


def _groups(conn: Connection, f: Filters, sc: Scope, step: int) -> Dict[Tuple[int, str], _Group]:
    """The window's prefix groups, by deployment and group: the whole steps as the database added them up,
    the steps the window's edges cut from their rows."""
    deployment_of = {router_pk: router["deployment_pk"] for router_pk, router in sc.routers.items()}
    groups: Dict[Tuple[int, str], _Group] = defaultdict(_Group)
    first, last = math.ceil(f.since / step) * step, math.floor(f.until / step) * step
    edges = [(f.since, f.until)]
    if not _raw_only(f) and first < last:
        whole = replace(f, since=first, until=last)
        for router_pk, prefix_group, replica_pk, *sums in _window_sums(conn, whole, sc, step):
            groups[deployment_of[router_pk], prefix_group].add(replica_pk, *sums)
        for step_start, deployment_pk, prefix_group, share in _step_shares(conn, whole, sc, step):
            groups[deployment_pk, prefix_group].step_shares[step_start] = share
        edges = [(f.since, first), (last, f.until)]
    for since, until in edges:
        if since < until:
            for router_pk, prefix_group, replica_pk, step_start, count, *sums in _rows(
                    conn, replace(f, since=since, until=until), sc, step):
                group = groups[deployment_of[router_pk], prefix_group]
                group.add(replica_pk, count, *sums)
                group.edge_steps[int(step_start)][replica_pk] += count  # PostgreSQL's floor() is a float
    return groups


def _figures(shares: List[Share]) -> dict:
    """Figures of a deployment's groups (each its share), over a window or a step."""
    split = sum(1 for share in shares if share.replicas > 1)
    return {"groups": len(shares), "requests": sum(share.requests for share in shares),
            "concentration": concentration(shares), "split_groups": split,
            "split_share": split / len(shares) if shares else None}


def _match_rate(total: float, count: int) -> dict:
    return {"match_rate_mean": total / count if count else None, "match_rates": count}


def _group(sc: Scope, replica_ids: Dict[int, Optional[str]], deployment_pk: int, prefix_group: str,
           g: _Group) -> dict:
    requests = g.requests
    replicas = sorted(((replica_ids.get(pk), count) for pk, count in g.by_replica.items()),
                      key=lambda item: (-item[1], item[0] or ""))
    top_id, top_count = replicas[0]
    return {
        **sc.deployments[deployment_pk], "prefix_group": prefix_group, "requests": requests,
        "replicas": len(replicas), "top_replica_id": top_id, "top_share": top_count / requests,
        "prompt_chars_mean": g.prompt_chars_sum / requests,
        **_match_rate(g.match_rate_sum, g.match_rates),
        "by_replica": [{"replica_id": replica_id, "routed": count} for replica_id, count in replicas],
    }
