"""imaging orders and encounters

``imaging_order``: one requested imaging procedure (HL7 ORM^O01 / OMI^O23, FHIR
ServiceRequest) with its placer, filler and accession numbers, the visit's ward, room and
bed, and the MPI person; ``imaging_order_history``: its status changes; ``encounter``:
the visits (PV1-19 visit number) of ADT and order messages.

Revision ID: 6e2e99e73fd5
Revises: 9d2c4f7a1e63
Create Date: 2026-11-28 13:50:38
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6e2e99e73fd5"
down_revision: str | None = "9d2c4f7a1e63"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "encounter",
        sa.Column("id", _ID, nullable=False),
        sa.Column("visit_number", sa.String(length=64), nullable=False),
        sa.Column("person_id", _ID, nullable=True),
        sa.Column("visit_type", sa.String(length=16), nullable=False),
        sa.Column("ward", sa.String(length=64), nullable=False),
        sa.Column("room", sa.String(length=32), nullable=False),
        sa.Column("bed", sa.String(length=32), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("discharged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["person_id"],
            ["mpi_person.id"],
            name=op.f("fk_encounter_person_id_mpi_person"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_encounter")),
        sa.UniqueConstraint("visit_number", name=op.f("uq_encounter_visit_number")),
    )
    with op.batch_alter_table("encounter", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_encounter_admitted_at"), ["admitted_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_encounter_person_id"), ["person_id"], unique=False)

    op.create_table(
        "imaging_order",
        sa.Column("id", _ID, nullable=False),
        sa.Column("placer_order_number", sa.String(length=64), nullable=False),
        sa.Column("filler_order_number", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("procedure_code", sa.String(length=64), nullable=False),
        sa.Column("procedure_text", sa.String(length=200), nullable=False),
        sa.Column("procedure_system", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("ward", sa.String(length=64), nullable=False),
        sa.Column("room", sa.String(length=32), nullable=False),
        sa.Column("bed", sa.String(length=32), nullable=False),
        sa.Column("visit_type", sa.String(length=16), nullable=False),
        sa.Column("visit_number", sa.String(length=64), nullable=False),
        sa.Column("encounter_id", _ID, nullable=True),
        sa.Column("requesting_doctor", sa.String(length=200), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("authored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("person_id", _ID, nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_authority", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["encounter_id"],
            ["encounter.id"],
            name=op.f("fk_imaging_order_encounter_id_encounter"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["person_id"],
            ["mpi_person.id"],
            name=op.f("fk_imaging_order_person_id_mpi_person"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_order")),
    )
    with op.batch_alter_table("imaging_order", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_order_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_authored_at"), ["authored_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_department"), ["department"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_encounter_id"), ["encounter_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_filler_order_number"),
            ["filler_order_number"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_patient_id"), ["patient_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_imaging_order_person_id"), ["person_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_imaging_order_procedure_code"), ["procedure_code"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_requesting_doctor"), ["requesting_doctor"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_imaging_order_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_imaging_order_study_instance_uid"), ["study_instance_uid"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_updated_at"), ["updated_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_visit_number"), ["visit_number"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_imaging_order_ward"), ["ward"], unique=False)
        batch_op.create_index(
            "uq_imaging_order_placer_order_number",
            ["placer_order_number"],
            unique=True,
            postgresql_where=sa.text("placer_order_number <> ''"),
            sqlite_where=sa.text("placer_order_number <> ''"),
        )

    op.create_table(
        "imaging_order_history",
        sa.Column("id", _ID, nullable=False),
        sa.Column("order_id", _ID, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_from", sa.String(length=16), nullable=True),
        sa.Column("status_to", sa.String(length=16), nullable=False),
        sa.Column("control", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["imaging_order.id"],
            name=op.f("fk_imaging_order_history_order_id_imaging_order"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_order_history")),
    )
    with op.batch_alter_table("imaging_order_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_order_history_order_id"), ["order_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("imaging_order_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_imaging_order_history_order_id"))

    op.drop_table("imaging_order_history")
    with op.batch_alter_table("imaging_order", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_imaging_order_placer_order_number",
            postgresql_where=sa.text("placer_order_number <> ''"),
            sqlite_where=sa.text("placer_order_number <> ''"),
        )
        batch_op.drop_index(batch_op.f("ix_imaging_order_ward"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_visit_number"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_updated_at"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_status"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_requesting_doctor"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_procedure_code"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_person_id"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_patient_id"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_filler_order_number"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_encounter_id"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_department"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_authored_at"))
        batch_op.drop_index(batch_op.f("ix_imaging_order_accession_number"))

    op.drop_table("imaging_order")
    with op.batch_alter_table("encounter", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_encounter_person_id"))
        batch_op.drop_index(batch_op.f("ix_encounter_admitted_at"))

    op.drop_table("encounter")
