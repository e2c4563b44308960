"""The query layer: every figure the read API, the dashboard and export show.

Every function takes a `Filters` (time window and what to look at) and a
SQLAlchemy connection, and returns plain dicts and lists, ready for JSON.
Figures follow the definitions in docs/design.md:

- distribution: routed requests per replica in the window, replicas that
  were members but got nothing included; per deployment, each replica's
  share, the fair share and imbalance as max/mean, coefficient of
  variation and Jain's fairness index;
- staleness: per replica, p50/p95/max age of the routing_stats each
  decision ranked it on, stamped and observed counted apart; per
  deployment, against that deployment's stats period;
- rank hits: share of routed requests by rank, FIFO hand-off rate,
  rejections per replica, decisions per request; per deployment too; and
  decision quality (regret, belief error) per replica, per deployment and
  over time.

Figures that compare replicas only mean something among replicas of one
deployment (their traffic, capacity and stats period differ from one
deployment to the next): they are computed per deployment, and a window
holding several deployments lists them worst first, never one index over
all of them.

Panels read the rollups only (`rollups` table): a window is covered by whole
hours where it can and by minutes at its edges, so it is resolved to whole
minutes (`Window.rollup_bounds`). Percentiles come from the rollups' fixed
bins (`collector.store.bins`). Drill-down (`decisions`, `decision`) reads raw rows
within the window's id range (ids are UUIDv7, see `collector.store.ids`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from ..store import ids
from ..store.bins import (
    ATTEMPTS,
    BELIEF_ERROR,
    CHOOSE_US,
    LATENCY_MS,
    RANK_COLUMNS,
    REGRET,
    SEND_TO_ROUTED_MS,
    STALENESS,
)
from ..store.models import (
    OTHER_REASONS,
    ROUTER_LEVEL,
    Deployment,
    Replica,
    Router,
    Source,
    SourceBatch,
    reason_rollups,
    rollups,
    stats_changes,
)
from ..store.types import stored_bytes
from .filters import MINUTE, Filters

HOUR = 3600
NO_DEPLOYMENT = {"app": None, "deployment": None}
AGE_SOURCES = {"s": "stamped", "o": "observed", None: None}


@dataclass
class Scope:
    """Filters resolved to keys: the routers and replicas a query covers."""

    routers: Dict[int, dict]  # router_pk -> {app, deployment, router_class, labels, deployment_pk}
    replica_pks: Optional[List[int]] = None  # None: every replica
    replicas: Dict[int, dict] = field(default_factory=dict)  # replica_pk -> attributes
    deployments: Dict[int, dict] = field(default_factory=dict)  # deployment_pk -> {app, deployment}

    def deployment_of(self, replica_pk: int) -> dict:
        """{app, deployment} of a replica (None for both if it is unknown)."""
        info = self.replicas.get(replica_pk, {})
        return self.deployments.get(info.get("deployment_pk"), NO_DEPLOYMENT)

    def routers_of(self, deployment_pk: int) -> List[int]:
        """The routers (router_pks) of a deployment in scope."""
        return [pk for pk, router in self.routers.items() if router["deployment_pk"] == deployment_pk]


def scope(conn: Connection, f: Filters) -> Scope:
    query = select(Router.pk, Router.router_class, Router.labels, Router.deployment_pk, Deployment.app,
                   Deployment.deployment).join(Deployment, Deployment.pk == Router.deployment_pk)
    if f.apps:
        query = query.where(Deployment.app.in_(f.apps))
    if f.deployments:
        query = query.where(Deployment.deployment.in_(f.deployments))
    if f.router_classes:
        query = query.where(Router.router_class.in_(f.router_classes))
    routers = {}
    for pk, router_class, labels, deployment_pk, app, deployment in conn.execute(query):
        labels = json.loads(labels)
        if all(labels.get(k) == v for k, v in f.labels):
            routers[pk] = {"app": app, "deployment": deployment, "router_class": router_class, "labels": labels,
                           "deployment_pk": deployment_pk}
    deployment_pks = sorted({r["deployment_pk"] for r in routers.values()})
    replica_query = select(Replica).where(Replica.deployment_pk.in_(deployment_pks))
    if f.replicas:
        replica_query = replica_query.where(Replica.replica_id.in_(f.replicas))
    replicas = {row.pk: _replica_dict(row) for row in conn.execute(replica_query)}
    deployments = {r["deployment_pk"]: {"app": r["app"], "deployment": r["deployment"]} for r in routers.values()}
    return Scope(routers=routers, replica_pks=sorted(replicas) if f.replicas else None, replicas=replicas,
                 deployments=deployments)


def _replica_dict(row) -> dict:
    return {
        "replica_id": row.replica_id, "deployment_pk": row.deployment_pk, "node_id": row.node_id,
        "availability_zone": row.availability_zone, "max_ongoing_requests": row.max_ongoing_requests,
        "model_ids": json.loads(row.model_ids) if row.model_ids else [], "added_at": row.added_at,
        "removed_at": row.removed_at,
    }


# --- rollup reads ---

def _window_condition(f: Filters, table=rollups):
    """Rows of the rollups (or of `reason_rollups`) that cover the window: whole hours, minutes at the edges."""
    m0, m1 = f.rollup_bounds()
    h0, h1 = -(-m0 // HOUR) * HOUR, m1 // HOUR * HOUR
    grain, start = table.c.grain, table.c.start
    if h0 >= h1:
        return and_(grain == MINUTE, start >= m0, start < m1)
    return or_(
        and_(grain == HOUR, start >= h0, start < h1),
        and_(grain == MINUTE, start >= m0, start < h0),
        and_(grain == MINUTE, start >= h1, start < m1),
    )


def _sum_columns(names: Iterable[str]):
    out = []
    for name in names:
        column = rollups.c[name]
        out.append((func.max(column) if name.endswith("_max") else func.sum(column)).label(name))
    return out


def rollup_totals(conn: Connection, f: Filters, sc: Scope, names: Sequence[str], by: Optional[str] = None,
                  condition=None, step: Optional[int] = None) -> List[dict]:
    """Sums (and maxima) of rollup columns over the window: one row in all,
    or one per replica (`by="replica"`, with its replica_pk) or per router
    (`by="router"`, with its router_pk); with `step` (seconds, whole
    minutes), one per step as well (with its start, `t`). Empty scope: no rows."""
    if not sc.routers:
        return []
    if condition is None:
        condition = _window_condition(f) if step is None else _step_condition(f, step)
    where = [condition, rollups.c.router_pk.in_(sorted(sc.routers))]
    if sc.replica_pks is not None:
        # Filtered to some replicas: their rows are the totals.
        where.append(rollups.c.replica_pk.in_(sc.replica_pks))
    elif by == "replica":
        where.append(rollups.c.replica_pk != ROUTER_LEVEL)
    else:
        where.append(rollups.c.replica_pk == ROUTER_LEVEL)
    keys = {"replica": (rollups.c.replica_pk,), "router": (rollups.c.router_pk,), None: ()}[by]
    if step is not None:
        keys = ((rollups.c.start // step * step).label("t"), *keys)
    query = select(*keys, *_sum_columns(names)).where(*where)
    if keys:
        query = query.group_by(*keys)
    return [{k: (v if v is not None else (None if k.endswith("_max") else 0)) for k, v in row._mapping.items()}
            for row in conn.execute(query)]


def per_deployment(sc: Scope, rows_by_router: List[dict], names: Sequence[str]) -> Dict[int, dict]:
    """Rows of `rollup_totals(by="router")` summed per deployment (several
    routers, a class or label set each, serve one deployment): deployment_pk -> sums."""
    groups: Dict[int, List[dict]] = {}
    for row in rows_by_router:
        groups.setdefault(sc.routers[row["router_pk"]]["deployment_pk"], []).append(row)
    return {deployment_pk: _fold(rows, names) for deployment_pk, rows in groups.items()}


def _fold(rows: List[dict], names: Sequence[str]) -> dict:
    """Rows of rollup sums added up (the largest of the maxima); no rows: zeros."""
    out = {name: (None if name.endswith("_max") else 0) for name in names}
    for row in rows:
        for name in names:
            if not name.endswith("_max"):
                out[name] += row[name]
            elif row[name] is not None and (out[name] is None or row[name] > out[name]):
                out[name] = row[name]
    return out


def _rate(part: float, whole: float) -> Optional[float]:
    return part / whole if whole else None


# --- panels ---

def imbalance(counts: Sequence[float]) -> Dict[str, Optional[float]]:
    """max/mean, coefficient of variation and Jain's fairness index of per-replica counts."""
    n = len(counts)
    total = float(sum(counts))
    if n == 0 or total == 0:
        return {"max_over_mean": None, "cv": None, "jain": None}
    mean = total / n
    squares = sum(c * c for c in counts)
    return {
        "max_over_mean": max(counts) / mean,
        "cv": statistics.pstdev(counts) / mean,
        "jain": total * total / (n * squares),
    }


DISTRIBUTION_COLUMNS = ("routed", "candidates", "rejections", "completions", "failures", "handoffs")


def distribution(conn: Connection, f: Filters, sc: Optional[Scope] = None) -> dict:
    sc = sc or scope(conn, f)
    names = DISTRIBUTION_COLUMNS
    per_replica = {row["replica_pk"]: row for row in rollup_totals(conn, f, sc, names, by="replica")}
    members = _members(sc, f)
    replicas = []
    for pk in sorted(set(per_replica) | members):
        row = per_replica.get(pk) or {name: 0 for name in names}
        info = sc.replicas.get(pk, {})
        replicas.append({
            "replica_id": info.get("replica_id"), **sc.deployment_of(pk),
            "node_id": info.get("node_id"), "availability_zone": info.get("availability_zone"),
            "model_ids": info.get("model_ids", []),  # as last reported: what the replica holds now
            **{name: row[name] for name in names},
            "member": pk in members,
        })
    deployments = []
    for (app, deployment), group in _by_deployment(replicas).items():
        routed = sum(r["routed"] for r in group)
        for replica in group:
            replica["share"] = _rate(replica["routed"], routed)
        deployments.append({
            "app": app, "deployment": deployment, "routed": routed, "replicas": len(group),
            "fair_share": routed / len(group), "imbalance": imbalance([r["routed"] for r in group]),
            "by_node": _group(group, "node_id"), "by_availability_zone": _group(group, "availability_zone"),
        })
    replicas.sort(key=_deployment_then_replica)
    deployments.sort(key=lambda d: (_worst_first(d["imbalance"]["jain"]), d["app"] or "", d["deployment"] or ""))
    return {"window": _window(f), "routed": sum(d["routed"] for d in deployments), "deployments": deployments,
            "replicas": replicas}


def _by_deployment(rows: List[dict]) -> Dict[Tuple[Optional[str], Optional[str]], List[dict]]:
    """Rows (with app and deployment) grouped by deployment."""
    groups: Dict[Tuple[Optional[str], Optional[str]], List[dict]] = {}
    for row in rows:
        groups.setdefault((row["app"], row["deployment"]), []).append(row)
    return groups


def _deployment_then_replica(row: dict) -> tuple:
    return row["app"] or "", row["deployment"] or "", row["replica_id"] or ""


def _worst_first(value: Optional[float]) -> tuple:
    """A sort key putting the lowest value (the worst Jain's index or hit
    rate) first, and deployments without one last."""
    return (1, 0.0) if value is None else (0, value)


def _members(sc: Scope, f: Filters) -> set:
    """Replicas that were members at some point of the window (from `replicas` events)."""
    out = set()
    for pk, info in sc.replicas.items():
        if sc.replica_pks is not None and pk not in sc.replica_pks:
            continue
        added, removed = info["added_at"], info["removed_at"]
        if added is not None and added < f.until and (removed is None or removed >= f.since):
            out.add(pk)
    return out


def _group(replicas: List[dict], key: str) -> List[dict]:
    groups: Dict[Any, dict] = {}
    for replica in replicas:
        group = groups.setdefault(replica[key], {key: replica[key], "replicas": 0, "routed": 0})
        group["replicas"] += 1
        group["routed"] += replica["routed"]
    total = sum(g["routed"] for g in groups.values())
    for group in groups.values():
        group["share"] = _rate(group["routed"], total)
    return sorted(groups.values(), key=lambda g: str(g[key]))


def _staleness_figures(row: dict) -> dict:
    counts = [row[c] for c in STALENESS.columns]
    return {
        "samples": sum(counts),
        "p50_s": STALENESS.percentile(counts, 0.50, row["stale_max"]),
        "p95_s": STALENESS.percentile(counts, 0.95, row["stale_max"]),
        "max_s": row["stale_max"],
        "stamped": row["stale_stamped"], "observed": row["stale_observed"],
        "histogram": counts,
    }


STALENESS_COLUMNS = (*STALENESS.columns, "stale_max", "stale_stamped", "stale_observed")


def staleness(conn: Connection, f: Filters, sc: Optional[Scope] = None) -> dict:
    sc = sc or scope(conn, f)
    replicas = [{"replica_id": sc.replicas.get(row["replica_pk"], {}).get("replica_id"),
                 **sc.deployment_of(row["replica_pk"]), **_staleness_figures(row)}
                for row in rollup_totals(conn, f, sc, STALENESS_COLUMNS, by="replica")]
    replicas.sort(key=_deployment_then_replica)
    by_router = rollup_totals(conn, f, sc, STALENESS_COLUMNS, by="router")
    deployments = []
    for deployment_pk, row in per_deployment(sc, by_router, STALENESS_COLUMNS).items():
        figures = _staleness_figures(row)
        period = stats_period(conn, f, sc.routers_of(deployment_pk))
        deployments.append({**sc.deployments[deployment_pk], **figures,
                            **_against_period(figures["p95_s"], period)})
    deployments.sort(key=lambda d: (_stalest_first(d), d["app"], d["deployment"]))
    return {"window": _window(f), "bin_bounds_s": list(STALENESS.bounds), "deployments": deployments,
            "replicas": replicas}


def _stalest_first(staleness: dict) -> tuple:
    """A sort key: p95 staleness against the deployment's own stats period
    where it is seen, else in seconds; without samples last."""
    if staleness["p95_over_period"] is not None:
        return (0, -staleness["p95_over_period"])
    if staleness["p95_s"] is not None:
        return (1, -staleness["p95_s"])
    return (2, 0.0)


def stats_period(conn: Connection, f: Filters, router_pks: Sequence[int], sample: int = 400) -> Optional[float]:
    """The routing-stats period of one deployment's replicas (`router_pks`: its
    routers), seen in the newest stats changes of the window: the median
    interval between two collections of one replica's stats."""
    if not router_pks:
        return None
    low, high = ids.window_bounds(f.since, f.until)
    rows = conn.execute(
        select(stats_changes.c.replica_pk, stats_changes.c.collected_at, stats_changes.c.ts,
               stats_changes.c.source_pk)
        .where(stored_bytes(stats_changes.c.id) >= low,
               stored_bytes(stats_changes.c.id) < high,
               stats_changes.c.ts >= f.since, stats_changes.c.ts < f.until,
               stats_changes.c.router_pk.in_(sorted(router_pks)))
        .order_by(stats_changes.c.id.desc()).limit(sample)
    ).all()
    return median_interval(((source_pk, replica_pk), collected_at if collected_at is not None else ts)
                           for replica_pk, collected_at, ts, source_pk in reversed(rows))


def median_interval(changes: Iterable[Tuple[Any, float]]) -> Optional[float]:
    """The median interval between two collections of one replica's stats as one router saw
    them: `changes` are (its key, say (source, replica), collection time), oldest first."""
    last: Dict[Any, float] = {}
    intervals = []
    for key, at in changes:
        if key in last and at > last[key]:
            intervals.append(at - last[key])
        last[key] = at
    return statistics.median(intervals) if intervals else None


QUALITY_COLUMNS = (*REGRET.columns, "regret_sum", "regret_max",
                   *BELIEF_ERROR.columns, "belief_error_sum", "belief_error_abs_sum", "belief_error_abs_max")


RANK_HIT_COLUMNS = ("routed", "handoffs", "rejections", "decisions", "choose_us_sum", "choose_us_max",
                    "send_to_routed_ms_sum", "send_to_routed_ms_max",
                    *RANK_COLUMNS, *ATTEMPTS.columns, *CHOOSE_US.columns, *SEND_TO_ROUTED_MS.columns,
                    *QUALITY_COLUMNS)
RANK_HIT_REPLICA_COLUMNS = ("routed", "rejections", "handoffs", "rank_0", *QUALITY_COLUMNS)


def rank_hits(conn: Connection, f: Filters, sc: Optional[Scope] = None) -> dict:
    sc = sc or scope(conn, f)
    by_router = rollup_totals(conn, f, sc, RANK_HIT_COLUMNS, by="router")
    row = _fold(by_router, RANK_HIT_COLUMNS)
    routed_total = row["routed"]
    ranks = [{"rank": name[len("rank_"):] if name != "rank_5" else "5+", "routed": row[name],
              "share": _rate(row[name], routed_total)} for name in RANK_COLUMNS]
    choose = [row[c] for c in CHOOSE_US.columns]
    replicas = [{"replica_id": sc.replicas.get(r["replica_pk"], {}).get("replica_id"),
                 **sc.deployment_of(r["replica_pk"]),
                 "routed": r["routed"], "rejections": r["rejections"], "handoffs": r["handoffs"],
                 "rank0_rate": _rate(r["rank_0"], r["routed"]), "decision_quality": decision_quality(r)}
                for r in rollup_totals(conn, f, sc, RANK_HIT_REPLICA_COLUMNS, by="replica")]
    replicas.sort(key=_deployment_then_replica)
    deployments = [{**sc.deployments[pk], **_rank_figures(d), "decisions_per_request_mean": _decisions_per_request(d),
                    "decision_quality": decision_quality(d)}
                   for pk, d in per_deployment(sc, by_router, RANK_HIT_COLUMNS).items()]
    deployments.sort(key=lambda d: (_worst_first(d["rank0_rate"]), d["app"], d["deployment"]))
    # Decisions are a router's: filtered to replicas, the rollups' rows hold none.
    decisions_by_deployment = None if sc.replica_pks is not None else {
        pk: d["decisions"] for pk, d in per_deployment(sc, by_router, ("decisions",)).items()}
    return {
        "window": _window(f),
        **_rank_figures(row),
        "ranks": ranks,
        "decisions_per_request": {
            "mean": _decisions_per_request(row),
            "bins": [{"attempts": label, "routed": row[column]}
                     for label, column in zip(_attempt_labels(), ATTEMPTS.columns)],
        },
        "choose_us": {
            "p50": CHOOSE_US.percentile(choose, 0.50, row["choose_us_max"]),
            "p99": CHOOSE_US.percentile(choose, 0.99, row["choose_us_max"]),
            "max": row["choose_us_max"],
            "mean": _rate(row["choose_us_sum"], row["decisions"]),
        },
        "send_to_routed_ms": send_to_routed(row),
        "decision_quality": decision_quality(row),
        "decision_quality_over_time": decision_quality_over_time(conn, f, sc),
        "reasons": reasons(conn, f, sc, decisions_by_deployment),
        "deployments": deployments,
        "replicas": replicas,
    }


def reasons(conn: Connection, f: Filters, sc: Scope, decisions_by_deployment: Optional[Dict[int, int]]) -> dict:
    """Per deployment, its decisions per reason (`routelens_explain`): over
    the window, most frequent first, and per step (at most 30). A reason
    beyond the deployment's bound of reasons counted by name is counted as
    `other`; decisions without a reason are the deployment's `decisions`
    less the explained ones (`unexplained`, not given under a reason filter).
    `decisions_by_deployment` None (a replica filter): decisions and shares unknown."""
    step = _whole_minutes(default_step(f.seconds, 30))
    if not sc.routers:
        return {"step_s": step, "deployments": []}
    routers = sorted(sc.routers)
    if sc.replica_pks is not None:  # the routers of the replicas' deployments, as the other rank-hit figures
        of_replicas = {sc.replicas[pk]["deployment_pk"] for pk in sc.replica_pks}
        routers = [pk for pk in routers if sc.routers[pk]["deployment_pk"] in of_replicas]
    t = (reason_rollups.c.start // step * step).label("t")
    where = [_step_condition(f, step, reason_rollups), reason_rollups.c.router_pk.in_(routers)]
    if f.reasons:
        where.append(reason_rollups.c.reason.in_(f.reasons))
    query = (select(t, reason_rollups.c.router_pk, reason_rollups.c.reason,
                    func.sum(reason_rollups.c.decisions).label("decisions"))
             .where(*where).group_by(t, reason_rollups.c.router_pk, reason_rollups.c.reason))
    steps: Dict[int, Dict[int, Dict[str, int]]] = {}  # deployment_pk -> t -> reason -> decisions
    for start, router_pk, reason, count in conn.execute(query):
        by_reason = steps.setdefault(sc.routers[router_pk]["deployment_pk"], {}).setdefault(start, {})
        by_reason[reason] = by_reason.get(reason, 0) + count
    out = []
    for deployment_pk, by_step in steps.items():
        totals: Dict[str, int] = {}
        for by_reason in by_step.values():
            for reason, count in by_reason.items():
                totals[reason] = totals.get(reason, 0) + count
        decisions = None if decisions_by_deployment is None else decisions_by_deployment.get(deployment_pk, 0)
        explained = sum(totals.values())
        out.append({
            **sc.deployments[deployment_pk], "decisions": decisions, "explained": explained,
            "unexplained": None if f.reasons or decisions is None else max(decisions - explained, 0),
            "reasons": [{**reason_name(reason), "decisions": count, "share": _rate(count, decisions)}
                        for reason, count in sorted(totals.items(), key=lambda item: (-item[1], item[0]))],
            "points": [{"t": t, "reasons": [{**reason_name(reason), "decisions": count}
                                            for reason, count in sorted(by_reason.items())]}
                       for t, by_reason in sorted(by_step.items())],
        })
    out.sort(key=lambda d: (d["app"], d["deployment"]))
    return {"step_s": step, "deployments": out}


def reason_name(reason: str) -> dict:
    """A reason as stored in `reason_rollups`: its name, or the deployment's other reasons beyond the bound."""
    other = reason == OTHER_REASONS
    return {"reason": None if other else reason, "other": other}


def send_to_routed(row: dict) -> dict:
    """From the send to on_request_routed (docs/design.md, Definitions): how
    long the router's loop took to resume the sender after the replica's
    answer. `samples` counts the routed requests that carry it; the others
    (wire format before v3, sends without the rejection protocol) are
    unknown: with no samples every figure is None, never 0."""
    counts = [row[c] for c in SEND_TO_ROUTED_MS.columns]
    samples = sum(counts)
    maximum = row["send_to_routed_ms_max"]
    return {"samples": samples, "p50": SEND_TO_ROUTED_MS.percentile(counts, 0.50, maximum),
            "p99": SEND_TO_ROUTED_MS.percentile(counts, 0.99, maximum), "max": maximum,
            # To the nanosecond: the sum of floats depends on the order the rollups added them in, so
            # that the same events stored in another order (an export imported) differ in the last bit.
            "mean": None if samples == 0 else round(row["send_to_routed_ms_sum"] / samples, 6)}


def decision_quality(row: dict) -> dict:
    """Regret and belief error (docs/design.md, Definitions) of a row of
    sums of QUALITY_COLUMNS: each answer's, counted where the replica
    answered. Means and percentiles are None without samples (v1 events,
    routers without a queue-length cache)."""
    regret = [row[c] for c in REGRET.columns]
    regrets = sum(regret)
    errors = [row[c] for c in BELIEF_ERROR.columns]
    answers = sum(errors)
    return {
        "regret": {"samples": regrets, "mean": _rate(row["regret_sum"], regrets),
                   "p95": REGRET.percentile(regret, 0.95, row["regret_max"]), "max": row["regret_max"],
                   # bin 0 holds regret 0: the router chose one of the shortest queues
                   "positive_share": _rate(regrets - regret[0], regrets)},
        "belief_error": {"samples": answers, "mean": _rate(row["belief_error_sum"], answers),
                         "mean_abs": _rate(row["belief_error_abs_sum"], answers),
                         "p95_abs": BELIEF_ERROR.percentile(errors, 0.95, row["belief_error_abs_max"]),
                         "max_abs": row["belief_error_abs_max"]},
    }


def decision_quality_over_time(conn: Connection, f: Filters, sc: Scope) -> dict:
    """Per deployment, its decision quality per step, steps without an answer
    left out; filtered to replicas, theirs (a replica's over time). At most
    30 steps, as a series per replica has: each step holds enough answers
    for its percentiles to say something, and a day reads hourly rows."""
    step = _whole_minutes(default_step(f.seconds, 30))
    rows = rollup_totals(conn, f, sc, QUALITY_COLUMNS, by="router", step=step)
    steps: Dict[int, Dict[int, List[dict]]] = {}
    for row in rows:
        steps.setdefault(sc.routers[row["router_pk"]]["deployment_pk"], {}).setdefault(row["t"], []).append(row)
    deployments = []
    for deployment_pk, by_step in steps.items():
        points = [{"t": t, **decision_quality(_fold(group, QUALITY_COLUMNS))} for t, group in sorted(by_step.items())]
        points = [p for p in points if p["regret"]["samples"] or p["belief_error"]["samples"]]
        if points:
            deployments.append({**sc.deployments[deployment_pk], "points": points})
    deployments.sort(key=lambda d: (d["app"], d["deployment"]))
    return {"step_s": step, "deployments": deployments}


def _rank_figures(row: dict) -> dict:
    """The rank-hit figures of a row of sums (a window's, or one deployment's)."""
    routed = row["routed"]
    return {"routed": routed, "rank0_rate": _rate(row["rank_0"], routed), "handoffs": row["handoffs"],
            "handoff_rate": _rate(row["handoffs"], routed), "rejections": row["rejections"],
            "decisions": row["decisions"]}


def _decisions_per_request(row: dict) -> Optional[float]:
    attempts = [row[c] for c in ATTEMPTS.columns]
    return _rate(sum(n * c for n, c in zip(_attempt_values(), attempts)), sum(attempts))


def _attempt_labels() -> List[str]:
    labels, low = [], 0
    for bound in ATTEMPTS.bounds:
        labels.append(str(int(bound)) if bound - low <= 1 else f"{int(low) + 1}-{int(bound)}")
        low = bound
    return labels + [f"{int(low) + 1}+"]


def _attempt_values() -> List[float]:
    """A representative count per attempts bin, for the mean (exact for 1-4)."""
    values, low = [], 0
    for bound in ATTEMPTS.bounds:
        values.append((low + 1 + bound) / 2 if bound - low > 1 else bound)
        low = bound
    return values + [low + 1]


SUMMARY_COLUMNS = ("decisions", "routed", "completions", "rejections", "handoffs", "failures", "rank_0",
                   "latency_ms_sum", "latency_ms_max", *LATENCY_MS.columns, *STALENESS_COLUMNS)


def summary(conn: Connection, f: Filters, sc: Optional[Scope] = None) -> dict:
    """The window at a glance: request-weighted totals over everything in
    view; the figures that compare replicas per deployment, and the worst
    deployment's named."""
    sc = sc or scope(conn, f)
    by_router = rollup_totals(conn, f, sc, SUMMARY_COLUMNS, by="router")
    row = _fold(by_router, SUMMARY_COLUMNS)
    m0, m1 = f.rollup_bounds()
    seconds = max(m1 - m0, 1)
    sources = sources_in(conn, f, sc)
    latency = [row[c] for c in LATENCY_MS.columns]
    deployments = _deployment_summaries(conn, f, sc, by_router)
    unbalanced = deployments[0] if deployments else None  # they come least balanced first
    stalest = min(deployments, key=lambda d: _stalest_first(d["staleness"]), default=None)
    return {
        "window": _window(f),
        "decisions": row["decisions"], "decisions_per_s": row["decisions"] / seconds,
        "routed": row["routed"], "routed_per_s": row["routed"] / seconds,
        "completions": row["completions"], "failures": row["failures"],
        "rejections": row["rejections"], "handoffs": row["handoffs"],
        "rank0_rate": _rate(row["rank_0"], row["routed"]),
        "handoff_rate": _rate(row["handoffs"], row["routed"]),
        "latency_ms_p50": LATENCY_MS.percentile(latency, 0.50, row["latency_ms_max"]),
        "latency_ms_p99": LATENCY_MS.percentile(latency, 0.99, row["latency_ms_max"]),
        "replicas": sum(d["replicas"] for d in deployments),
        # The worst deployment's, named; the others' are in `deployments`.
        "imbalance": {**_name(unbalanced), **(unbalanced["imbalance"] if unbalanced else imbalance([]))},
        "staleness": {**_name(stalest), **(stalest["staleness"] if stalest else _against_period(None, None))},
        "deployments": deployments,
        "active_routers": sum(1 for s in sources if s["last_seen"] >= f.since),
        "dropped_events": sum(sum(s["dropped"].values()) for s in sources),
        "batch_gaps": sum(s["batch_gaps"] for s in sources),
    }


def _deployment_summaries(conn: Connection, f: Filters, sc: Scope, by_router: List[dict]) -> List[dict]:
    """Per deployment of the window, least balanced first: routed requests,
    replicas, rank-0 hit rate, hand-offs, rejections, imbalance and p95
    staleness against its stats period."""
    sums = per_deployment(sc, by_router, SUMMARY_COLUMNS)
    balance = {(d["app"], d["deployment"]): d for d in distribution(conn, f, sc)["deployments"]}
    out = []
    for pk, info in sc.deployments.items():
        dist = balance.get((info["app"], info["deployment"]))
        if pk not in sums and dist is None:
            continue  # nothing of it in the window
        row = sums.get(pk) or _fold([], SUMMARY_COLUMNS)
        p95 = STALENESS.percentile([row[c] for c in STALENESS.columns], 0.95, row["stale_max"])
        out.append({
            **info, "routed": row["routed"], "replicas": dist["replicas"] if dist else 0,
            "rank0_rate": _rate(row["rank_0"], row["routed"]), "handoffs": row["handoffs"],
            "rejections": row["rejections"], "imbalance": dist["imbalance"] if dist else imbalance([]),
            "staleness": _against_period(p95, stats_period(conn, f, sc.routers_of(pk)) if p95 is not None else None),
        })
    out.sort(key=lambda d: (_worst_first(d["imbalance"]["jain"]), d["app"], d["deployment"]))
    return out


def _against_period(p95_s: Optional[float], period_s: Optional[float]) -> dict:
    return {"p95_s": p95_s, "stats_period_s": period_s,
            "p95_over_period": p95_s / period_s if p95_s is not None and period_s else None}


def _name(deployment: Optional[dict]) -> dict:
    return {"app": deployment["app"], "deployment": deployment["deployment"]} if deployment else NO_DEPLOYMENT


def sources_in(conn: Connection, f: Optional[Filters] = None, sc: Optional[Scope] = None) -> List[dict]:
    """Traced router instances (of the scope, seen during the window) with their
    counters: events produced and dropped by reason, and lost batches."""
    batches = (select(SourceBatch.source_pk, func.max(SourceBatch.seq).label("max_seq"),
                      func.count().label("received"))
               .group_by(SourceBatch.source_pk).subquery())
    query = (select(Source.__table__, batches.c.max_seq, batches.c.received)
             .outerjoin(batches, batches.c.source_pk == Source.pk).order_by(Source.pk))
    if sc is not None:
        query = query.where(Source.router_pk.in_(sorted(sc.routers)))
    if f is not None:
        query = query.where(Source.last_seen >= f.since, Source.first_seen < f.until)
    out = []
    for source in conn.execute(query):
        max_seq, received = source.max_seq, source.received
        out.append({
            "source_id": source.source_id, "router_pk": source.router_pk, "handle_source": source.handle_source,
            "node_id": source.node_id, "actor_id": source.actor_id, "hostname": source.hostname,
            "pid": source.pid, "tracer_version": source.tracer_version,
            "first_seen": source.first_seen, "last_seen": source.last_seen,
            "batches": received or 0,
            # Batch numbers start at 1 at each source: every missing number is a lost batch.
            "batch_gaps": (max_seq or 0) - (received or 0),
            "produced": source.produced, "dropped": json.loads(source.dropped or "{}"),
        })
    return out


TIMESERIES_COLUMNS = ("decisions", "routed", "completions", "rejections", "handoffs", "failures", *RANK_COLUMNS,
                      *STALENESS_COLUMNS)
PER_REPLICA_TIMESERIES_COLUMNS = ("routed", "rank_0", "handoffs", "rejections", *STALENESS_COLUMNS)


def default_step(seconds: float, points: int = 120) -> int:
    """At most `points` steps (about half as many at least), in whole minutes or hours."""
    for step in (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if seconds / step <= points:
            return step
    return 86400


def timeseries(conn: Connection, f: Filters, step: Optional[int] = None, per_replica: bool = False,
               sc: Optional[Scope] = None) -> dict:
    """Counters per time step. Steps are whole minutes, or whole hours when the
    step allows it, so that long windows read hourly rows. Per replica, the
    default step gives a quarter of the points (a series per replica: a 24 h
    window reads hourly rows, not 1,440 minutes x replicas). Points start at
    multiples of the step; they count the window's rows only, so that they
    add up to the panels' totals even where the window does not begin or end
    on a step."""
    sc = sc or scope(conn, f)
    step = _whole_minutes(step or default_step(f.seconds, 30 if per_replica else 120))
    condition = _step_condition(f, step)
    names = PER_REPLICA_TIMESERIES_COLUMNS if per_replica else TIMESERIES_COLUMNS
    if not sc.routers:
        return {"window": _window(f), "step_s": step, "points": []}
    where = [condition, rollups.c.router_pk.in_(sorted(sc.routers))]
    if per_replica:
        where.append(rollups.c.replica_pk != ROUTER_LEVEL)
    if sc.replica_pks is not None:
        where.append(rollups.c.replica_pk.in_(sc.replica_pks))
    elif not per_replica:
        where.append(rollups.c.replica_pk == ROUTER_LEVEL)
    t = (rollups.c.start // step * step).label("t")
    keys = (t, rollups.c.replica_pk) if per_replica else (t,)
    query = select(*keys, *_sum_columns(names)).where(*where).group_by(*keys).order_by(*keys)
    out = []
    for row in conn.execute(query):
        point = dict(row._mapping)
        for name in names:
            if not name.endswith("_max"):
                point[name] = point[name] or 0
        if per_replica:
            replica_pk = point.pop("replica_pk")
            point.update(replica_id=sc.replicas.get(replica_pk, {}).get("replica_id"), **sc.deployment_of(replica_pk))
        else:
            point["rank0_rate"] = _rate(point["rank_0"], point["routed"])
        point["staleness_p95_s"] = STALENESS.percentile([point.pop(c) for c in STALENESS.columns], 0.95,
                                                       point["stale_max"])
        out.append(point)
    if per_replica:  # by replica id, not by key: the order must not depend on the order replicas were stored
        out.sort(key=lambda point: (point["t"], *_deployment_then_replica(point)))
    return {"window": _window(f), "step_s": step, "points": out}


def _whole_minutes(step: float) -> int:
    return max(MINUTE, int(step) // MINUTE * MINUTE)


def _step_condition(f: Filters, step: int, table=rollups):
    """Rows of the rollups (or of `reason_rollups`) that steps of `step` seconds read over the window."""
    if step % HOUR == 0:
        # Every row of the window, hourly or at its edges per minute, lies in one step.
        return _window_condition(f, table)
    m0, m1 = f.rollup_bounds()
    return and_(table.c.grain == MINUTE, table.c.start >= m0, table.c.start < m1)


def _window(f: Filters) -> dict:
    m0, m1 = f.rollup_bounds()
    return {"since": f.since, "until": f.until, "rollup_since": m0, "rollup_until": m1}


# --- catalogue ---

def known_reasons(conn: Connection) -> List[str]:
    """The reasons counted by name (each deployment's first ones, up to its bound), for a filter's choices."""
    return list(conn.scalars(select(reason_rollups.c.reason).distinct()
                             .where(reason_rollups.c.grain == HOUR, reason_rollups.c.reason != OTHER_REASONS)
                             .order_by(reason_rollups.c.reason)))


def any_router(conn: Connection) -> bool:
    """Whether any traced router has reported at all."""
    return conn.scalar(select(Router.pk).limit(1)) is not None


def deployments(conn: Connection, f: Optional[Filters] = None) -> dict:
    """Apps, deployments, routers (class and labels) and sources known."""
    routers = conn.execute(
        select(Router.pk, Router.router_class, Router.labels, Deployment.app, Deployment.deployment)
        .join(Deployment, Deployment.pk == Router.deployment_pk).order_by(Deployment.app, Deployment.deployment)
    ).all()
    sources = sources_in(conn, f)
    by_router: Dict[int, List[dict]] = {}
    for source in sources:
        by_router.setdefault(source["router_pk"], []).append(source)
    out: Dict[Tuple[str, str], dict] = {}
    labels: Dict[str, set] = {}
    for pk, router_class, router_labels, app, deployment in routers:
        router_labels = json.loads(router_labels)
        for k, v in router_labels.items():
            labels.setdefault(k, set()).add(v)
        entry = out.setdefault((app, deployment), {"app": app, "deployment": deployment, "routers": []})
        entry["routers"].append({
            "router_class": router_class, "labels": router_labels,
            "sources": [{k: v for k, v in s.items() if k != "router_pk"} for s in by_router.get(pk, [])],
        })
    return {
        "apps": sorted({app for app, _ in out}),
        "deployments": list(out.values()),
        "labels": {k: sorted(v) for k, v in sorted(labels.items())},
    }
