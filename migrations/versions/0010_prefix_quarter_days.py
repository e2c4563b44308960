"""Prefix rollups per quarter day, and an index holding them by week.

Over a week, Prefix affinity steps by 6 hours. It read hourly rows
(118,000 for a week of 100 busy prefix groups over 50 replicas) and added
them up per step, group and replica, then per group and replica over the
window: 477 ms on SQLite, both sums sorting tens of thousands of rows.
Rows per quarter day (grain 21600) are the steps themselves, read in key
order; the index `ix_prefix_rollups_by_block` holds them per week
(`start / 604800`) in (router, prefix group, replica) order with their
values, so the window's sums per group and replica are read a week at a
time, already in order. Ingest keeps the new grain from now on; retention
keeps it, as it keeps hours.

The upgrade adds up the hourly rows stored into quarter days, as ingest
would have. The downgrade drops the index and the quarter-day rows.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = "grain, start, router_pk, prefix_group, replica_pk, routed, match_rate_sum, match_rates, prompt_chars_sum"
INDEXED = ("grain", "(start / 604800)", "router_pk", "prefix_group", "replica_pk",
           "routed", "match_rate_sum", "match_rates", "prompt_chars_sum")


def upgrade() -> None:
    op.execute(
        f"INSERT INTO prefix_rollups ({COLUMNS}) "
        f"SELECT 21600, start / 21600 * 21600, router_pk, prefix_group, replica_pk, sum(routed), "
        f"sum(match_rate_sum), sum(match_rates), sum(prompt_chars_sum) FROM prefix_rollups WHERE grain = 3600 "
        f"GROUP BY start / 21600 * 21600, router_pk, prefix_group, replica_pk")
    op.create_index("ix_prefix_rollups_by_block", "prefix_rollups", [sa.text(column) for column in INDEXED],
                    sqlite_where=sa.text("grain = 21600"), postgresql_where=sa.text("grain = 21600"))


def downgrade() -> None:
    op.drop_index("ix_prefix_rollups_by_block", table_name="prefix_rollups")
    op.execute("DELETE FROM prefix_rollups WHERE grain = 21600")
