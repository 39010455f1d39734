"""Tables of billing: the charges the archive made (each its own outbox record for the
message to the HIS) and the charge lists imported from the HIS.

HL7 references are to v2.5.1 6.5.1 FT1 (DFT^P03)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")
_MONEY = Numeric(12, 2, asdecimal=True)


class ChargeKind(StrEnum):
    CHARGE = "charge"
    """One cloud film delivered: quantity 1."""
    REVERSAL = "reversal"
    """A charge taken back (the report was withdrawn): quantity -1, never a delete."""


class ChargeState(StrEnum):
    """Where the charge's message to the HIS stands (``billing.delivery``)."""

    LOCAL = "local"
    """Recorded only: ``billing.delivery = none``."""
    PENDING = "pending"
    """Waiting to be sent (due at ``not_before``)."""
    SENT = "sent"
    """Handed to the HIS, its answer not yet in (a crash here sends it again)."""
    ACKNOWLEDGED = "acknowledged"
    """The HIS accepted it (ACK AA, HTTP 2xx)."""
    FAILED = "failed"
    """The HIS refused it (ACK AE/AR, HTTP 4xx): ``last_error`` says why."""
    GIVEN_UP = "given-up"
    """No answer after ``billing.max_attempts`` attempts."""
    SKIPPED = "skipped"
    """A reversal of a charge the HIS never accepted: nothing to take back there."""


class Charge(Base):
    """One charge (or reversal) of a cloud film for one exam and charge item."""

    __tablename__ = "billing_charge"
    __table_args__ = (
        # One charge per exam and item (and one reversal of it); ``seq`` counts the
        # charges of an exam whose earlier charges were all reversed (report reissued).
        UniqueConstraint("study_instance_uid", "item_code", "kind", "seq"),
        Index("ix_billing_charge_due", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer, default=1)
    reverses_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("billing_charge.id", ondelete="RESTRICT"), unique=True
    )
    # (0020,000D) Study Instance UID | VR UI
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    # (0008,0050) Accession Number | VR SH
    accession_number: Mapped[str] = mapped_column(String(64), index=True)
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    # (0010,0020) Patient ID | VR LO
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    department: Mapped[str] = mapped_column(String(64), default="")
    # (0008,0060) Modality | VR CS
    modality: Mapped[str] = mapped_column(String(16), default="")
    exam_name: Mapped[str] = mapped_column(String(128), default="")
    # FT1-7 Transaction Code (收费项目编码, 名称)
    item_code: Mapped[str] = mapped_column(String(64))
    item_name: Mapped[str] = mapped_column(String(128))
    # FT1-10 Transaction Quantity: 1, or -1 for a reversal
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[Decimal] = mapped_column(_MONEY)
    # FT1-11 Transaction Amount - Extended: quantity × unit price
    amount: Mapped[Decimal] = mapped_column(_MONEY)
    currency: Mapped[str] = mapped_column(String(3))
    event: Mapped[str] = mapped_column(String(16))
    """``released``, ``first-view`` or ``withdrawn``."""
    event_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The outbox: the message to the HIS.
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(512))
    control_id: Mapped[str] = mapped_column(String(32))
    """MSH-10 of its DFT (the same on every attempt: the HIS can drop a repeat)."""
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportBatch(Base):
    """One charge list taken in from the HIS (a CSV/XLSX file or a DFT^P03 message)."""

    __tablename__ = "billing_import"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    file_name: Mapped[str] = mapped_column(String(255))
    file_format: Mapped[str] = mapped_column(String(8))
    """``csv``, ``xlsx`` or ``hl7``."""
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    """Of the file's bytes: the same list is never counted twice."""
    imported_by: Mapped[str] = mapped_column(String(128))
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    line_count: Mapped[int] = mapped_column(Integer)
    rejected_count: Mapped[int] = mapped_column(Integer)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    """The rejected lines: ``[{"line": 7, "message": "中文 · English"}]`` (first 1000)."""


class HisChargeLine(Base):
    """One line of a HIS charge list."""

    __tablename__ = "billing_his_line"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    batch_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("billing_import.id", ondelete="CASCADE"), index=True
    )
    line_no: Mapped[int] = mapped_column(Integer)
    accession_number: Mapped[str] = mapped_column(String(64), index=True)
    """The exam's accession (or order) number; empty when the HIS gives none."""
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    item_code: Mapped[str] = mapped_column(String(64))
    amount: Mapped[Decimal] = mapped_column(_MONEY)
    department: Mapped[str] = mapped_column(String(64), default="")
    charged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
