"""What a release sets off, in the releasing transaction: the patient's notice (SMS
through the notification outbox) and the cloud-film charge (billing). Both are outbox
rows: they are sent after the commit, by their own workers, and retried there."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.config import Settings
from cloudfilm.mpi.keys import keys_of
from cloudfilm.mpi.models import PersonIdentifier
from cloudfilm.mpi.service import PHONE
from cloudfilm.reports.models import Report, ReportVersion


def phone_of(session: Session, person_id: int | None) -> str | None:
    """The newest phone number the master index holds for the person, opened."""
    if person_id is None:
        return None
    sealed = session.scalars(
        select(PersonIdentifier.value_sealed)
        .where(PersonIdentifier.person_id == person_id, PersonIdentifier.id_type == PHONE)
        .order_by(PersonIdentifier.id.desc())
        .limit(1)
    ).first()
    return keys_of(session).open(sealed) if sealed else None


def on_release(
    session: Session,  # noqa: ARG001 - the outbox and billing calls land next
    report: Report,  # noqa: ARG001
    version: ReportVersion,  # noqa: ARG001
    settings: Settings,  # noqa: ARG001
    now: datetime,  # noqa: ARG001
) -> dict[str, Any]:
    """Queue the notice and the charge of a release; what was queued, for the audit."""
    queued: dict[str, Any] = {}
    return queued
