"""Rollup rows' `start` takes 64 bits on every backend.

`rollups.start` (epoch seconds) was an INTEGER: 64 bits on SQLite but 32 on
PostgreSQL, where every event after 2038-01-19T03:14:07Z failed the rollup
upsert, and the tracer retried that batch forever. The collector accepts
times up to the end of year 9999 (collector/store/times.py); BIGINT holds
them. SQLite stores integers in up to 8 bytes whatever the declared type,
so only PostgreSQL's column changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return  # already 64 bits; batch mode would copy the whole table for nothing
    op.alter_column("rollups", "start", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    # Rows after 2038 do not fit back: the downgrade fails on them rather than lose them.
    op.alter_column("rollups", "start", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
