"""The patient's entry page (/m/e/<token>, from a report QR code) on a phone-sized headless
Chromium: identity check, wrong answers refused, then this exam's report and its PDF."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, expect
from sqlalchemy import select
from test_login_page import backend, browser  # noqa: F401 - the shared browser fixtures

from cloudfilm.audit.models import AuditEvent
from cloudfilm.reports.models import Document
from cloudfilm.reports.worker import ReportWorker

from conftest import LiveServer

sys.path.insert(0, str(Path(__file__).parent.parent / "reports"))
from report_messages import (  # noqa: E402
    FINDINGS,
    ingest_ct,
    listening,
    oru,
    pdf_page_png,
    qr_codes,
    send,
)

ID_CARD = "110105198003151234"
SHOTS = Path("/tmp/cloudfilm-screens")


def test_entry_page_on_a_phone(live_server: LiveServer, browser: Browser, tmp_path: Path) -> None:  # noqa: F811
    archive = live_server.archive
    study, _ = ingest_ct(archive, "ACCW1")
    with listening(archive) as listener:
        send(listener, oru("W1", accession="ACCW1", study_uid=study, id_card=ID_CARD))
    ReportWorker(archive).run_once()
    with archive.db.read_session() as session:
        key = session.scalars(
            select(Document.storage_key).where(Document.kind == "report-pdf")
        ).one()
    [url] = qr_codes(pdf_page_png(archive.storage.read(key), tmp_path))
    token = url.rsplit("/", 1)[1]

    context = browser.new_context(locale="zh-CN", viewport={"width": 375, "height": 812})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # The refused identity check is logged by the browser as a failed load (403).
        if message.type == "error" and "status of 403" not in message.text:
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live_server.url}/m/e/{token}")
    expect(page.locator("#masked")).to_have_text("王*明")
    page.fill("#name", "王小明")
    page.fill("#id-number", "440304198003154567")
    page.click("#verify-button")
    expect(page.locator("#notice")).to_contain_text("姓名或身份证号不符")
    page.fill("#id-number", ID_CARD)
    page.click("#verify-button")
    expect(page.locator("#findings")).to_have_text(FINDINGS)
    expect(page.locator("#steps li.done")).to_have_count(4)
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "entry-375.png"), full_page=True)
    page.reload()  # the session lives on in this tab
    expect(page.locator("#findings")).to_have_text(FINDINGS)
    assert errors == [], errors
    context.close()

    with archive.db.read_session() as session:
        texts = [f"{e.object_id} {e.message}" for e in session.scalars(select(AuditEvent))]
    assert texts and not [t for t in texts if token in t]  # the token is never on record
