"""The audit table: append-only and hash-chained.

Every row carries ``seq`` (1, 2, 3, ... in commit order), the hash of the row before it and
its own hash over all of its fields (:mod:`cloudfilm.audit.chain`), so that a row changed,
removed or slipped in directly in the database breaks the chain at that row. The
application only inserts: on PostgreSQL its role has no UPDATE or DELETE grant, on SQLite
triggers refuse both (the migration that added the chain creates them; a batch migration
that recreates this table drops them and must create them again)."""

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
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    """Position in the chain: consecutive from 1 in commit order (a purge removes a prefix)."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    """``hash`` of the record at ``seq - 1`` (hex); 64 zeros for the first record ever."""
    hash: Mapped[str] = mapped_column(String(64))
    """Digest of ``prev_hash`` and this record's canonical form (hex)."""
    hash_algorithm: Mapped[str] = mapped_column(String(16))
    """``sm3`` or ``sha256``: how ``hash`` was computed (setting ``audit.hash_algorithm``)."""
