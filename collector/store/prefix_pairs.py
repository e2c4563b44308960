"""Routed requests with the prefix group of the decision that routed them, added up in the database.

A routed request belongs to the prefix group its decision recorded (the `prefix_group` attribute, see
routers.llm); requests handed a replica that another request's decision found (FIFO hand-offs,
own_ranking false) are left out, since that decision's prompt is the other request's. The match rate is
the one each decision recorded (`scores.match_rate`), where it recorded one.

One statement for both readers of these pairs, so that they agree to the last digit: Prefix affinity
(collector.query.prefixes) on raw rows, and ingest (collector.ingest.writer) filling `prefix_rollups`.
"""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import JSON, Float, Integer, Join, cast, func, or_, select, true, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import Select

from .models import decisions, routed
from .types import stored_bytes


def _json_member(dialect: str, column, *path: str):
    """A member of a JSON text column as text, in the database's own JSON functions."""
    if dialect == "postgresql":
        return cast(column, JSONB)[path].as_string()
    return type_coerce(column, JSON)[path].as_string()


ALL_PAIRS = routed.join(decisions, decisions.c.id == routed.c.decision_id)
"""Every routed row joined to its decision, for the Prefix affinity query to pair with `grouped_pairs`."""


def batch_pairs(dialect: str, ids: Sequence[bytes]) -> Join:
    """The routed rows of these ids joined to their decisions, for ingest to pair a batch's rows with
    `grouped_pairs`: the routed rows read first, by primary key, then each one's decision by its own.

    Joined as `ALL_PAIRS` is, PostgreSQL may instead scan all of `decisions`, evaluating the prefix-group
    filter on each stored row (its guess on tables never or not lately analyzed: 15-100 ms a batch at
    10,000-30,000 decisions, growing with the table), also when the routed rows are a MATERIALIZED CTE. A
    LATERAL subquery that PostgreSQL cannot flatten into the join (OFFSET 0) can only be read per routed row,
    by its key. SQLite, which has no LATERAL, reads the indexes in this order already."""
    batch = (select(routed.c.ts, routed.c.router_pk, routed.c.replica_pk, routed.c.own_ranking, routed.c.decision_id)
             .where(stored_bytes(routed.c.id).in_(ids)).cte("batch_routed")
             .prefix_with("MATERIALIZED", dialect="postgresql"))
    if dialect != "postgresql":
        return batch.join(decisions, decisions.c.id == batch.c.decision_id)
    their_decision = (select(decisions.c.extra, decisions.c.scores).where(decisions.c.id == batch.c.decision_id)
                      .offset(0).lateral("decision"))
    return batch.join(their_decision, true())


def _step_start(dialect: str, step: int, ts):
    """Each routed event's step: the start of its `step`-second interval (ts >= 0)."""
    if dialect == "postgresql":
        return func.floor(ts / step) * step
    return cast(ts / step, Integer) * step  # truncation is the floor of a positive number


def grouped_pairs(dialect: str, step: int, pairs: Join, *where) -> Select:
    """The routed rows of `pairs` (`ALL_PAIRS` or `batch_pairs`: routed rows joined to their decisions) matching
    `where` that belong to a prefix group, as rows of (router_pk, prefix_group, replica_pk, step_start, routed,
    match_rate_sum, match_rates, prompt_chars_sum) per router, group, replica and `step`-second step. Sums over
    no value are NULL, as SQL's."""
    request, decision = pairs.left.c, pairs.right.c
    group = _json_member(dialect, decision.extra, "attributes", "prefix_group")
    match_rate = cast(_json_member(dialect, decision.scores, "match_rate"), Float)
    prompt_chars = cast(_json_member(dialect, decision.extra, "attributes", "prompt_chars"), Float)
    start = _step_start(dialect, step, request.ts).label("step_start")
    return (select(request.router_pk, group.label("prefix_group"), request.replica_pk, start,
                   func.count().label("routed"), func.sum(match_rate).label("match_rate_sum"),
                   func.count(match_rate).label("match_rates"),
                   func.sum(prompt_chars).label("prompt_chars_sum"))
            .select_from(pairs)
            .where(*where, or_(request.own_ranking.is_(None), request.own_ranking.is_(True)),
                   decision.extra.like('%"prefix_group"%'), group.is_not(None))
            .group_by(request.router_pk, group, request.replica_pk, start))
