"""Replays: the stored results of `routelens replay`.

One row per replay the command made: which router (package.module:Class
and its request_router_kwargs), the mode, its seed and runs, the window
and filters it replayed, and its result (JSON; docs/replay.md). The
collector only serves them (GET /v1/replays): it never runs user code.
Listed newest first, hence the index on created_at. Not pruned with the
raw events.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('replays',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('mode', sa.String(length=32), nullable=False),
    sa.Column('router_class', sa.String(length=512), nullable=False),
    sa.Column('router_kwargs', sa.Text(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('runs', sa.Integer(), nullable=False),
    sa.Column('since', sa.Float(), nullable=False),
    sa.Column('until', sa.Float(), nullable=False),
    sa.Column('filters', sa.Text(), nullable=False),
    sa.Column('result', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_replays'))
    )
    with op.batch_alter_table('replays', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_replays_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('replays', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_replays_created_at'))
    op.drop_table('replays')
