"""Helpers of the billing tests: an archive whose billing settings each test chooses
(``make_archive``, on SQLite and PostgreSQL through the shared ``settings`` fixture), a
delivery through the public hook, the charges."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.billing import service
from cloudfilm.billing.models import Charge
from cloudfilm.config import BillingSettings, Settings
from cloudfilm.db import Database
from cloudfilm.storage import open_storage

MakeArchive = Callable[..., Archive]


@pytest.fixture(name="make_archive")
def make_archive_fixture(settings: Settings) -> Iterator[MakeArchive]:
    """``make_archive(**billing)``: an archive with ``BillingSettings(**billing)``."""
    opened: list[Archive] = []

    def make(**billing: Any) -> Archive:
        chosen = settings.model_copy(update={"billing": BillingSettings(**billing)})
        db = Database(chosen)
        if db.is_sqlite:
            migrations.upgrade(db.engine)
        archive = Archive(chosen, db=db, storage=open_storage(chosen))
        opened.append(archive)
        return archive

    yield make
    for archive in opened:
        archive.close()


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
