"""storage monitoring: usage samples and alarms

``storage_sample`` holds periodic measurements of each backend (for growth rates and the
days-until-full projection); ``alarm`` holds monitoring alarms from raising to clearing,
with at most one active alarm per kind and subject (partial unique index).

Revision ID: 5dfe2f63ebcd
Revises: 1132a829ba0a
Create Date: 2026-11-28 10:53:29.911123
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5dfe2f63ebcd"
down_revision: str | None = "1132a829ba0a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE = sa.text("cleared_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "alarm",
        sa.Column("id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("message", sa.String(length=512), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alarm")),
    )
    with op.batch_alter_table("alarm", schema=None) as batch_op:
        batch_op.create_index("ix_alarm_raised_at", ["raised_at"], unique=False)
        batch_op.create_index(
            "uq_alarm_active",
            ["kind", "subject"],
            unique=True,
            sqlite_where=_ACTIVE,
            postgresql_where=_ACTIVE,
        )

    op.create_table(
        "storage_sample",
        sa.Column("id", _ID, nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=True),
        sa.Column("free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("archive_bytes", sa.BigInteger(), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_sample")),
    )
    with op.batch_alter_table("storage_sample", schema=None) as batch_op:
        batch_op.create_index(
            "ix_storage_sample_backend_sampled_at", ["backend", "sampled_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("storage_sample", schema=None) as batch_op:
        batch_op.drop_index("ix_storage_sample_backend_sampled_at")
    op.drop_table("storage_sample")
    with op.batch_alter_table("alarm", schema=None) as batch_op:
        batch_op.drop_index("uq_alarm_active", sqlite_where=_ACTIVE, postgresql_where=_ACTIVE)
        batch_op.drop_index("ix_alarm_raised_at")
    op.drop_table("alarm")
