"""Write audit events in the caller's transaction (Dispatch's ``log_case_event``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a user, a calling AE, the command line or the system itself."""

    type: ActorType
    id: str
    source: str | None = None
    role: str | None = None
    request_id: str | None = None

    @classmethod
    def ae(cls, aet: str, address: str | None) -> Actor:
        return cls(ActorType.AE, aet or "(empty AE title)", source=address)

    @classmethod
    def cli(cls, command: str, source: str | None = None) -> Actor:
        return cls(ActorType.CLI, command, source=source)

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(ActorType.SYSTEM, component)


_INSERT = insert(cast(Table, AuditEvent.__table__))


def record(
    *,
    session: Session,
    actor: Actor,
    event_type: AuditEventType,
    action: AuditAction,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    object_type: str | None = None,
    object_id: str | None = None,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    source: str | None = None,
    message: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Insert one audit event in ``session``'s transaction: it commits with the change it
    describes, or not at all."""
    origin = source or actor.source
    session.connection().execute(
        _INSERT,
        {
            "occurred_at": datetime.now(UTC),
            "event_type": event_type.value,
            "action": action.value,
            "outcome": int(outcome),
            "actor_type": actor.type.value,
            "actor_id": actor.id[:128],
            "actor_role": actor.role,
            "source": origin[-255:] if origin else None,
            "object_type": object_type,
            "object_id": object_id,
            "patient_id": patient_id,
            "study_instance_uid": study_instance_uid,
            "request_id": actor.request_id,
            "message": message[:1024] if message else None,
            "detail": detail,
        },
    )
