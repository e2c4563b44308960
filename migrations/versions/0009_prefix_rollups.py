"""Prefix rollups: routed requests per prefix group, per minute and per hour.

Prefix affinity read the window's raw routed rows joined to their decisions,
and their JSON, for every view: 0.85 s over 24 h, 7 s over 7 d of a busy
deployment. The new table `prefix_rollups` counts them per minute and per
hour, per router, prefix group (the `prefix_group` attribute of the
decision that routed the request) and replica, with the sums of the
decisions' match rates (and how many recorded one) and prompt lengths;
ingest keeps it from now on, and retention prunes its minutes as the
other rollups'.

The upgrade fills it from the rows stored: minutes from the raw rows,
paired as `collector.store.prefix_pairs` pairs them at this revision
(written out here, as it stands, so that this revision keeps doing what it
did), hours from the minutes, as ingest adds them up. It reads every routed
row with a decision once: seconds per million on SQLite. The downgrade
drops the table; the raw rows keep everything it held, within retention.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = "grain, start, router_pk, prefix_group, replica_pk, routed, match_rate_sum, match_rates, prompt_chars_sum"

# A JSON member as text, in each database's JSON functions (as SQLAlchemy renders `as_string()` of one).
MEMBER = {
    "sqlite": "CAST(JSON_EXTRACT({column}, '$.{dotted}') AS VARCHAR)",
    "postgresql": "CAST(CAST({column} AS JSONB) #>> '{{{commas}}}' AS VARCHAR)",
}
MINUTE_START = {
    "sqlite": "CAST(r.ts / 60.0 AS INTEGER) * 60",  # truncation is the floor of a positive number
    "postgresql": "floor(r.ts / 60) * 60",
}


def _member(dialect: str, column: str, *path: str) -> str:
    return MEMBER[dialect].format(column=column, dotted=".".join(f'"{name}"' for name in path),
                                  commas=", ".join(path))


def upgrade() -> None:
    op.create_table(
        "prefix_rollups",
        sa.Column("grain", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("router_pk", sa.Integer(), nullable=False),
        sa.Column("prefix_group", sa.Text(), nullable=False),
        sa.Column("replica_pk", sa.Integer(), nullable=False),
        sa.Column("routed", sa.Integer(), nullable=False),
        sa.Column("match_rate_sum", sa.Float(), nullable=False),
        sa.Column("match_rates", sa.Integer(), nullable=False),
        sa.Column("prompt_chars_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("grain", "start", "router_pk", "prefix_group", "replica_pk",
                                name=op.f("pk_prefix_rollups")),
        sqlite_with_rowid=False,
    )
    dialect = op.get_bind().dialect.name
    group = _member(dialect, "d.extra", "attributes", "prefix_group")
    match_rate = f"CAST({_member(dialect, 'd.scores', 'match_rate')} AS FLOAT)"
    prompt_chars = f"CAST({_member(dialect, 'd.extra', 'attributes', 'prompt_chars')} AS FLOAT)"
    op.execute(sa.text(
        f"INSERT INTO prefix_rollups ({COLUMNS}) "
        f"SELECT 60, {MINUTE_START[dialect]}, r.router_pk, {group}, r.replica_pk, count(*), "
        f"coalesce(sum({match_rate}), 0), count({match_rate}), coalesce(sum({prompt_chars}), 0) "
        f"FROM routed r JOIN decisions d ON d.id = r.decision_id "
        f"WHERE (r.own_ranking IS NULL OR r.own_ranking = :own) AND d.extra LIKE :named "
        f"AND {group} IS NOT NULL "
        f"GROUP BY {MINUTE_START[dialect]}, r.router_pk, {group}, r.replica_pk"
    ).bindparams(sa.bindparam("own", True, type_=sa.Boolean()), named='%"prefix_group"%'))
    op.execute(
        f"INSERT INTO prefix_rollups ({COLUMNS}) "
        f"SELECT 3600, start / 3600 * 3600, router_pk, prefix_group, replica_pk, sum(routed), sum(match_rate_sum), "
        f"sum(match_rates), sum(prompt_chars_sum) FROM prefix_rollups WHERE grain = 60 "
        f"GROUP BY start / 3600 * 3600, router_pk, prefix_group, replica_pk")


def downgrade() -> None:
    op.drop_table("prefix_rollups")
