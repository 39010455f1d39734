"""What the kiosk tests share: a registered kiosk, reports that came in by HL7 and were
rendered by the report worker, and the audit records of the kiosk's requests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
from hl7.client import MLLPClient
from sqlalchemy import select

import hl7
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.service import create_client
from cloudfilm.hl7.listener import HL7Listener
from cloudfilm.reports.models import Document, Report
from cloudfilm.reports.worker import ReportWorker

from conftest import LiveServer

sys.path.insert(0, str(Path(__file__).parent.parent / "reports"))
sys.path.insert(0, str(Path(__file__).parent.parent / "orders"))

from report_messages import oru, pdf_page_png, qr_codes  # noqa: E402
from test_orders_hl7 import order_message  # noqa: E402

__all__ = ["oru", "order_message", "qr_codes"]

ID_CARD = "11010519491231002X"
"""A valid GB 11643 number (check character X)."""


def register_kiosk(server: LiveServer, name: str = "kiosk-lobby-1") -> dict[str, str]:
    """A kiosk registered like `cloudfilm client create NAME --scope kiosk:print`, signed in
    through POST /api/oauth/token: the headers it sends."""
    with server.archive.db.session() as session:
        _, secret = create_client(
            session=session, name=name, now=server.clock.now(), scopes=["kiosk:print"]
        )
    answer = httpx.post(
        f"{server.url}/api/oauth/token",
        data={"grant_type": "client_credentials", "client_id": name, "client_secret": secret},
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def send(listener: HL7Listener, *messages: bytes) -> None:
    with MLLPClient("127.0.0.1", listener.port, encoding="utf-8") as client:
        for raw in messages:
            answer = client.send_message(raw)
            ack = hl7.parse(answer[1:-2].decode("utf-8"))
            assert str(ack.segment("MSA")[1]) == "AA", str(ack)


def report_id(server: LiveServer, accession: str) -> int:
    with server.archive.db.read_session() as session:
        return int(
            session.scalars(select(Report.id).where(Report.accession_number == accession)).one()
        )


def render(server: LiveServer) -> None:
    """One pass of the report worker: render what is pending, release what is due."""
    done = ReportWorker(server.archive).run_once()
    assert not done.failed


def current_pdf(server: LiveServer, accession: str) -> bytes:
    with server.archive.db.read_session() as session:
        doc = session.scalars(
            select(Document)
            .join(Report, Document.report_id == Report.id)
            .where(
                Report.accession_number == accession,
                Document.kind == "report-pdf",
                Document.status == "current",
            )
        ).one()
        return server.archive.storage.read(doc.storage_key)


def scanned_qr(server: LiveServer, accession: str, tmp: Path) -> str:
    """What a kiosk's scanner reads from the printed report: the QR code of its PDF."""
    [url] = qr_codes(pdf_page_png(current_pdf(server, accession), tmp, f"qr-{accession}"))
    return url


def audit_since(server: LiveServer, seq: int) -> list[AuditEvent]:
    with server.archive.db.read_session() as session:
        rows = list(
            session.scalars(select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq))
        )
        session.expunge_all()
    return rows


def audit_head(server: LiveServer) -> int:
    with server.archive.db.read_session() as session:
        return int(
            session.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1)) or 0
        )


def one_record(server: LiveServer, before: int, event_type: str, **expect: Any) -> AuditEvent:
    """The single audit record a request left since ``before``, of ``event_type``."""
    rows = [r for r in audit_since(server, before) if r.event_type != "report-rendered"]
    http = [r for r in rows if (r.message or "").startswith(("GET ", "POST "))]
    assert len(http) == 1, [(r.event_type, r.message) for r in rows]
    row = http[0]
    assert row.event_type == event_type, (row.event_type, row.message, row.detail)
    for key, value in expect.items():
        assert getattr(row, key) == value, (key, getattr(row, key), value)
    return row
