"""Helpers of the billing tests: a delivery through the public hook, the charges."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.billing import service
from cloudfilm.billing.models import Charge

MakeArchive = Callable[..., Archive]


def deliver(
    archive: Archive,
    uid: str,
    *,
    event: str = "released",
    accession: str | None = None,
    patient: str = "P1",
    department: str = "放射科",
    modality: str = "CT",
    at: datetime | None = None,
) -> int | None:
    """One delivery event through the public hook, in its own transaction."""
    with archive.db.session() as session:
        return service.record_delivery(
            session,
            event=event,
            study_instance_uid=uid,
            accession_number=accession if accession is not None else f"A{uid}",
            patient_id=patient,
            person_id=None,
            department=department,
            modality=modality,
            exam_name="胸部CT平扫",
            at=at or datetime(2026, 11, 20, 2, 0, tzinfo=UTC),
        )


def charges(archive: Archive) -> list[Charge]:
    with archive.db.read_session() as session:
        rows = list(session.scalars(select(Charge).order_by(Charge.id)))
        session.expunge_all()
    return rows
