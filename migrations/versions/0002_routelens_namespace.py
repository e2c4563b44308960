"""Stored router classes of routelens' example routers take their new module path.

The tracer records each router's class as `module.qualname`. From this
revision on, routelens installs under one namespace, so its example routers'
module `routers.examples` is now `routelens.routers.examples`. The rows keep
one name per router (filters, the router identity and exports see one
value), rather than a mapping applied by every read. Classes of users' own
modules are not touched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Written out here, not imported: a migration must keep meaning what it meant.
EXAMPLE_ROUTERS = ("TracedUniformRequestRouter", "TracedThroughputAwareRequestRouter",
                   "TracedModelAwareRequestRouter", "TracedPowerOfTwoChoicesRequestRouter")
OLD_MODULE = "routers.examples"
NEW_MODULE = "routelens.routers.examples"

routers = sa.table("routers", sa.column("router_class", sa.String))


def _rename(old_module: str, new_module: str) -> None:
    for name in EXAMPLE_ROUTERS:
        op.execute(routers.update()
                   .where(routers.c.router_class == f"{old_module}.{name}")
                   .values(router_class=f"{new_module}.{name}"))


def upgrade() -> None:
    _rename(OLD_MODULE, NEW_MODULE)


def downgrade() -> None:
    _rename(NEW_MODULE, OLD_MODULE)
