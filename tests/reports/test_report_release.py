"""Release: a notice by SMS with the exam's link, a cloud-film charge, and on withdrawal
the charge reversed; release delays and held critical reports."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from report_messages import ack_code, ingest_ct, listening, oru, send
from sqlalchemy import select, update

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor
from cloudfilm.billing.models import Charge
from cloudfilm.config import BillingSettings, NotifySettings, ReportSettings, Settings
from cloudfilm.db import Database
from cloudfilm.notify.service import Dispatcher
from cloudfilm.reports.models import Report
from cloudfilm.reports.worker import ReportWorker
from cloudfilm.sharing import tokens
from cloudfilm.storage import open_storage

sys.path.insert(0, str(Path(__file__).parent.parent / "notify"))
from notify_fakes import SmsPlatform, serving, sms_settings  # noqa: E402


@pytest.fixture
def platform() -> Iterator[SmsPlatform]:
    with serving(SmsPlatform()) as fake:
        assert isinstance(fake, SmsPlatform)
        yield fake


def _archive(settings: Settings, platform: SmsPlatform, **reports: Any) -> Archive:
    configured = settings.model_copy(
        update={
            "notify": NotifySettings(**sms_settings(platform)),
            "billing": BillingSettings(enabled=True, price=Decimal("10.00")),
            "reports": ReportSettings(**reports),
        }
    )
    db = Database(configured)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    return Archive(configured, db=db, storage=open_storage(configured))


@pytest.fixture
def made() -> Iterator[list[Archive]]:
    archives: list[Archive] = []
    yield archives
    for archive in archives:
        archive.close()


def receive(archive: Archive, raw: bytes) -> str:
    """Send one message through the archive's MLLP listener; the ACK code."""
    with listening(archive) as listener:
        return ack_code(send(listener, raw)[0])


def the_report(archive: Archive, accession: str) -> Report:
    with archive.db.read_session() as session:
        report = session.scalars(select(Report).where(Report.accession_number == accession)).one()
        session.expunge(report)
    return report


def charges(archive: Archive) -> list[Charge]:
    with archive.db.read_session() as session:
        rows = list(session.scalars(select(Charge).order_by(Charge.id)))
        session.expunge_all()
    return rows


def test_release_sends_the_exam_link_by_sms_and_charges_once(
    settings: Settings, platform: SmsPlatform, made: list[Archive]
) -> None:
    archive = _archive(settings, platform)
    made.append(archive)
    study_uid, _ = ingest_ct(archive, "ACC800")
    assert "AA" == receive(archive, oru("L1", accession="ACC800", study_uid=study_uid))
    worker = ReportWorker(archive)
    done = worker.run_once()
    report = the_report(archive, "ACC800")
    assert done.released == [report.id]
    dispatcher = Dispatcher(archive)
    try:
        assert dispatcher.run_once() == 1
    finally:
        dispatcher.close()
    [sms] = platform.received
    body = sms.json()
    assert body["mobile"] == "13800138000"
    text = body["content"]
    assert "胸部CT平扫" in text and "报告已发布" in text
    link = text[text.index("http") :].split()[0]
    with archive.db.read_session() as session:
        entry = tokens.resolve(session, link.rsplit("/", 1)[1])
        assert entry is not None and entry.report_id == report.id
    [charge] = charges(archive)
    assert (charge.study_instance_uid, charge.amount) == (study_uid, Decimal("10.00"))

    # A correction after release neither notifies nor charges again.
    assert "AA" == receive(archive, oru("L2", accession="ACC800", study_uid=study_uid))
    worker.run_once()
    assert len(charges(archive)) == 1

    # Withdrawal reverses the charge (a new row; the charge stays).
    assert "AA" == receive(archive, oru("L3", accession="ACC800", status="X"))
    rows = charges(archive)
    assert [r.kind for r in rows] == ["charge", "reversal"]
    assert rows[1].amount == Decimal("-10.00") and rows[1].reverses_id == rows[0].id


def test_release_waits_for_the_delay_and_holds_critical_reports(
    settings: Settings, platform: SmsPlatform, made: list[Archive]
) -> None:
    archive = _archive(settings, platform, release_delay_hours=2, hold_critical=True)
    made.append(archive)
    # Approved just now (OBR-22 in the sender's local time, UTC+8).
    now = (datetime.now(UTC) + timedelta(hours=8)).strftime("%Y%m%d%H%M%S")
    receive(archive, oru("D1", accession="ACC900", reported=now))
    receive(archive, oru("D2", accession="ACC901", critical=True, placer="HIS901", reported=now))
    worker = ReportWorker(archive)
    done = worker.run_once()
    assert done.released == [] and len(done.rendered) == 2
    normal, critical = the_report(archive, "ACC900"), the_report(archive, "ACC901")
    assert critical.critical and not normal.critical
    assert normal.release_at is not None
    release_at = normal.release_at.replace(tzinfo=normal.release_at.tzinfo or UTC)
    assert timedelta(hours=1.9) < release_at - datetime.now(UTC) <= timedelta(hours=2)
    # Two hours later (moved back in the index rather than waited for).
    with archive.db.session() as session:
        session.execute(update(Report).values(release_at=datetime.now(UTC) - timedelta(minutes=1)))
    done = worker.run_once()
    assert done.released == [normal.id]  # the critical one is held
    assert worker.release(critical.id, by=Actor.cli("pytest"), force=True)
    assert the_report(archive, "ACC901").released_at is not None
