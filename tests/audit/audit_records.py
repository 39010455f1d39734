"""Helpers of the audit tests: append records, verify, look at rows, tamper as the owner."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.audit.verify import ChainReport, Checkpoint, snapshot, verify
from cloudfilm.config import Settings

ACTOR = Actor(ActorType.CLI, "pytest", source="10.1.2.3:50000", role="auditor")
TABLE = AuditEvent.__table__


def append(archive: Archive, count: int, start: int = 0) -> None:
    """``count`` audit records, each in its own transaction, with Chinese text and JSON."""
    for i in range(start, start + count):
        with archive.db.session() as session:
            audit.record(
                session=session,
                actor=ACTOR,
                event_type=AuditEventType.QUERY,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS if i % 3 else AuditOutcome.MINOR_FAILURE,
                object_type="study",
                object_id=f"1.2.840.99.{i}",
                patient_id=f"P{i:04d}",
                study_instance_uid=f"1.2.840.99.{i}",
                message=f"查询患者 {i}",
                detail={"i": i, "姓名": "王小明", "ratio": 0.1 * i, "list": [1, None, "x"]},
            )


def check(archive: Archive, checkpoint: Checkpoint | None = None) -> ChainReport:
    with snapshot(archive.db) as conn:
        return verify(conn, checkpoint=checkpoint)


def rows(archive: Archive) -> list[Any]:
    with archive.db.read_connection() as conn:
        return list(conn.execute(select(TABLE).order_by(TABLE.c.seq)))


def tamper(archive: Archive, statement: str, **params: Any) -> None:
    """Change the table behind the application's back, as the database owner would (on
    SQLite after dropping the triggers that refuse it)."""
    with archive.db.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_event_no_update")
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_event_no_delete")
        conn.execute(text(statement), params)


def sqlite_archive(settings: Settings) -> Archive:
    """An archive on SQLite alone, for the triggers that only SQLite has."""
    archive = Archive(settings)
    migrations.upgrade(archive.db.engine)
    return archive
