"""Decision reasons: what a router said of each decision, and its counts per reason.

Wire format v3 gives a decision event the router's own reason and scores
(`routelens_explain`). They are stored with the decision, nullable: rows of
earlier batches, and every row written before this revision, have none. The
new table `reason_rollups` counts decisions per minute and per hour, per
router and reason (at most `MAX_REASONS_PER_DEPLOYMENT` reasons of a
deployment by name, the rest under the empty reason), for the Rank hits view.

Adding nullable columns changes no existing row on either backend: the
upgrade is quick on a large database. The downgrade drops the columns and
the table, and the reasons with them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("reason", sa.String(length=64), nullable=True))
    op.add_column("decisions", sa.Column("scores", sa.Text(), nullable=True))
    op.create_table(
        "reason_rollups",
        sa.Column("grain", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("router_pk", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("decisions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("grain", "start", "router_pk", "reason", name=op.f("pk_reason_rollups")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("reason_rollups")
    op.drop_column("decisions", "scores")
    op.drop_column("decisions", "reason")
