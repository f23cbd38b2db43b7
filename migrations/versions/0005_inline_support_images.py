"""support_examples.data: small support images stored in their row instead of a file

A support set of small images (Omniglot's are ~1 KB) cost a task five file creations and their
fsyncs before the request could answer; in the row they are committed with it. image_key is
now empty for those rows, and exactly one of the two is set. Existing rows keep their files.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('support_examples', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data', sa.LargeBinary(), nullable=True))
        batch_op.alter_column('image_key', existing_type=sa.String(length=500), nullable=True)
        batch_op.create_check_constraint(
            op.f('ck_support_examples_stored_once'), '(image_key IS NULL) <> (data IS NULL)'
        )


def downgrade() -> None:
    connection = op.get_bind()
    examples = sa.table('support_examples', sa.column('data', sa.LargeBinary()))
    inline = connection.scalar(
        sa.select(sa.func.count()).select_from(examples).where(examples.c.data.is_not(None))
    )
    if inline:
        # The old schema has nowhere to keep them, and a migration has no artifact store.
        raise RuntimeError(
            f'{inline} support images are stored in the database; delete their tasks (or '
            'restore a backup taken before revision 0005) before downgrading'
        )
    with op.batch_alter_table('support_examples', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_support_examples_stored_once'), type_='check')
        batch_op.alter_column('image_key', existing_type=sa.String(length=500), nullable=False)
        batch_op.drop_column('data')
