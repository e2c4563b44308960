"""The batches stored, in the order they were stored: what `GET /v1/tail` follows.

A live reader followed what the collector process it reached stored, in that
process's memory: with `--workers N`, or several collectors on one
PostgreSQL, it saw one process's share. Every process now numbers the
batches it stores in one table of the database, which every reader follows
(collector/store/models.py says why not the raw tables' ids).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('stored_batches',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('stored_at', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('decision_ids', sa.LargeBinary(), nullable=False),
    sa.Column('routed_ids', sa.LargeBinary(), nullable=False),
    sa.Column('completed_ids', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_stored_batches')),
    sqlite_autoincrement=True
    )
    op.create_index(op.f('ix_stored_batches_stored_at'), 'stored_batches', ['stored_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_stored_batches_stored_at'), table_name='stored_batches')
    op.drop_table('stored_batches')
