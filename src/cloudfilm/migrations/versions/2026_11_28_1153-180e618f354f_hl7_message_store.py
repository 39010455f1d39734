"""hl7 message store

``hl7_message`` keeps every HL7 v2 message received over MLLP as received (raw bytes),
with its sender, MSH-10, type, encoding and status; a partial unique index on (sending
facility, sending application, MSH-10) among accepted
(AA) originals detects repeats.

Revision ID: 180e618f354f
Revises: d4411aa75869
Create Date: 2026-11-28 11:53:19.537212
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "180e618f354f"
down_revision: str | None = "d4411aa75869"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hl7_message",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("control_id", sa.String(length=199), nullable=True),
        sa.Column("sending_application", sa.String(length=227), nullable=False),
        sa.Column("sending_facility", sa.String(length=227), nullable=False),
        sa.Column("message_type", sa.String(length=16), nullable=True),
        sa.Column("encoding", sa.String(length=16), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "duplicate_of", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["duplicate_of"],
            ["hl7_message.id"],
            name=op.f("fk_hl7_message_duplicate_of_hl7_message"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hl7_message")),
    )
    with op.batch_alter_table("hl7_message", schema=None) as batch_op:
        batch_op.create_index("ix_hl7_message_message_type", ["message_type"], unique=False)
        batch_op.create_index(
            "ix_hl7_message_status_received_at", ["status", "received_at"], unique=False
        )
        batch_op.create_index(
            "uq_hl7_message_sender_control_id",
            ["sending_facility", "sending_application", "control_id"],
            unique=True,
            postgresql_where=sa.text("status <> 'duplicate' AND ack_code = 'AA'"),
            sqlite_where=sa.text("status <> 'duplicate' AND ack_code = 'AA'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("hl7_message", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_hl7_message_sender_control_id",
            postgresql_where=sa.text("status <> 'duplicate' AND ack_code = 'AA'"),
            sqlite_where=sa.text("status <> 'duplicate' AND ack_code = 'AA'"),
        )
        batch_op.drop_index("ix_hl7_message_status_received_at")
        batch_op.drop_index("ix_hl7_message_message_type")

    op.drop_table("hl7_message")
