"""Decision quality: the queue lengths behind each answer, and their rollups.

Wire format v2 gives a replica's answer (a `routed` event, or a refusal's
`completed` event) the chosen replica's queue length as its decision saw
it, the shortest that decision saw, and the count the replica reported;
a refusal also names the decision that supplied the replica, as a routed
event always did (`completed.decision_id`). They are stored with the
answer, nullable: rows of v1 batches, and every row written before this
revision, have none, and their figures read as unknown. The rollups gain what the Rank hits panel reads of them: the
histograms of regret and of the absolute belief error (bins as
`collector/store/bins.py` holds them at this revision: 12 bounds, 13
columns each), their sums and their maxima. Counters start at 0 in
existing rows, which counted no answer of this kind; maxima stay unknown.

Adding nullable columns, or columns with a constant default, changes no
existing row on either backend (PostgreSQL 11 and later, SQLite): the
upgrade is quick on a large database. The downgrade drops them (SQLite
3.35 and later drop a column in place), and the figures with them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ANSWER_TABLES = ("routed", "completed")
ANSWER_COLUMNS = ("believed_queue_len", "shortest_queue_len", "reported_queue_len")
COUNTS = tuple(f"{name}_{i}" for name in ("regret", "belief_error") for i in range(13))
SUMS = ("regret_sum", "belief_error_sum", "belief_error_abs_sum")
MAXIMA = ("regret_max", "belief_error_abs_max")


def upgrade() -> None:
    op.add_column("completed", sa.Column("decision_id", sa.LargeBinary(length=16), nullable=True))
    for table in ANSWER_TABLES:
        for name in ANSWER_COLUMNS:
            op.add_column(table, sa.Column(name, sa.Integer(), nullable=True))
    for name in COUNTS:
        op.add_column("rollups", sa.Column(name, sa.Integer(), server_default="0", nullable=False))
    for name in SUMS:
        op.add_column("rollups", sa.Column(name, sa.Float(), server_default="0", nullable=False))
    for name in MAXIMA:
        op.add_column("rollups", sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    for name in (*COUNTS, *SUMS, *MAXIMA):
        op.drop_column("rollups", name)
    for table in ANSWER_TABLES:
        for name in ANSWER_COLUMNS:
            op.drop_column(table, name)
    op.drop_column("completed", "decision_id")
