"""Time, injectable: password ages, lockouts and session timeouts are tested by moving it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class MovableClock(Clock):
    """Real time plus an offset that tests advance (``clock.advance(days=91)``)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta | None = None, **parts: float) -> None:
        self.offset += delta if delta is not None else timedelta(**parts)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for ``DateTime(timezone=True)``; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
