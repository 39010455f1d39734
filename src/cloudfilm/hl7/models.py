"""The HL7 v2 message store: every message as received, with its processing status.

A message is committed here before it is acknowledged (SECURITY-CHECKS H7: AA only after
commit), so a sender's retry after a lost ACK finds it and is answered without processing
it twice: (sending facility, sending application, MSH-10) is unique among the original
messages; repeats are kept as ``duplicate`` rows that point at the original.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class MessageStatus(StrEnum):
    RECEIVED = "received"
    """Stored and acknowledged; no handler has run (none registered for its type yet)."""
    PROCESSED = "processed"
    """A handler ran to completion."""
    FAILED = "failed"
    """Unusable (answered AE) or its handler failed; ``error`` says why. Replayable."""
    DUPLICATE = "duplicate"
    """A repeat of an earlier message (same sender and MSH-10); never processed."""


class HL7Message(Base):
    """One HL7 v2 message received over MLLP."""

    __tablename__ = "hl7_message"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str | None] = mapped_column(String(64))
    """Peer address ``host:port`` of the MLLP connection."""
    # MSH-10 Message Control ID | ST, max 199 (v2.5.1: 20)
    control_id: Mapped[str | None] = mapped_column(String(199))
    # MSH-3 Sending Application | HD (namespace ID; whole field kept)
    sending_application: Mapped[str] = mapped_column(String(227), default="")
    # MSH-4 Sending Facility | HD
    sending_facility: Mapped[str] = mapped_column(String(227), default="")
    # MSH-9 Message Type | MSG: code^trigger, e.g. ADT^A01
    message_type: Mapped[str | None] = mapped_column(String(16))
    encoding: Mapped[str | None] = mapped_column(String(16))
    """The character set the text was decoded with: ``utf-8`` or ``gb18030``."""
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    """The message bytes exactly as received (between the MLLP start and end bytes),
    sealed with AES-256-GCM (:mod:`cloudfilm.hl7.sealing`; read them with
    :func:`cloudfilm.hl7.service.raw_of`). Changed in issue 7 item 1: kept in clear before."""
    status: Mapped[str] = mapped_column(String(16))
    ack_code: Mapped[str] = mapped_column(String(2))
    """What the sender was answered: ``AA``, ``AE`` or ``AR`` (HL7 table 0008)."""
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duplicate_of: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("hl7_message.id", ondelete="SET NULL")
    )
    """For a ``duplicate``: the original message."""

    __table_args__ = (
        # Duplicate detection: one accepted original per sender and MSH-10. Repeats are
        # stored beside it as 'duplicate'; messages answered AE/AR stay outside, so that
        # the sender's corrected resend under the same MSH-10 is taken as new.
        Index(
            "uq_hl7_message_sender_control_id",
            "sending_facility",
            "sending_application",
            "control_id",
            unique=True,
            postgresql_where=text("status <> 'duplicate' AND ack_code = 'AA'"),
            sqlite_where=text("status <> 'duplicate' AND ack_code = 'AA'"),
        ),
        Index("ix_hl7_message_status_received_at", "status", "received_at"),
        Index("ix_hl7_message_message_type", "message_type"),
    )
