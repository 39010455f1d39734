"""Tables of imaging orders, their status history and the visits (encounters) they belong
to. Field references are to HL7 v2.5.1: 4.5.1 ORC, 4.5.3 OBR, 4.5.6 IPC, 3.4.3 PV1."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class OrderStatus(StrEnum):
    """Where an order stands. HL7 ORC-1/ORC-5 (tables 0119, 0038) map onto these."""

    NEW = "new"
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class VisitType(StrEnum):
    """PV1-2 patient class (table 0004) as a Chinese hospital names its visits."""

    OUTPATIENT = "outpatient"
    """门诊 (PV1-2 O)."""
    INPATIENT = "inpatient"
    """住院 (PV1-2 I)."""
    EMERGENCY = "emergency"
    """急诊 (PV1-2 E)."""
    PHYSICAL_EXAM = "physical-exam"
    """体检 (PV1-2 P, or the local code T/H)."""


class Encounter(Base):
    """One visit (门诊/住院/急诊/体检) named by its visit number (PV1-19)."""

    __tablename__ = "encounter"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    # PV1-19 Visit Number | CX.1
    visit_number: Mapped[str] = mapped_column(String(64), unique=True)
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    # PV1-2 Patient Class
    visit_type: Mapped[str] = mapped_column(String(16), default="")
    # PV1-3 Assigned Patient Location | PL: point of care (ward), room, bed
    ward: Mapped[str] = mapped_column(String(64), default="")
    room: Mapped[str] = mapped_column(String(32), default="")
    bed: Mapped[str] = mapped_column(String(32), default="")
    # PV1-10 Hospital Service, else the ward: the department of the visit
    department: Mapped[str] = mapped_column(String(64), default="")
    # PV1-44 Admit Date/Time, PV1-45 Discharge Date/Time
    admitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    discharged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ImagingOrder(Base):
    """One requested imaging procedure (one OBR of an ORM/OMI, one ServiceRequest).

    It belongs to an archive study by accession number, or by Study Instance UID when
    the sender gives it (OMI IPC-3): the link is a join (:func:`cloudfilm.orders.service.
    study_link`), so it holds whichever of order and study arrives first."""

    __tablename__ = "imaging_order"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    # ORC-2 / OBR-2 Placer Order Number | EI.1 (the HIS's number)
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")
    # ORC-3 / OBR-3 Filler Order Number | EI.1 (the RIS's number)
    filler_order_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    # OBR-18 Placer Field 1 (ORM, by RIS convention) or IPC-1 Accession Identifier (OMI)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    # IPC-3 Study Instance UID
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    # OBR-4 Universal Service Identifier | CWE: code, text, coding system
    procedure_code: Mapped[str] = mapped_column(String(64), default="", index=True)
    procedure_text: Mapped[str] = mapped_column(String(200), default="")
    procedure_system: Mapped[str] = mapped_column(String(64), default="")
    # OBR-24 Diagnostic Serv Sect ID, else IPC-5 Modality
    modality: Mapped[str] = mapped_column(String(16), default="")
    # ORC-17 Entering Organization, else PV1-10 Hospital Service: the requesting service
    department: Mapped[str] = mapped_column(String(64), default="", index=True)
    # PV1-3 Assigned Patient Location: ward, room, bed
    ward: Mapped[str] = mapped_column(String(64), default="", index=True)
    room: Mapped[str] = mapped_column(String(32), default="")
    bed: Mapped[str] = mapped_column(String(32), default="")
    # PV1-2 Patient Class (:class:`VisitType`)
    visit_type: Mapped[str] = mapped_column(String(16), default="")
    # PV1-19 Visit Number
    visit_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    encounter_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("encounter.id", ondelete="SET NULL"), index=True
    )
    # ORC-12 Ordering Provider, else OBR-16 | XCN: name as written
    requesting_doctor: Mapped[str] = mapped_column(String(200), default="", index=True)
    # OBR-36 Scheduled Date/Time, else TQ1-7 Start Date/Time
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # ORC-9 Date/Time of Transaction: when the order was placed
    authored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    """:class:`OrderStatus`."""
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    """The MPI person of PID-3."""
    # PID-3 first identifier (CX.1, CX.4): what the sender called the patient
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_authority: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(128), default="")
    """Where the last change came from: ``hl7:#<message id>`` or ``fhir:<actor>``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (
        # One order per placer number: a repeated NW updates it.
        Index(
            "uq_imaging_order_placer_order_number",
            "placer_order_number",
            unique=True,
            postgresql_where=text("placer_order_number <> ''"),
            sqlite_where=text("placer_order_number <> ''"),
        ),
    )


class OrderStatusChange(Base):
    """The history of an order: every status it went through and what changed it."""

    __tablename__ = "imaging_order_history"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    order_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("imaging_order.id", ondelete="CASCADE"), index=True
    )
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_from: Mapped[str | None] = mapped_column(String(16))
    status_to: Mapped[str] = mapped_column(String(16))
    # ORC-1 Order Control (NW, CA, XO, SC) or the FHIR interaction (create, update)
    control: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(128), default="")
