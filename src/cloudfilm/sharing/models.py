"""Entry tokens: the unguessable part of the URL in a report's QR code or on a registration
label. The token itself is kept sealed (a reprint shows the same QR code); lookups go by
its SHA-256, so the database index never holds a usable token."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class EntryToken(Base):
    __tablename__ = "entry_token"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_sealed: Mapped[str] = mapped_column(String(200))
    key_id: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(String(16))
    """``report`` (the QR on a report) or ``registration`` (the label and SMS link)."""
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    report_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("report.id", ondelete="CASCADE"), index=True
    )
    order_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("imaging_order.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_checks: Mapped[int] = mapped_column(Integer, default=0)
    """Identity checks failed in a row on this token (reset by a success)."""
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """After too many failed checks, no check is accepted until then."""
