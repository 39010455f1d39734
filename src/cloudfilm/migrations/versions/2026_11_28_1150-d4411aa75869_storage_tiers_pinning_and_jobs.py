"""storage tiers: study pinning and storage jobs

``storage_job`` holds the durable migration and recall jobs that move a study's objects
between tiers (copy, verify, switch the index, delete the source), resumable after a
crash; ``study.pinned`` keeps a study on the online tier.

Revision ID: d4411aa75869
Revises: 4b8d2e6f1a37
Create Date: 2026-11-28 11:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d4411aa75869"
down_revision: str | None = "4b8d2e6f1a37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "storage_job",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source_tier", sa.String(length=32), nullable=False),
        sa.Column("target_tier", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("objects_total", sa.Integer(), nullable=False),
        sa.Column("objects_done", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["study.id"],
            name=op.f("fk_storage_job_study_pk_study"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_job")),
    )
    with op.batch_alter_table("storage_job", schema=None) as batch_op:
        batch_op.create_index(
            "ix_storage_job_state_due", ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_storage_job_study_pk"), ["study_pk"], unique=False)

    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pinned", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("pinned")

    with op.batch_alter_table("storage_job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storage_job_study_pk"))
        batch_op.drop_index("ix_storage_job_state_due")

    op.drop_table("storage_job")
