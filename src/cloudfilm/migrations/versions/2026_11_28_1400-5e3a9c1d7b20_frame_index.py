"""frame index

``instance.frame_index``: where each frame lies in the stored object (JSON, written at
ingest), so that a frame request reads those bytes only. Existing rows stay empty and
are served by parsing the object, as before.

Revision ID: 5e3a9c1d7b20
Revises: 180e618f354f
Create Date: 2026-11-28 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5e3a9c1d7b20"
down_revision: str | None = "180e618f354f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("instance", sa.Column("frame_index", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("frame_index")
