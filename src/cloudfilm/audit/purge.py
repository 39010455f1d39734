"""Remove audit records past retention without breaking the chain (G4).

A purge removes a prefix of the chain: the records up to the first one that is still
within retention. Before it deletes anything it

1. verifies the whole chain: a broken chain is evidence, and deleting part of it would
   destroy that evidence;
2. writes the records it will remove to a JSON Lines file and flushes it to disk. Each
   line holds the hashed fields (as hashed), ``id``, ``prev_hash`` and ``hash``, so the
   archived records stay verifiable on their own.

Then, in one write transaction, it deletes them and appends an ``audit-purged`` record
whose ``detail`` names the last removed record's ``seq`` and ``hash``: the anchor from
which :func:`cloudfilm.audit.verify.verify` accepts the chain's new start.

On PostgreSQL only the schema owner may delete audit records (the application's role
may insert and select): run the purge with the owner's credentials. On SQLite the
trigger that refuses deletes is dropped and created again inside the same transaction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Table, delete, func, select

from cloudfilm.audit.chain import HASHED_FIELDS, timestamp
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor, record
from cloudfilm.audit.verify import (
    PURGED_THROUGH_HASH,
    PURGED_THROUGH_SEQ,
    iter_chain,
    snapshot,
    verify,
)
from cloudfilm.config import MIN_AUDIT_RETENTION_DAYS
from cloudfilm.db import Database
from cloudfilm.errors import Conflict

_TABLE = cast(Table, AuditEvent.__table__)

#: The SQLite triggers that make ``audit_event`` append-only, exactly as the migration
#: that introduced the chain creates them.
NO_UPDATE_TRIGGER = (
    "CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event\n"
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: UPDATE refused'); END"
)
NO_DELETE_TRIGGER = (
    "CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event\n"
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: DELETE refused'); END"
)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    cutoff: datetime
    """Records older than this were due."""
    purged: int
    through_seq: int | None
    """The last record removed (``None`` when nothing was due)."""
    archive: Path | None
    """Where the removed records were written (``None`` when nothing was due)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    first_seq: int
    through_seq: int
    through_hash: str

    @property
    def count(self) -> int:
        return self.through_seq - self.first_seq + 1


def purge(
    db: Database, *, actor: Actor, retention_days: int, now: datetime, archive_to: Path
) -> PurgeResult:
    """Remove the records older than ``retention_days`` before ``now``, after writing them
    to ``archive_to`` (a new file), and record the purge.

    Raises
    ------
    ValueError
        For a retention below the legal floor of 180 days.
    Conflict
        When the chain is broken (nothing is deleted), when ``archive_to`` exists, or when
        the records changed between the check and the delete.
    """
    if retention_days < MIN_AUDIT_RETENTION_DAYS:
        raise ValueError(
            f"audit records are kept at least {MIN_AUDIT_RETENTION_DAYS} days; "
            f"refusing to purge with retention_days={retention_days}"
        )
    cutoff = now.astimezone(UTC) - timedelta(days=retention_days)
    with snapshot(db) as conn:
        report = verify(conn)
        if report.broken is not None:
            raise Conflict(
                f"the audit chain is broken at seq {report.broken.seq} "
                f"({report.broken.message}); nothing was purged: a purge would destroy "
                "the evidence. Investigate first (cloudfilm audit verify)."
            )
        plan = _plan(conn, cutoff)
        if plan is not None:
            _write_archive(conn, plan, archive_to)
    with db.session() as session:
        conn = session.connection()
        detail: dict[str, Any] = {
            "retention_days": retention_days,
            "cutoff": timestamp(cutoff),
            "purged": 0,
        }
        if plan is not None:
            _check_unchanged(conn, plan)
            detail.update(
                purged=plan.count,
                purged_from_seq=plan.first_seq,
                archive=str(archive_to),
                **{PURGED_THROUGH_SEQ: plan.through_seq, PURGED_THROUGH_HASH: plan.through_hash},
            )
        # The anchor goes in before the delete: when every record is due, it must still
        # find the last one to link to.
        record(
            session=session,
            actor=actor,
            event_type=AuditEventType.AUDIT_PURGED,
            action=AuditAction.DELETE,
            object_type="audit",
            message=f"{detail['purged']} audit record(s) older than {detail['cutoff']} purged",
            detail=detail,
        )
        if plan is not None:
            _delete(conn, plan)
    return PurgeResult(
        cutoff,
        plan.count if plan else 0,
        plan.through_seq if plan else None,
        archive_to if plan else None,
    )


def _plan(conn: Connection, cutoff: datetime) -> _Plan | None:
    """The prefix that is due: up to the record before the first one newer than ``cutoff``
    (a record within retention keeps every record after it, whatever their clocks say)."""
    keep_from = conn.scalar(select(func.min(_TABLE.c.seq)).where(_TABLE.c.occurred_at >= cutoff))
    first, last = conn.execute(select(func.min(_TABLE.c.seq), func.max(_TABLE.c.seq))).one()
    if first is None:
        return None
    through = keep_from - 1 if keep_from is not None else last
    if through < first:
        return None
    through_hash = conn.scalar(select(_TABLE.c.hash).where(_TABLE.c.seq == through))
    return _Plan(first, through, str(through_hash))


def _write_archive(conn: Connection, plan: _Plan, path: Path) -> None:
    try:
        out = path.open("xb")
    except FileExistsError as exc:
        raise Conflict(f"{path} exists; name a new file for the purged records") from exc
    with out:
        for row in iter_chain(conn, through_seq=plan.through_seq):
            out.write(_archive_line(row._asdict()))
        out.flush()
        os.fsync(out.fileno())
    _fsync_directory(path.parent)


def _archive_line(row: dict[str, Any]) -> bytes:
    line = {name: row[name] for name in (*HASHED_FIELDS, "id", "prev_hash", "hash")}
    line["occurred_at"] = timestamp(row["occurred_at"])
    return json.dumps(line, sort_keys=True, ensure_ascii=True).encode("ascii") + b"\n"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_unchanged(conn: Connection, plan: _Plan) -> None:
    """The prefix must still end with the record that was verified and archived."""
    current = conn.scalar(select(_TABLE.c.hash).where(_TABLE.c.seq == plan.through_seq))
    if current != plan.through_hash:
        raise Conflict(
            f"audit record seq {plan.through_seq} changed during the purge; nothing was purged"
        )


def _delete(conn: Connection, plan: _Plan) -> None:
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_event_no_delete")
    conn.execute(delete(_TABLE).where(_TABLE.c.seq <= plan.through_seq))
    if sqlite:
        conn.exec_driver_sql(NO_DELETE_TRIGGER)
