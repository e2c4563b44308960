"""Initial schema: dimensions, raw events (clustered on UUIDv7 ids), rollups.

Revision ID: 0001
Revises: 
Create Date: 2026-11-25

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('completed',
    sa.Column('id', sa.LargeBinary(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('replica_pk', sa.Integer(), nullable=False),
    sa.Column('internal_request_id', sa.LargeBinary(), nullable=True),
    sa.Column('routed_id', sa.LargeBinary(length=16), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('ok', sa.Boolean(), nullable=True),
    sa.Column('rejected', sa.Boolean(), nullable=False),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_completed')),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('completed', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_completed_routed_id'), ['routed_id'], unique=False)

    op.create_table('decisions',
    sa.Column('id', sa.LargeBinary(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.LargeBinary(), nullable=True),
    sa.Column('internal_request_id', sa.LargeBinary(), nullable=True),
    sa.Column('model_id', sa.String(length=256), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('duration_us', sa.Integer(), nullable=False),
    sa.Column('n_candidates', sa.Integer(), nullable=False),
    sa.Column('ranking', sa.LargeBinary(), nullable=False),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_decisions')),
    sqlite_with_rowid=False
    )
    op.create_table('deployments',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('app', sa.String(length=256), nullable=False),
    sa.Column('deployment', sa.String(length=256), nullable=False),
    sa.Column('membership_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_deployments')),
    sa.UniqueConstraint('app', 'deployment', name=op.f('uq_deployments_app_deployment'))
    )
    op.create_table('memberships',
    sa.Column('id', sa.LargeBinary(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('replicas', sa.Text(), nullable=False),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_memberships')),
    sqlite_with_rowid=False
    )
    op.create_table('rollups',
    sa.Column('grain', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('replica_pk', sa.Integer(), nullable=False),
    sa.Column('decisions', sa.Integer(), server_default='0', nullable=False),
    sa.Column('candidates', sa.Integer(), server_default='0', nullable=False),
    sa.Column('routed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('handoffs', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rejections', sa.Integer(), server_default='0', nullable=False),
    sa.Column('completions', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_stamped', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_observed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_0', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rank_unknown', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_0', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_6', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_7', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_8', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_9', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_10', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_11', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_12', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_13', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_14', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_15', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_16', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_17', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_18', sa.Integer(), server_default='0', nullable=False),
    sa.Column('stale_19', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_0', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_6', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_7', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_8', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_9', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_10', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_11', sa.Integer(), server_default='0', nullable=False),
    sa.Column('choose_us_12', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_0', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_6', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_7', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_8', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_9', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_10', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_11', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_12', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_13', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_14', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_0', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_1', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_2', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_3', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_4', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_5', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts_6', sa.Integer(), server_default='0', nullable=False),
    sa.Column('latency_ms_sum', sa.Float(), server_default='0', nullable=False),
    sa.Column('choose_us_sum', sa.Float(), server_default='0', nullable=False),
    sa.Column('stale_max', sa.Float(), nullable=True),
    sa.Column('latency_ms_max', sa.Float(), nullable=True),
    sa.Column('choose_us_max', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('grain', 'start', 'router_pk', 'replica_pk', name=op.f('pk_rollups')),
    sqlite_with_rowid=False
    )
    op.create_table('routed',
    sa.Column('id', sa.LargeBinary(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('replica_pk', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.LargeBinary(length=16), nullable=True),
    sa.Column('rank', sa.SmallInteger(), nullable=True),
    sa.Column('own_ranking', sa.Boolean(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=True),
    sa.Column('queue_wait_ms', sa.Float(), nullable=True),
    sa.Column('request_id', sa.LargeBinary(), nullable=True),
    sa.Column('internal_request_id', sa.LargeBinary(), nullable=True),
    sa.Column('model_id', sa.String(length=256), nullable=True),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routed')),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('routed', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_routed_decision_id'), ['decision_id'], unique=False)

    op.create_table('stats_changes',
    sa.Column('id', sa.LargeBinary(length=16), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('replica_pk', sa.Integer(), nullable=False),
    sa.Column('stats', sa.Text(), nullable=False),
    sa.Column('collected_at', sa.Float(), nullable=True),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stats_changes')),
    sqlite_with_rowid=False
    )
    op.create_table('replicas',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('deployment_pk', sa.Integer(), nullable=False),
    sa.Column('replica_id', sa.String(length=256), nullable=False),
    sa.Column('node_id', sa.String(length=128), nullable=True),
    sa.Column('availability_zone', sa.String(length=128), nullable=True),
    sa.Column('max_ongoing_requests', sa.Integer(), nullable=True),
    sa.Column('model_ids', sa.Text(), nullable=True),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.Column('added_at', sa.Float(), nullable=True),
    sa.Column('removed_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['deployment_pk'], ['deployments.pk'], name=op.f('fk_replicas_deployment_pk_deployments')),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_replicas')),
    sa.UniqueConstraint('deployment_pk', 'replica_id', name=op.f('uq_replicas_deployment_pk_replica_id'))
    )
    op.create_table('routers',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('deployment_pk', sa.Integer(), nullable=False),
    sa.Column('router_class', sa.String(length=512), nullable=False),
    sa.Column('labels', sa.Text(), nullable=False),
    sa.Column('labels_key', sa.String(length=1024), nullable=False),
    sa.ForeignKeyConstraint(['deployment_pk'], ['deployments.pk'], name=op.f('fk_routers_deployment_pk_deployments')),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_routers')),
    sa.UniqueConstraint('deployment_pk', 'router_class', 'labels_key', name=op.f('uq_routers_deployment_pk_router_class_labels_key'))
    )
    op.create_table('sources',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.String(length=128), nullable=False),
    sa.Column('router_pk', sa.Integer(), nullable=False),
    sa.Column('handle_source', sa.String(length=128), nullable=True),
    sa.Column('node_id', sa.String(length=128), nullable=True),
    sa.Column('actor_id', sa.String(length=128), nullable=True),
    sa.Column('hostname', sa.String(length=256), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('tracer_version', sa.String(length=64), nullable=True),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.Column('produced', sa.BigInteger(), nullable=True),
    sa.Column('dropped', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['router_pk'], ['routers.pk'], name=op.f('fk_sources_router_pk_routers')),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_sources')),
    sa.UniqueConstraint('source_id', name=op.f('uq_sources_source_id'))
    )
    op.create_table('source_batches',
    sa.Column('source_pk', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['source_pk'], ['sources.pk'], name=op.f('fk_source_batches_source_pk_sources')),
    sa.PrimaryKeyConstraint('source_pk', 'seq', name=op.f('pk_source_batches'))
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('source_batches')
    op.drop_table('sources')
    op.drop_table('routers')
    op.drop_table('replicas')
    op.drop_table('stats_changes')
    with op.batch_alter_table('routed', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_routed_decision_id'))

    op.drop_table('routed')
    op.drop_table('rollups')
    op.drop_table('memberships')
    op.drop_table('deployments')
    op.drop_table('decisions')
    with op.batch_alter_table('completed', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_completed_routed_id'))

    op.drop_table('completed')
