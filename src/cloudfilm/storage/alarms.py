"""Raising and clearing alarms outside the capacity monitor (mirroring, scrub, orphans).

The same ``alarm`` table and the same rule as :mod:`cloudfilm.storage.monitor`: at most
one active alarm per ``kind`` + ``subject`` (a partial unique index), each raise and clear
audited. Subjects here are never a storage name (``primary``): the capacity monitor clears
every alarm on its own subjects that it did not raise itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import cast

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.db import Database
from cloudfilm.storage.models import Alarm
from cloudfilm.storage.monitor import Severity

logger = logging.getLogger(__name__)

_SYSTEM = Actor.system("storage-integrity")


class IntegrityAlarm(StrEnum):
    COPY_DAMAGED = "copy_damaged"
    """Objects were missing or corrupt on one copy (subject ``copy:primary`` or
    ``copy:mirror``); reads were served from the other copy and a repair was queued.
    Cleared when no repair of that copy is left pending."""
    MIRROR_BEHIND = "mirror_behind"
    """Copies to one side keep failing (mirror down, credentials refused); cleared when
    the copier's queue for that side is empty again."""
    OBJECT_DAMAGED = "object_damaged"
    """Indexed objects with no good copy anywhere (subject ``integrity``): critical; a
    human restores them from a backup. Cleared when a check finds them sound again."""


def copy_subject(side: str) -> str:
    return f"copy:{side}"


INTEGRITY_SUBJECT = "integrity"


def raise_alarm(
    db: Database, kind: IntegrityAlarm, severity: Severity, subject: str, message: str
) -> bool:
    """Raise the alarm unless the same condition is active already; True when raised."""
    now = datetime.now(UTC)
    with db.session() as session:
        active = session.scalar(
            select(Alarm.id).where(
                Alarm.kind == kind.value, Alarm.subject == subject, Alarm.cleared_at.is_(None)
            )
        )
        if active is not None:
            return False
        alarm = Alarm(
            kind=kind.value,
            severity=severity.value,
            subject=subject,
            message=message[:512],
            raised_at=now,
        )
        try:
            with session.begin_nested():
                session.add(alarm)
                session.flush()
        except IntegrityError:
            return False  # another process raised it first: once per condition
        _audit_alarm(session, alarm, raised=True)
        _run_hooks(db, session, alarm)
    log = logger.error if severity is Severity.CRITICAL else logger.warning
    log("alarm raised: %s", message)
    return True


#: Key of ``Database.info`` holding the callables run for each alarm raised here, in the
#: transaction that records it (the archive puts its monitor's ``on_raised`` list there:
#: the notification outbox queues the administrators' messages).
ALARM_HOOKS = "alarm_hooks"


def _run_hooks(db: Database, session: Session, alarm: Alarm) -> None:
    hooks = cast("list[Callable[[Session, Alarm], object]]", db.info.get(ALARM_HOOKS) or [])
    for hook in list(hooks):
        try:
            with session.begin_nested():
                hook(session, alarm)
        except Exception:
            # The alarm stands even when its notification cannot be queued.
            logger.exception("alarm hook failed")


def clear_alarm(db: Database, kind: IntegrityAlarm, subject: str) -> bool:
    """Clear the active alarm of this condition, if any; True when one was cleared."""
    with db.session() as session:
        alarm = session.scalars(
            select(Alarm).where(
                Alarm.kind == kind.value, Alarm.subject == subject, Alarm.cleared_at.is_(None)
            )
        ).first()
        if alarm is None:
            return False
        alarm.cleared_at = datetime.now(UTC)
        session.flush()
        _audit_alarm(session, alarm, raised=False)
    logger.info("alarm cleared: %s %s", kind.value, subject)
    return True


def _audit_alarm(session: Session, alarm: Alarm, *, raised: bool) -> None:
    outcome = AuditOutcome.SUCCESS
    if raised:
        outcome = (
            AuditOutcome.SERIOUS_FAILURE
            if alarm.severity == Severity.CRITICAL
            else AuditOutcome.MINOR_FAILURE
        )
    audit.record(
        session=session,
        actor=_SYSTEM,
        event_type=AuditEventType.ALARM_RAISED if raised else AuditEventType.ALARM_CLEARED,
        action=AuditAction.EXECUTE,
        outcome=outcome,
        object_type="alarm",
        object_id=str(alarm.id),
        message=alarm.message,
        detail={"kind": alarm.kind, "severity": alarm.severity, "subject": alarm.subject},
    )
