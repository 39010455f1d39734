"""background compression

``compression_job``: one row per stored object waiting for its lossless compression
(``compression.deferred``), queued in the transaction that indexed the object; in
``cleanup`` it holds the received object's key until that object is deleted.

Revision ID: 9d2c4f7a1e63
Revises: b71f3c9e2d58
Create Date: 2026-11-28 14:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d2c4f7a1e63"
down_revision: str | None = "b71f3c9e2d58"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "compression_job",
        sa.Column("id", _ID, nullable=False),
        sa.Column("instance_pk", _ID, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("old_key", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compression_job")),
    )
    op.create_index("ix_compression_job_due", "compression_job", ["not_before"])
    op.create_index(op.f("ix_compression_job_instance_pk"), "compression_job", ["instance_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_compression_job_instance_pk"), table_name="compression_job")
    op.drop_index("ix_compression_job_due", table_name="compression_job")
    op.drop_table("compression_job")
