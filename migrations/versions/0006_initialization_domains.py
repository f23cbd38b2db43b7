"""initializations.domain: initializations are domains; one active version per domain

Each version records what it knows ("handwritten characters", "photos"), read from its config;
the unique active index becomes one active version per domain, so the photo and the Omniglot
initializations are served side by side and each is promoted and rolled back on its own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_DOMAIN = 'handwritten characters'


def upgrade() -> None:
    with op.batch_alter_table('initializations', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('domain', sa.String(64), nullable=False, server_default=DEFAULT_DOMAIN)
        )
    connection = op.get_bind()
    table = sa.table(
        'initializations',
        sa.column('id', sa.Uuid()),
        sa.column('config', sa.JSON()),
        sa.column('domain', sa.String()),
    )
    for row_id, config in connection.execute(sa.select(table.c.id, table.c.config)):
        domain = (config or {}).get('domain') if isinstance(config, dict) else None
        if isinstance(domain, str) and domain and domain != DEFAULT_DOMAIN:
            connection.execute(
                sa.update(table).where(table.c.id == row_id).values(domain=domain[:64])
            )
    op.drop_index('uq_initializations_active', table_name='initializations')
    op.create_index(
        'uq_initializations_active',
        'initializations',
        ['domain'],
        unique=True,
        postgresql_where=sa.text('is_active'),
        sqlite_where=sa.text('is_active'),
    )


def downgrade() -> None:
    connection = op.get_bind()
    active = connection.execute(
        sa.text('SELECT count(*) FROM initializations WHERE is_active')
    ).scalar_one()
    if active > 1:
        raise RuntimeError(
            f'{active} domains have an active initialization; the schema before 0006 allows one. '
            'Deactivate all but one (or delete the other domains\' versions) first.'
        )
    op.drop_index('uq_initializations_active', table_name='initializations')
    op.create_index(
        'uq_initializations_active',
        'initializations',
        ['is_active'],
        unique=True,
        postgresql_where=sa.text('is_active'),
        sqlite_where=sa.text('is_active'),
    )
    with op.batch_alter_table('initializations', schema=None) as batch_op:
        batch_op.drop_column('domain')
