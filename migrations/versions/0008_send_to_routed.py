"""Send to routed: how long after its send a request reached on_request_routed.

Wire format v3 gives a routed event `send_to_routed_ms`, the time from the
request's send (where its latency now starts) to `on_request_routed`: the
replica's answer, and how long the router's loop took to resume the sender
after it. It is stored with the routed event, nullable: rows of v1 and v2
batches, and every row written before this revision, have none, and read
as unknown. The rollups gain what the Rank hits panel and /metrics read of
it, on the router's row, like the choose_replicas time: its histogram (bins
as `collector/store/bins.py` holds them at this revision: 13 bounds, 14
columns), its sum and its maximum. Counters start at 0 in existing rows,
which counted none; the maximum stays unknown.

Like 0006's, these columns (nullable, or with a constant default) are
added without rewriting a row, so the upgrade is quick on a large
database; the downgrade drops them, and the figure with them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FIGURE = "send_to_routed_ms"
COUNTS = tuple(f"{FIGURE}_{i}" for i in range(14))


def upgrade() -> None:
    op.add_column("routed", sa.Column(FIGURE, sa.Float(), nullable=True))
    for name in COUNTS:
        op.add_column("rollups", sa.Column(name, sa.Integer(), server_default="0", nullable=False))
    op.add_column("rollups", sa.Column(f"{FIGURE}_sum", sa.Float(), server_default="0", nullable=False))
    op.add_column("rollups", sa.Column(f"{FIGURE}_max", sa.Float(), nullable=True))


def downgrade() -> None:
    for name in (*COUNTS, f"{FIGURE}_sum", f"{FIGURE}_max"):
        op.drop_column("rollups", name)
    op.drop_column("routed", FIGURE)
