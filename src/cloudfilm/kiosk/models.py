"""Tables of the kiosk: one row per confirmed print, one per staff approval of a reprint.

The print count of a report version is the number of its :class:`KioskPrint` rows; an
approval adds one print to what the reprint policy allows for that version.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class KioskPrint(Base):
    """A kiosk confirmed that it printed a report's PDF."""

    __tablename__ = "kiosk_print"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    report_id: Mapped[int] = mapped_column(_ID, ForeignKey("report.id", ondelete="CASCADE"))
    document_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("document.id", ondelete="CASCADE"), index=True
    )
    """The PDF printed (one per report version)."""
    kiosk_client_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("api_client.id", ondelete="SET NULL"), index=True
    )
    kiosk: Mapped[str] = mapped_column(String(64))
    """The kiosk's client id when it printed (kept if the client is removed)."""
    printed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (Index("ix_kiosk_print_report_id_document_id", "report_id", "document_id"),)


class KioskReprintApproval(Base):
    """A staff member allowed one more kiosk print of a report version."""

    __tablename__ = "kiosk_reprint_approval"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    report_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("report.id", ondelete="CASCADE"), index=True
    )
    document_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("document.id", ondelete="CASCADE"), index=True
    )
    approved_by: Mapped[str] = mapped_column(String(128))
    """The user's name (the audit record has the rest)."""
    reason: Mapped[str] = mapped_column(String(200), default="")
    approved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
