"""The audit table. Rows are only ever inserted; later work adds the hash chain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    """When it happened, UTC, millisecond precision."""
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(1))
    """ATNA EventActionCode: C, R, U, D, E."""
    outcome: Mapped[int] = mapped_column(Integer)
    """ATNA EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure."""
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(128))
    """User name, calling AE title, or the command that acted."""
    actor_role: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(255))
    """Network address (host:port) or file path the request came from."""
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(String(1024))
    """For failures: the reason, as told to the caller."""
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
