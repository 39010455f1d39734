"""billing: charges and HIS charge lists

``billing_charge``: one row per cloud-film charge or reversal (one charge per exam and
charge item; a reversal takes a charge back, nothing is deleted), each its own outbox
record for the DFT^P03 / HTTP message to the HIS. ``billing_import`` and
``billing_his_line``: the HIS's charge lists (CSV, XLSX or DFT^P03) for reconciliation.

The built-in role ``finance`` (财务/统计) with ``billing:reconcile`` needs no data
migration: ``seed_builtin_roles`` creates missing built-in roles at every start.

Revision ID: e7a9c3f5b2d4
Revises: d5b1e8c4f7a2
Create Date: 2026-11-28 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e7a9c3f5b2d4"
down_revision: str | None = "d5b1e8c4f7a2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_MONEY = sa.Numeric(12, 2)


def upgrade() -> None:
    op.create_table(
        "billing_charge",
        sa.Column("id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("reverses_id", _ID, nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("person_id", _ID, nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("exam_name", sa.String(length=128), nullable=False),
        sa.Column("item_code", sa.String(length=64), nullable=False),
        sa.Column("item_name", sa.String(length=128), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", _MONEY, nullable=False),
        sa.Column("amount", _MONEY, nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.Column("control_id", sa.String(length=32), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["person_id"],
            ["mpi_person.id"],
            name=op.f("fk_billing_charge_person_id_mpi_person"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["reverses_id"],
            ["billing_charge.id"],
            name=op.f("fk_billing_charge_reverses_id_billing_charge"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_charge")),
        sa.UniqueConstraint("reverses_id", name=op.f("uq_billing_charge_reverses_id")),
        sa.UniqueConstraint(
            "study_instance_uid",
            "item_code",
            "kind",
            "seq",
            name=op.f("uq_billing_charge_study_instance_uid"),
        ),
    )
    op.create_index("ix_billing_charge_due", "billing_charge", ["state", "not_before"])
    op.create_index(
        op.f("ix_billing_charge_accession_number"), "billing_charge", ["accession_number"]
    )
    op.create_index(op.f("ix_billing_charge_event_at"), "billing_charge", ["event_at"])
    op.create_index(op.f("ix_billing_charge_patient_id"), "billing_charge", ["patient_id"])
    op.create_index(op.f("ix_billing_charge_person_id"), "billing_charge", ["person_id"])
    op.create_index(
        op.f("ix_billing_charge_study_instance_uid"), "billing_charge", ["study_instance_uid"]
    )
    op.create_table(
        "billing_import",
        sa.Column("id", _ID, nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("file_format", sa.String(length=8), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("imported_by", sa.String(length=128), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("rejected_count", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_import")),
        sa.UniqueConstraint("sha256", name=op.f("uq_billing_import_sha256")),
    )
    op.create_index(op.f("ix_billing_import_imported_at"), "billing_import", ["imported_at"])
    op.create_table(
        "billing_his_line",
        sa.Column("id", _ID, nullable=False),
        sa.Column("batch_id", _ID, nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("item_code", sa.String(length=64), nullable=False),
        sa.Column("amount", _MONEY, nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("charged_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["billing_import.id"],
            name=op.f("fk_billing_his_line_batch_id_billing_import"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_his_line")),
    )
    for column in ("accession_number", "batch_id", "charged_at", "patient_id"):
        op.create_index(op.f(f"ix_billing_his_line_{column}"), "billing_his_line", [column])


def downgrade() -> None:
    op.drop_table("billing_his_line")
    op.drop_table("billing_import")
    op.drop_table("billing_charge")
