"""Search the audit trail: the filters an auditor asks by, newest first, paged."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Row, Select, Table, select

from cloudfilm.audit.chain import HASHED_FIELDS, timestamp
from cloudfilm.audit.models import AuditEvent
from cloudfilm.errors import NotFound

_TABLE = cast(Table, AuditEvent.__table__)
_BATCH = 1000

#: Every column, in the order the JSON and CSV forms list them.
COLUMNS = ("id", *HASHED_FIELDS[:-1], "prev_hash", "hash", "hash_algorithm")


#: Filters that match a column exactly.
_EXACT = (
    "actor_id",
    "actor_type",
    "event_type",
    "outcome",
    "patient_id",
    "study_instance_uid",
    "request_id",
)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What to look for; every given filter must match. Times without an offset are UTC."""

    since: datetime | None = None
    """From this time on (inclusive)."""
    until: datetime | None = None
    """Before this time (exclusive)."""
    actor_id: str | None = None
    actor_type: str | None = None
    event_type: str | None = None
    outcome: int | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    source: str | None = None
    """An address, or its start: ``10.1.2.3`` matches every port of that host."""
    request_id: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        table = _TABLE.c
        found: list[ColumnElement[bool]] = []
        if self.since is not None:
            found.append(table.occurred_at >= _utc(self.since))
        if self.until is not None:
            found.append(table.occurred_at < _utc(self.until))
        if self.source:
            found.append(table.source.startswith(self.source, autoescape=True))
        for name in _EXACT:
            value = getattr(self, name)
            if value is not None and value != "":
                found.append(table[name] == value)
        return found


@dataclass(frozen=True, slots=True)
class Page:
    events: list[Row[Any]]
    next_offset: int | None
    """Offset of the next page, ``None`` on the last one."""


def search(conn: Connection, query: AuditQuery, *, limit: int, offset: int = 0) -> Page:
    """Matching records, newest first; ``limit`` is the caller's cap already applied."""
    statement = _select(query).order_by(_TABLE.c.seq.desc()).limit(limit + 1).offset(offset)
    rows = list(conn.execute(statement))
    more = len(rows) > limit
    return Page(rows[:limit], offset + limit if more else None)


def iter_matching(conn: Connection, query: AuditQuery) -> Iterator[Row[Any]]:
    """Every matching record, oldest first, in batches: for exports of any length."""
    after: int | None = None
    while True:
        statement = _select(query).order_by(_TABLE.c.seq).limit(_BATCH)
        if after is not None:
            statement = statement.where(_TABLE.c.seq > after)
        rows = conn.execute(statement).all()
        yield from rows
        if len(rows) < _BATCH:
            return
        after = rows[-1].seq


def get_event(conn: Connection, event_id: int) -> Row[Any]:
    row = conn.execute(select(_TABLE).where(_TABLE.c.id == event_id)).one_or_none()
    if row is None:
        raise NotFound(f"没有此审计记录 · no audit record {event_id}")
    return row


def as_json(row: Row[Any]) -> dict[str, Any]:
    """One record as the API shows it: every column, the time as UTC with milliseconds."""
    document = {name: getattr(row, name) for name in COLUMNS}
    document["occurred_at"] = iso_ms(row.occurred_at)
    return document


def iso_ms(value: datetime) -> str:
    """``2026-11-28T10:24:06.123Z``: the precision a record promises."""
    return timestamp(value)[:23] + "Z"


def _select(query: AuditQuery) -> Select[Any]:
    return select(_TABLE).where(*query.conditions())


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
