"""deletion with a recycle bin: deletion and deleted_instance

Revision ID: 93e45efed5af
Revises: 7c1f0e2b9a44
Create Date: 2026-11-28 11:18:33.864948
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "93e45efed5af"
down_revision: str | None = "7c1f0e2b9a44"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deletion",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion")),
    )
    with op.batch_alter_table("deletion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deletion_due_at"), ["due_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_deletion_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_deletion_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    op.create_table(
        "deleted_instance",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "deletion_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("storage_name", sa.String(length=32), nullable=False),
        sa.Column("storage_key", sa.String(length=200), nullable=False),
        sa.Column("checksum", sa.String(length=80), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["deletion_id"],
            ["deletion.id"],
            name=op.f("fk_deleted_instance_deletion_id_deletion"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deleted_instance")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_deleted_instance_storage_key")),
    )
    with op.batch_alter_table("deleted_instance", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deleted_instance_deletion_id"), ["deletion_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deleted_instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deleted_instance_deletion_id"))

    op.drop_table("deleted_instance")
    with op.batch_alter_table("deletion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deletion_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_deletion_state"))
        batch_op.drop_index(batch_op.f("ix_deletion_due_at"))

    op.drop_table("deletion")
