"""tenancy and keys: versions' owner tenants, tenant defaults, key expiry, one adaptation per task

initializations.tenant_id (null: global), tenant_defaults, promotions.tenant_id, api_keys.expires_at,
and one adaptation in progress per task as a partial unique index on jobs(task_id).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as app.models.ADAPTING.
ADAPTING = "kind = 'adapt' AND state IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('initializations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f('ix_initializations_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_initializations_tenant_id_tenants'), 'tenants', ['tenant_id'], ['id'], ondelete='CASCADE')

    with op.batch_alter_table('promotions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f('ix_promotions_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_promotions_tenant_id_tenants'), 'tenants', ['tenant_id'], ['id'], ondelete='CASCADE')

    op.create_table('tenant_defaults',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('initialization_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['initialization_id'], ['initializations.id'], name=op.f('fk_tenant_defaults_initialization_id_initializations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_defaults_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenant_defaults'))
    )
    with op.batch_alter_table('tenant_defaults', schema=None) as batch_op:
        batch_op.create_index('ix_tenant_defaults_tenant_retired', ['tenant_id', 'retired_at'], unique=False)

    # A trained version that never served everyone belongs to the tenant whose dataset trained
    # it; one that was ever active (or in the audit trail) stays global, as it already served all.
    op.execute(
        "UPDATE initializations SET tenant_id = "
        "(SELECT datasets.tenant_id FROM datasets WHERE datasets.id = initializations.dataset_id) "
        "WHERE source = 'trained' AND dataset_id IS NOT NULL AND NOT is_active "
        "AND promoted_at IS NULL AND version NOT IN (SELECT version FROM promotions)"
    )
    # The check-then-insert this index replaces may have let a task have two adaptations in
    # progress: keep the oldest, cancel the others, so the unique index can be built.
    op.execute(
        "UPDATE jobs SET state = 'cancelled', error_code = 'superseded', "
        "finished_at = CURRENT_TIMESTAMP "
        f"WHERE {ADAPTING} AND task_id IS NOT NULL AND EXISTS (SELECT 1 FROM jobs AS older "
        "WHERE older.task_id = jobs.task_id AND older.kind = 'adapt' "
        "AND older.state IN ('queued', 'running') AND "
        "(older.created_at < jobs.created_at OR "
        "(older.created_at = jobs.created_at AND older.id < jobs.id)))"
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('uq_jobs_task_adapting', ['task_id'], unique=True, postgresql_where=sa.text(ADAPTING), sqlite_where=sa.text(ADAPTING))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_task_adapting', postgresql_where=sa.text(ADAPTING), sqlite_where=sa.text(ADAPTING))
    with op.batch_alter_table('tenant_defaults', schema=None) as batch_op:
        batch_op.drop_index('ix_tenant_defaults_tenant_retired')
    op.drop_table('tenant_defaults')
    # Changes of a tenant's own default would read as global ones without the column.
    op.execute("DELETE FROM promotions WHERE tenant_id IS NOT NULL")
    with op.batch_alter_table('promotions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_promotions_tenant_id_tenants'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_promotions_tenant_id'))
        batch_op.drop_column('tenant_id')
    with op.batch_alter_table('initializations', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_initializations_tenant_id_tenants'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_initializations_tenant_id'))
        batch_op.drop_column('tenant_id')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
