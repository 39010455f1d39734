"""The QR code on a report and on a registration label opens that exam — after the identity
check, and no other exam; the registration SMS carries the label's link."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from report_messages import (
    FINDINGS,
    ack_code,
    ingest_ct,
    listening,
    oru,
    pdf_page_png,
    qr_codes,
    send,
)
from sqlalchemy import select

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.config import BillingSettings, NotifySettings, ReportSettings, Settings
from cloudfilm.db import Database
from cloudfilm.notify.service import Dispatcher
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports.models import Document, Report
from cloudfilm.reports.worker import ReportWorker
from cloudfilm.storage import open_storage

from conftest import LiveServer, serving

sys.path.insert(0, str(Path(__file__).parent.parent / "notify"))
from notify_fakes import SmsPlatform, sms_settings  # noqa: E402
from notify_fakes import serving as fake_serving

ID_CARD = "110105198003151234"
OTHER_ID_CARD = "440304198003154567"


@pytest.fixture
def platform() -> Iterator[SmsPlatform]:
    with fake_serving(SmsPlatform()) as fake:
        assert isinstance(fake, SmsPlatform)
        yield fake


@pytest.fixture
def site(settings: Settings, platform: SmsPlatform) -> Iterator[LiveServer]:
    configured = settings.model_copy(
        update={
            "notify": NotifySettings(**sms_settings(platform)),
            "reports": ReportSettings(notify_registration=True),
            "billing": BillingSettings(enabled=True, charge_event="first-view", price="8.00"),
        }
    )
    db = Database(configured)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    archive = Archive(configured, db=db, storage=open_storage(configured))
    try:
        with serving(archive) as server:
            yield server
    finally:
        archive.close()


def token_in(url: str) -> str:
    assert "/m/e/" in url, url
    return url.rsplit("/", 1)[1]


def report_qr(archive: Archive, accession: str, tmp: Path) -> str:
    with archive.db.read_session() as session:
        report = session.scalars(select(Report).where(Report.accession_number == accession)).one()
        doc = session.scalars(
            select(Document).where(Document.report_id == report.id, Document.kind == "report-pdf")
        ).one()
        key = doc.storage_key
    [url] = qr_codes(pdf_page_png(archive.storage.read(key), tmp, accession))
    return url


def charged(archive: Archive) -> list[tuple[str, str]]:
    from cloudfilm.billing.models import Charge

    with archive.db.read_session() as session:
        return [(c.study_instance_uid, c.event) for c in session.scalars(select(Charge))]


def verify(site: LiveServer, token: str, name: str, number: str) -> httpx.Response:
    return httpx.post(
        f"{site.url}/api/portal/entry/{token}/verify", json={"name": name, "id_number": number}
    )


def test_report_qr_opens_this_exam_after_the_id_check_and_no_other(
    site: LiveServer, tmp_path: Path
) -> None:
    archive = site.archive
    study1, _ = ingest_ct(archive, "ACC1")
    study2, _ = ingest_ct(archive, "ACC2")
    with listening(archive) as listener:
        acks = send(
            listener,
            oru("Q1", accession="ACC1", study_uid=study1, id_card=ID_CARD, placer="H1"),
            oru("Q2", accession="ACC2", study_uid=study2, id_card=ID_CARD, placer="H2",
                impression="第二次检查：未见异常。"),
        )  # fmt: skip
    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    ReportWorker(archive).run_once()
    token = token_in(report_qr(archive, "ACC1", tmp_path))
    other = token_in(report_qr(archive, "ACC2", tmp_path))
    assert token != other

    entry = httpx.get(f"{site.url}/api/portal/entry/{token}").json()
    assert entry == {
        "purpose": "report", "hospital": archive.settings.reports.hospital_name,
        "name": "王*明", "methods": ["id-card"], "locked": False,
    }  # fmt: skip
    assert httpx.get(f"{site.url}/api/portal/exam").status_code == 401
    assert verify(site, token, "王小明", OTHER_ID_CARD).status_code == 403
    assert verify(site, token, "王大明", ID_CARD).status_code == 403
    assert verify(site, token, "王小明", "12345").status_code in (400, 422)
    answer = verify(site, token, " 王小明 ", ID_CARD)
    assert answer.status_code == 200, answer.text
    bearer = {"Authorization": f"Bearer {answer.json()['session']}"}

    assert charged(archive) == []  # billing charges on the patient's first view
    exam = httpx.get(f"{site.url}/api/portal/exam", headers=bearer).json()
    assert exam["accession_number"] == "ACC1" and exam["status"] == "released"
    httpx.get(f"{site.url}/api/portal/exam", headers=bearer)  # a second view: no second charge
    assert charged(archive) == [(study1, "first-view")]
    assert exam["report"]["findings"] == FINDINGS and exam["images"] is True
    assert "第二次检查" not in str(exam) and "ACC2" not in str(exam)
    assert "patient_id" not in exam["report"]
    pdf = httpx.get(f"{site.url}/api/portal/exam/report.pdf", headers=bearer)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert token_in(qr_codes(pdf_page_png(pdf.content, tmp_path, "dl"))[0]) == token
    # The portal session is no staff credential.
    with archive.db.read_session() as session:
        second = session.scalars(select(Report).where(Report.accession_number == "ACC2")).one()
    assert httpx.get(f"{site.url}/api/reports/{second.id}", headers=bearer).status_code == 401
    forged = {"Authorization": "Bearer " + answer.json()["session"][:-2] + "xx"}
    assert httpx.get(f"{site.url}/api/portal/exam", headers=forged).status_code == 401
    assert httpx.get(f"{site.url}/api/portal/entry/{token[:-1]}x").status_code == 404

    with archive.db.read_session() as session:
        kinds = [
            e.event_type
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.object_type == "entry-token")
            )
        ]
    assert kinds.count("entry-verified") == 1 and kinds.count("entry-refused") >= 2


def test_repeated_failed_checks_lock_the_token(site: LiveServer, tmp_path: Path) -> None:
    archive = site.archive
    with listening(archive) as listener:
        send(listener, oru("K1", accession="ACC3", id_card=ID_CARD))
    ReportWorker(archive).run_once()
    token = token_in(report_qr(archive, "ACC3", tmp_path))
    for _ in range(5):
        assert verify(site, token, "王小明", OTHER_ID_CARD).status_code == 403
    locked = verify(site, token, "王小明", ID_CARD)
    assert locked.status_code == 403 and "15" in locked.json()["message"]
    assert httpx.get(f"{site.url}/api/portal/entry/{token}").json()["locked"] is True


def orm(control_id: str) -> bytes:
    segments = [
        "MSH|^~\\&|RIS|人民医院|CLOUDFILM|影像科|20261128083000||ORM^O01^ORM_O01|"
        f"{control_id}|P|2.5|||AL|NE|CHN|UNICODE UTF-8",
        f"PID|1||P500^^^HIS^PI~{ID_CARD}^^^^NNCHN||王小明^^^^^^L||19800315|M|||||13900139000",
        "PV1|1|O|放射科门诊",
        "ORC|NW|HIS500|RIS500||SC||||20261128080000",
        "OBR|1|HIS500|RIS500|MR001^头颅MR平扫^LOCAL"
        + "|" * 14
        + "ACC500"
        + "|" * 18
        + "20261129093000",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def test_registration_label_and_sms_carry_the_same_link_that_follows_the_exam(
    site: LiveServer, platform: SmsPlatform, tmp_path: Path
) -> None:
    archive = site.archive
    with listening(archive) as listener:
        [ack] = send(listener, orm("O1"))
    assert ack_code(ack) == "AA", str(ack)
    with archive.db.read_session() as session:
        order = session.scalars(select(ImagingOrder)).one()
    dispatcher = Dispatcher(archive)
    try:
        assert dispatcher.run_once() == 1
    finally:
        dispatcher.close()
    [sms] = platform.received
    body: dict[str, Any] = sms.json()
    assert body["mobile"] == "13900139000" and "头颅MR平扫" in body["content"]
    link = body["content"][body["content"].index("http") :].split()[0]

    label = httpx.get(f"{site.url}/api/orders/{order.id}/label.pdf", headers=site.headers)
    assert label.status_code == 200 and label.content.startswith(b"%PDF-")
    assert qr_codes(pdf_page_png(label.content, tmp_path, "label", dpi=300)) == [link]
    png = httpx.get(f"{site.url}/api/orders/{order.id}/label.png", headers=site.headers)
    (tmp_path / "label.png").write_bytes(png.content)
    assert qr_codes(tmp_path / "label.png") == [link]
    assert httpx.get(f"{site.url}/api/orders/{order.id}/label.pdf").status_code == 401

    session_value = verify(site, token_in(link), "王小明", ID_CARD).json()["session"]
    bearer = {"Authorization": f"Bearer {session_value}"}
    exam = httpx.get(f"{site.url}/api/portal/exam", headers=bearer).json()
    assert exam["status"] == "registered" and exam["exam"] == "头颅MR平扫"
    ingest_ct(archive, "ACC500", patient="P500")
    assert httpx.get(f"{site.url}/api/portal/exam", headers=bearer).json()["status"] == "examined"
    with listening(archive) as listener:
        send(listener, oru("O2", accession="ACC500", patient="P500", placer="HIS500"))
    assert httpx.get(f"{site.url}/api/portal/exam", headers=bearer).json()["status"] == "reported"
    ReportWorker(archive).run_once()
    exam = httpx.get(f"{site.url}/api/portal/exam", headers=bearer).json()
    assert exam["status"] == "released" and exam["report"]["impression"]
