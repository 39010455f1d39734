"""mirrored storage and scrub: the copy journal, per-instance verification

``mirror_pending`` holds the copies owed to one side of a mirrored storage (asynchronous
mirror writes, repairs after a fallback read), so copying resumes after a crash.
``instance.verified_at`` is when the scrub last found the stored bytes matching their
checksum (the scrub takes the least recently verified first); ``instance.integrity_error``
says why no good copy was found at the last check (empty while the object is sound).

Revision ID: 4b8d2e6f1a37
Revises: 93e45efed5af
Create Date: 2026-11-28 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4b8d2e6f1a37"
down_revision: str | None = "93e45efed5af"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mirror_pending",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.PrimaryKeyConstraint("key", "target", name=op.f("pk_mirror_pending")),
    )
    with op.batch_alter_table("mirror_pending", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_mirror_pending_next_attempt_at"), ["next_attempt_at"], unique=False
        )
    op.add_column("instance", sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("instance", sa.Column("integrity_error", sa.String(length=256), nullable=True))
    op.create_index(op.f("ix_instance_verified_at"), "instance", ["verified_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_verified_at"), table_name="instance")
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("integrity_error")
        batch.drop_column("verified_at")
    with op.batch_alter_table("mirror_pending", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mirror_pending_next_attempt_at"))
    op.drop_table("mirror_pending")
