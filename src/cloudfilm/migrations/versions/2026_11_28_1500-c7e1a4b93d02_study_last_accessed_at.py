"""study last accessed at

``study.last_accessed_at``: when the study was last retrieved (to within an hour), for the
tier policies' ``not_accessed_days``.

Revision ID: c7e1a4b93d02
Revises: 6e2e99e73fd5
Create Date: 2026-11-28 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c7e1a4b93d02"
down_revision: str | None = "6e2e99e73fd5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch_op:
        batch_op.add_column(
            sa.Column("last_accessed_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("study") as batch_op:
        batch_op.drop_column("last_accessed_at")
