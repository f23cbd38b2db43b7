"""tasks.unknown_threshold: a task's own "unknown" threshold as a column of the task

It was kept in the params of the task's first adapt job, which cost every prediction a query
for that job; existing values are copied over.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unknown_threshold', sa.Float(), nullable=True))
    # Portable across SQLite and PostgreSQL: JSON read in Python, one UPDATE per task that had one.
    connection = op.get_bind()
    jobs = sa.table(
        'jobs',
        sa.column('task_id', sa.Uuid()),
        sa.column('kind', sa.String()),
        sa.column('params', sa.JSON()),
        sa.column('created_at', sa.DateTime(timezone=True)),
        sa.column('id', sa.Uuid()),
    )
    tasks = sa.table('tasks', sa.column('id', sa.Uuid()), sa.column('unknown_threshold', sa.Float()))
    first: dict[object, float] = {}
    rows = connection.execute(
        sa.select(jobs.c.task_id, jobs.c.params)
        .where(jobs.c.kind == 'adapt', jobs.c.task_id.is_not(None))
        .order_by(jobs.c.created_at, jobs.c.id)
    )
    seen: set[object] = set()
    for task_id, params in rows:
        if task_id in seen:
            continue
        seen.add(task_id)
        value = (params or {}).get('unknown_threshold') if isinstance(params, dict) else None
        if isinstance(value, int | float):
            first[task_id] = float(value)
    for task_id, value in first.items():
        connection.execute(
            sa.update(tasks).where(tasks.c.id == task_id).values(unknown_threshold=value)
        )


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('unknown_threshold')
