"""The database schema, as SQLAlchemy 2 models. Alembic's migrations in
`migrations/` create exactly this (a test runs autogenerate against it).

Three kinds of table:

- dimensions: `deployments`, `routers` (a deployment x router class x label
  set: what the dashboard filters and compares), `sources` (one traced
  router instance in one process), `replicas`, `source_batches`;
- raw events, one table per type, keyed by the event's UUIDv7 as 16 bytes.
  The key is time-ordered, so inserts append and a time window is a key
  range (see `collector.store.ids`): no separate time index is needed;
- `rollups`: counters and fixed histograms per minute and per hour, per
  router and replica, updated in the ingest transaction. Panels read these
  only; `reason_rollups`, decisions per minute and per hour, per router and
  reason (the routers' own explanations); `prefix_rollups`, routed requests
  per minute, hour and quarter day, per router, prefix group and replica
  (Prefix affinity);
- `stored_batches`: the batches stored, in the order they were stored, for
  live readers (`GET /v1/tail`); kept for minutes.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .bins import HISTOGRAMS, RANK_COLUMNS
from .types import EventId, Ranking, RequestId

# Stable constraint names, so that migrations can name what they alter on both backends.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("app", "deployment"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    app: Mapped[str] = mapped_column(String(256))
    deployment: Mapped[str] = mapped_column(String(256))
    # Time of the newest `replicas` event applied to its replicas' membership.
    membership_at: Mapped[Optional[float]] = mapped_column(Float)


class Router(Base):
    """Traced routers that share a deployment, a class and labels: the unit
    of every panel and of comparisons (say `router_version=a` vs `b`)."""

    __tablename__ = "routers"
    __table_args__ = (UniqueConstraint("deployment_pk", "router_class", "labels_key"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_pk: Mapped[int] = mapped_column(ForeignKey("deployments.pk"))
    router_class: Mapped[str] = mapped_column(String(512))
    labels: Mapped[str] = mapped_column(Text)  # JSON object
    labels_key: Mapped[str] = mapped_column(String(1024))  # canonical JSON of labels, for uniqueness


class Source(Base):
    """One traced router instance in one process (proxy, driver or replica)."""

    __tablename__ = "sources"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[str] = mapped_column(String(128), unique=True)
    router_pk: Mapped[int] = mapped_column(ForeignKey("routers.pk"))
    handle_source: Mapped[Optional[str]] = mapped_column(String(128))
    node_id: Mapped[Optional[str]] = mapped_column(String(128))
    actor_id: Mapped[Optional[str]] = mapped_column(String(128))
    hostname: Mapped[Optional[str]] = mapped_column(String(256))
    pid: Mapped[Optional[int]] = mapped_column(Integer)
    tracer_version: Mapped[Optional[str]] = mapped_column(String(64))
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    # Highest batch number received, and the counters that batch carried
    # (cumulative at the source, so the newest batch has the newest values).
    last_seq: Mapped[int] = mapped_column(Integer)
    produced: Mapped[Optional[int]] = mapped_column(BigInteger)
    dropped: Mapped[str] = mapped_column(Text, default="{}")  # JSON {reason: count}


class SourceBatch(Base):
    """Batch numbers received per source: a missing number is a lost batch."""

    __tablename__ = "source_batches"

    source_pk: Mapped[int] = mapped_column(ForeignKey("sources.pk"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[float] = mapped_column(Float)


class Replay(Base):
    """A replay's result (`routelens replay`, collector.replay): made by the
    command, which runs the router; the collector only serves it."""

    __tablename__ = "replays"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, as text
    created_at: Mapped[float] = mapped_column(Float, index=True)
    mode: Mapped[str] = mapped_column(String(32))
    router_class: Mapped[str] = mapped_column(String(512))  # package.module:Class
    router_kwargs: Mapped[str] = mapped_column(Text)  # JSON object
    seed: Mapped[int] = mapped_column(BigInteger)
    runs: Mapped[int] = mapped_column(Integer)
    since: Mapped[float] = mapped_column(Float)
    until: Mapped[float] = mapped_column(Float)
    filters: Mapped[str] = mapped_column(Text)  # JSON object: the filters as the read API's query takes them
    result: Mapped[str] = mapped_column(Text)  # JSON object (docs/replay.md)


class Replica(Base):
    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("deployment_pk", "replica_id"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_pk: Mapped[int] = mapped_column(ForeignKey("deployments.pk"))
    replica_id: Mapped[str] = mapped_column(String(256))
    node_id: Mapped[Optional[str]] = mapped_column(String(128))
    availability_zone: Mapped[Optional[str]] = mapped_column(String(128))
    max_ongoing_requests: Mapped[Optional[int]] = mapped_column(Integer)
    model_ids: Mapped[Optional[str]] = mapped_column(Text)  # JSON list
    first_seen: Mapped[float] = mapped_column(Float)
    # Membership, from `replicas` events: null removed_at means a member now.
    added_at: Mapped[Optional[float]] = mapped_column(Float)
    removed_at: Mapped[Optional[float]] = mapped_column(Float)


def _event_columns():
    """Columns every raw event table starts with."""
    return [
        Column("id", EventId, primary_key=True),
        Column("ts", Float, nullable=False),
        Column("router_pk", Integer, nullable=False),
        Column("source_pk", Integer, nullable=False),
    ]


# The queue lengths behind a replica's answer (wire format v2; null in events
# of v1): as the decision that supplied the replica saw it, the shortest that
# decision saw, and as the replica reported. Its decision-quality figures come from them.
ANSWER_QUEUE_LENS = ("believed_queue_len", "shortest_queue_len", "reported_queue_len")


# A refusal's answer columns in `completed`.
REFUSAL_COLUMNS = ("decision_id", *ANSWER_QUEUE_LENS)


def _answer_columns():
    """ANSWER_QUEUE_LENS, last in their tables, where migration 0006 added them."""
    return [Column(name, Integer) for name in ANSWER_QUEUE_LENS]


# Raw events are Core tables: ingest writes them in bulk, never through the ORM.
# On SQLite they are WITHOUT ROWID tables clustered on the time-ordered id.
_clustered = {"sqlite_with_rowid": False}

decisions = Table(
    "decisions", Base.metadata,
    *_event_columns(),
    Column("request_id", RequestId),
    Column("internal_request_id", RequestId),
    Column("model_id", String(256)),
    Column("attempt", Integer, nullable=False),
    Column("duration_us", Integer, nullable=False),
    Column("n_candidates", Integer, nullable=False),
    Column("ranking", Ranking, nullable=False),  # see `Ranking`
    Column("extra", Text),  # JSON: attributes and fields this version does not know
    # Wire format v3 (migration 0007): what the router said of the decision (routelens_explain), null when
    # it said nothing. The scores are a JSON object of finite numbers.
    Column("reason", String(64)),
    Column("scores", Text),
    **_clustered,
)

routed = Table(
    "routed", Base.metadata,
    *_event_columns(),
    Column("replica_pk", Integer, nullable=False),
    Column("decision_id", EventId),
    Column("rank", SmallInteger),
    Column("own_ranking", Boolean),
    Column("attempts", Integer),
    Column("queue_wait_ms", Float),
    Column("request_id", RequestId),
    Column("internal_request_id", RequestId),
    Column("model_id", String(256)),
    Column("extra", Text),
    *_answer_columns(),
    Column("send_to_routed_ms", Float),  # wire format v3 (migration 0008; null before it: unknown)
    Index(None, "decision_id"),
    **_clustered,
)

completed = Table(
    "completed", Base.metadata,
    *_event_columns(),
    Column("replica_pk", Integer, nullable=False),
    Column("internal_request_id", RequestId),
    Column("routed_id", EventId),
    Column("latency_ms", Float),
    Column("ok", Boolean),
    Column("rejected", Boolean, nullable=False),
    Column("extra", Text),
    # A refusal's (migration 0006; null for the other completions and in events of v1): the decision that
    # supplied the replica, as a routed event's decision_id, and the queue lengths.
    Column("decision_id", EventId),
    *_answer_columns(),
    Index(None, "routed_id"),
    **_clustered,
)

stats_changes = Table(
    "stats_changes", Base.metadata,
    *_event_columns(),
    Column("replica_pk", Integer, nullable=False),
    Column("stats", Text, nullable=False),  # JSON object
    Column("collected_at", Float),
    Column("extra", Text),
    **_clustered,
)

memberships = Table(
    "memberships", Base.metadata,
    *_event_columns(),
    Column("replicas", Text, nullable=False),  # JSON, as received
    Column("extra", Text),
    **_clustered,
)

RAW_TABLES = (decisions, routed, completed, stats_changes, memberships)

# Rollup counters. Rows with replica_pk = ROUTER_LEVEL hold a router's totals (see
# collector.ingest.rollups); the others, one replica's share.
ROUTER_LEVEL = 0
ROLLUP_KEY = ("grain", "start", "router_pk", "replica_pk")
ROLLUP_COUNTS = (
    "decisions",  # choose_replicas calls
    "candidates",  # times the replica was ranked
    "routed", "handoffs", "rejections", "completions", "failures",
    "stale_stamped", "stale_observed",  # ranked with stamped / observed stats age
    *RANK_COLUMNS,
    *(column for bins in HISTOGRAMS for column in bins.columns),
)
ROLLUP_SUMS = ("latency_ms_sum", "choose_us_sum",
               "regret_sum", "belief_error_sum", "belief_error_abs_sum",  # belief_error_sum: signed
               "send_to_routed_ms_sum")
ROLLUP_MAXIMA = ("stale_max", "latency_ms_max", "choose_us_max", "regret_max", "belief_error_abs_max",
                 "send_to_routed_ms_max")


def _rollup_columns():
    """The key columns every rollup table starts with: a router's minute or hour (or a prefix rollup's quarter
    day)."""
    return [
        Column("grain", Integer, primary_key=True),  # seconds: 60 or 3600 (or PREFIX_GRAINS)
        # Epoch seconds, a multiple of grain: past 2038, so 64 bits (migration 0003); SQLite's INTEGER already is.
        Column("start", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("router_pk", Integer, primary_key=True),
    ]


rollups = Table(
    "rollups", Base.metadata,
    *_rollup_columns(),
    Column("replica_pk", Integer, primary_key=True),
    *(Column(name, Integer, nullable=False, server_default="0") for name in ROLLUP_COUNTS),
    *(Column(name, Float, nullable=False, server_default="0") for name in ROLLUP_SUMS),
    *(Column(name, Float) for name in ROLLUP_MAXIMA),
    **_clustered,
)


# Decisions per reason (`decisions.reason`), per minute and per hour, per router: what the Rank hits view
# shows over time. A deployment's reasons are counted under their own name up to
# `collector.ingest.rollups.MAX_REASONS_PER_DEPLOYMENT`; the decisions of any further reason under
# OTHER_REASONS, which no router can send (a reason has at least one character). Decisions without a reason
# have no row: they are the router's `decisions` less these.
OTHER_REASONS = ""
REASON_ROLLUP_KEY = ("grain", "start", "router_pk", "reason")
reason_rollups = Table(
    "reason_rollups", Base.metadata,
    *_rollup_columns(),
    Column("reason", String(64), primary_key=True),
    Column("decisions", Integer, nullable=False),
    **_clustered,
)


# Routed requests per prefix group (the `prefix_group` attribute of the decision that routed them), per minute,
# hour and quarter day (PREFIX_GRAINS), per router and replica, with the sums Prefix affinity shows: the match
# rates the decisions recorded (`scores.match_rate`, where they recorded one) and their prompts' lengths. A routed
# request counts once both it and its decision are stored, whichever came first (collector.ingest.writer); one
# handed a replica another request's decision found (own_ranking false) is not counted (collector.query.prefixes).
#
# The quarter days are what a week's view steps by: one row per step, group and replica, read in key order. The
# view also adds up each group's requests per replica over the whole window, which would mean sorting those rows
# (tens of thousands over a week); the index below holds them by block of PREFIX_BLOCK_S seconds in that order
# instead, so that a week's view reads them one block at a time, already sorted (migration 0010).
PREFIX_ROLLUP_KEY = ("grain", "start", "router_pk", "prefix_group", "replica_pk")
PREFIX_ROLLUP_VALUES = ("routed", "match_rate_sum", "match_rates", "prompt_chars_sum")
PREFIX_GRAINS = (60, 3600, 21600)
PREFIX_BLOCK_S = 7 * 86400
prefix_rollups = Table(
    "prefix_rollups", Base.metadata,
    *_rollup_columns(),
    Column("prefix_group", Text, primary_key=True),  # as a router recorded it: no length is promised
    Column("replica_pk", Integer, primary_key=True),
    Column("routed", Integer, nullable=False),
    Column("match_rate_sum", Float, nullable=False),
    Column("match_rates", Integer, nullable=False),
    Column("prompt_chars_sum", Float, nullable=False),
    **_clustered,
)
# Integer division on both databases (start is an integer). Queries must write it as the index does (and as
# migration 0010 created it) for SQLite to use the index: they use this expression.
PREFIX_BLOCK = literal_column(f"(start / {PREFIX_BLOCK_S})")
Index("ix_prefix_rollups_by_block", prefix_rollups.c.grain, PREFIX_BLOCK,
      *(prefix_rollups.c[name] for name in PREFIX_ROLLUP_KEY[2:] + PREFIX_ROLLUP_VALUES),  # covering
      sqlite_where=prefix_rollups.c.grain == PREFIX_GRAINS[-1],
      postgresql_where=prefix_rollups.c.grain == PREFIX_GRAINS[-1])


# Each batch that stored decisions, routed or completed events, numbered in the order batches were stored:
# what a live reader (`GET /v1/tail`, collector.query.tail) follows, by `seq`. The raw tables cannot be
# followed so: their ids are UUIDv7 that the tracers make, ordered by the clock of the process that made
# them, not by when a collector stored them (a batch replayed from a spool minutes later, a host whose
# clock runs behind, the batches of many sources interleaving). One row per batch, with the ids of the
# events it stored; ingest deletes the rows older than `settings.STORED_BATCHES_KEEP_S`.
stored_batches = Table(
    "stored_batches", Base.metadata,
    # SQLite: a rowid alias with AUTOINCREMENT, so that a number is never given twice, even once the
    # newest rows are deleted. PostgreSQL: BIGSERIAL.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("stored_at", Float, nullable=False),  # the storing collector's clock
    Column("router_pk", Integer, nullable=False),
    # The ids of the events the batch stored, 16 bytes each, one after another, in the batch's order.
    Column("decision_ids", LargeBinary, nullable=False),
    Column("routed_ids", LargeBinary, nullable=False),
    Column("completed_ids", LargeBinary, nullable=False),
    Index(None, "stored_at"),
    sqlite_autoincrement=True,
)
