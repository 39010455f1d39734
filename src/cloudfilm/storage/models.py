"""Tables of storage monitoring: usage samples (for growth rates) and alarms.

Alarms are durable rows, not log lines: the administrators' console lists the active
ones, and the notification outbox (a later issue) will pick up the rows it has not sent
yet. At most one alarm per condition (``kind`` + ``subject``) is active at a time; a
partial unique index holds that even with several monitor processes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class StorageSample(Base):
    """One measurement of one backend (at most one per ``monitoring.sample_every_seconds``)."""

    __tablename__ = "storage_sample"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    backend: Mapped[str] = mapped_column(String(32))
    """The storage name (``primary``, later the names of tiers and mirrors)."""
    sampled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Size of the device; empty when the backend cannot tell (object storage)."""
    free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    archive_bytes: Mapped[int] = mapped_column(BigInteger)
    """Sum of the sizes of the index's objects on this backend."""
    instances: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_storage_sample_backend_sampled_at", "backend", "sampled_at"),)


class Alarm(Base):
    """A condition an administrator must know about, from raising to clearing."""

    __tablename__ = "alarm"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    """What is wrong: ``disk_usage``, ``disk_forecast``, ``storage_unreachable``."""
    severity: Mapped[str] = mapped_column(String(16))
    """``warning`` or ``critical``."""
    subject: Mapped[str] = mapped_column(String(64))
    """What it is about: the storage name."""
    message: Mapped[str] = mapped_column(String(512))
    """Chinese · English, for the console and the notification."""
    raised_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cleared_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the condition ended (set by the monitor); empty while active."""
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "uq_alarm_active",
            "kind",
            "subject",
            unique=True,
            sqlite_where=text("cleared_at IS NULL"),
            postgresql_where=text("cleared_at IS NULL"),
        ),
        Index("ix_alarm_raised_at", "raised_at"),
    )


class MirrorPending(Base):
    """A copy still owed to one side of a mirrored storage: written before the bytes are
    acknowledged (asynchronous mirror) or when a read found the copy missing, removed once
    the copier has written and verified it. A crash loses no row, so copying resumes."""

    __tablename__ = "mirror_pending"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    """The storage key of the object."""
    target: Mapped[str] = mapped_column(String(16), primary_key=True)
    """The side that lacks the copy: ``mirror`` or ``primary``."""
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
