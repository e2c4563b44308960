"""Routed requests with the prefix group of the decision that routed them, added up in the database.

A routed request belongs to the prefix group its decision recorded (the `prefix_group` attribute, see
routers.llm); requests handed a replica that another request's decision found (FIFO hand-offs,
own_ranking false) are left out, since that decision's prompt is the other request's. The match rate is
the one each decision recorded (`scores.match_rate`), where it recorded one.

One statement for both readers of these pairs, so that they agree to the last digit: Prefix affinity
(collector.query.prefixes) on raw rows, and ingest (collector.ingest.writer) filling `prefix_rollups`.
"""

from __future__ import annotations

from sqlalchemy import JSON, Float, Integer, cast, func, or_, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import Select

from .models import decisions, routed


def _json_member(dialect: str, column, *path: str):
    """A member of a JSON text column as text, in the database's own JSON functions."""
    if dialect == "postgresql":
        return cast(column, JSONB)[path].as_string()
    return type_coerce(column, JSON)[path].as_string()


def _step_start(dialect: str, step: int):
    """Each routed event's step: the start of its `step`-second interval (ts >= 0)."""
    if dialect == "postgresql":
        return func.floor(routed.c.ts / step) * step
    return cast(routed.c.ts / step, Integer) * step  # truncation is the floor of a positive number


def grouped_pairs(dialect: str, step: int, *where) -> Select:
    """The routed rows matching `where` that belong to a prefix group, joined to their decisions, as rows of
    (router_pk, prefix_group, replica_pk, step_start, routed, match_rate_sum, match_rates, prompt_chars_sum)
    per router, group, replica and `step`-second step. Sums over no value are NULL, as SQL's."""
    group = _json_member(dialect, decisions.c.extra, "attributes", "prefix_group")
    match_rate = cast(_json_member(dialect, decisions.c.scores, "match_rate"), Float)
    prompt_chars = cast(_json_member(dialect, decisions.c.extra, "attributes", "prompt_chars"), Float)
    start = _step_start(dialect, step).label("step_start")
    return (select(routed.c.router_pk, group.label("prefix_group"), routed.c.replica_pk, start,
                   func.count().label("routed"), func.sum(match_rate).label("match_rate_sum"),
                   func.count(match_rate).label("match_rates"),
                   func.sum(prompt_chars).label("prompt_chars_sum"))
            .select_from(routed.join(decisions, decisions.c.id == routed.c.decision_id))
            .where(*where, or_(routed.c.own_ranking.is_(None), routed.c.own_ranking.is_(True)),
                   decisions.c.extra.like('%"prefix_group"%'), group.is_not(None))
            .group_by(routed.c.router_pk, group, routed.c.replica_pk, start))
