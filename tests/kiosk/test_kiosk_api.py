"""The self-service printing kiosk end to end (issue 8 item 5): an ORU final report comes in
over MLLP, the report worker renders its PDF with the QR code, a registered kiosk scans
that code (decoded from the rendered page with zbar) or reads a card, downloads the PDF,
confirms the print; the reprint policy, tickets, refusals and the audit trail."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from kiosk_helpers import (
    ID_CARD,
    audit_head,
    audit_since,
    current_pdf,
    one_record,
    order_message,
    oru,
    qr_codes,
    register_kiosk,
    render,
    report_id,
    scanned_qr,
    send,
)
from sqlalchemy import func, select

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.roles import BUILTIN_ROLES, RoleSpec
from cloudfilm.auth.service import create_client
from cloudfilm.config import HL7Settings, KioskSettings, ReprintPolicy
from cloudfilm.errors import Conflict
from cloudfilm.hl7.listener import HL7Listener
from cloudfilm.kiosk import tickets
from cloudfilm.kiosk.models import KioskPrint
from cloudfilm.kiosk.tickets import Subject
from cloudfilm.mpi import idcard
from cloudfilm.mpi.service import mask_name
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports.worker import ReportWorker
from cloudfilm.sharing import tokens

from auth_helpers import make_user, signed_in
from conftest import LiveServer


@pytest.fixture
def listener(archive: Archive) -> Iterator[HL7Listener]:
    server = HL7Listener(archive.db, HL7Settings(port=0, idle_timeout_seconds=5))
    server.start()
    yield server
    server.stop()


def _policy(server: LiveServer, **values: object) -> None:
    """The kiosk section as a restart with this configuration would have it."""
    server.archive.settings.kiosk = KioskSettings(**values)  # type: ignore[arg-type]


def _lookup(server: LiveServer, kiosk: dict[str, str], **body: str) -> httpx.Response:
    return httpx.post(f"{server.url}/api/kiosk/lookup", json=body, headers=kiosk)


def _pdf(server: LiveServer, kiosk: dict[str, str], rid: int, ticket: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/api/kiosk/reports/{rid}/pdf",
        headers={**kiosk, "X-Kiosk-Ticket": ticket},
    )


def _printed(server: LiveServer, kiosk: dict[str, str], rid: int, ticket: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/kiosk/reports/{rid}/printed", json={"ticket": ticket}, headers=kiosk
    )


def _approve(server: LiveServer, staff: dict[str, str], rid: int) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/kiosk/reports/{rid}/reprint-approval",
        json={"reason": "患者遗失 lost"},
        headers=staff,
    )


def test_kiosk__scan_print_and_reprint_policies(
    live_server: LiveServer, listener: HL7Listener, tmp_path: Path
) -> None:
    server = live_server
    send(listener, oru("K1", accession="KSK100", patient="P100", name="王小明"))
    render(server)
    rid = report_id(server, "KSK100")
    url = scanned_qr(server, "KSK100", tmp_path)
    assert url.startswith(tokens.portal_base(server.archive.settings) + "/m/e/")
    kiosk = register_kiosk(server)

    before = audit_head(server)
    found = _lookup(server, kiosk, qr=url)
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["patient"] == {"name": "王*明"}
    [listed] = body["reports"]
    assert listed["id"] == rid and listed["exam_name"] == "胸部CT平扫"
    assert listed["modality"] == "CT" and listed["exam_date"] == "2026-11-28"
    assert listed["times_printed"] == 0 and listed["print_allowed"] is True
    assert listed["refusal"] is None
    # Minimal personal data: no patient ID, no full name, no findings, no phone.
    for secret in ("P100", "王小明", "13800138000", "磨玻璃"):
        assert secret not in found.text
    row = one_record(server, before, "kiosk-lookup", actor_id="kiosk-lobby-1", patient_id="P100")
    assert row.detail and row.detail["by"] == "qr" and row.detail["reports"] == [rid]
    ticket = body["ticket"]

    before = audit_head(server)
    pdf = _pdf(server, kiosk, rid, ticket)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert pdf.content == current_pdf(server, "KSK100")
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["cache-control"] == "no-store"
    one_record(server, before, "report-read", object_id=str(rid), patient_id="P100")

    before = audit_head(server)
    done = _printed(server, kiosk, rid, ticket)
    assert done.status_code == 200, done.text
    assert done.json()["times_printed"] == 1
    # Default policy: one print, then staff approval.
    assert done.json()["print_allowed"] is False
    assert done.json()["refusal"]["code"] == "approval_required"
    one_record(server, before, "kiosk-printed", object_id=str(rid), outcome=0)

    # A second print is refused, download and confirmation alike, each audited.
    before = audit_head(server)
    again = _pdf(server, kiosk, rid, ticket)
    assert again.status_code == 403 and again.json()["error"] == "approval_required"
    assert (
        again.json()["message"].startswith("本报告已打印 1 次") and " · " in again.json()["message"]
    )
    refused = one_record(server, before, "kiosk-refused", object_id=str(rid))
    assert (
        refused.outcome == 8 and refused.detail and refused.detail["refused"] == "approval_required"
    )
    before = audit_head(server)
    assert _printed(server, kiosk, rid, ticket).status_code == 403
    one_record(server, before, "kiosk-refused")
    listed_now = _lookup(server, kiosk, qr=url).json()["reports"][0]
    assert listed_now["times_printed"] == 1 and listed_now["print_allowed"] is False
    assert listed_now["refusal"]["code"] == "approval_required"

    # Staff approval: one more print, and no stacking of approvals.
    make_user(server, "desk", ["operator"])
    staff = signed_in(server, "desk")
    before = audit_head(server)
    approved = _approve(server, staff, rid)
    assert approved.status_code == 200, approved.text
    assert approved.json()["print_allowed"] is True
    one_record(server, before, "kiosk-reprint-approved", actor_id="desk", patient_id="P100")
    stacked = _approve(server, staff, rid)
    assert stacked.status_code == 409 and stacked.json()["error"] == "conflict"
    unknown = _approve(server, staff, 999_999)
    assert unknown.status_code == 404 and unknown.json()["error"] == "report_not_printable"
    assert _pdf(server, kiosk, rid, ticket).status_code == 200
    assert _printed(server, kiosk, rid, ticket).json()["times_printed"] == 2
    assert _printed(server, kiosk, rid, ticket).status_code == 403
    # The kiosk itself cannot approve (kiosk:approve is staff's), nor a clinician.
    assert _approve(server, kiosk, rid).status_code == 403
    make_user(server, "doc", ["clinician"])
    assert _approve(server, signed_in(server, "doc"), rid).status_code == 403

    # never: no kiosk reprint, and nothing to approve.
    _policy(server, reprint=ReprintPolicy.NEVER)
    refused_never = _printed(server, kiosk, rid, ticket)
    assert refused_never.status_code == 403
    assert refused_never.json()["error"] == "reprint_not_allowed"
    assert _approve(server, staff, rid).status_code == 409

    # allowed: max_reprints more without asking (the earlier approval still counts).
    _policy(server, reprint=ReprintPolicy.ALLOWED, max_reprints=2)
    assert _printed(server, kiosk, rid, ticket).json()["times_printed"] == 3
    assert _printed(server, kiosk, rid, ticket).json()["times_printed"] == 4
    limit = _printed(server, kiosk, rid, ticket)
    assert limit.status_code == 403 and limit.json()["error"] == "print_limit_reached"

    # max_prints = 1 and never: a freshly corrected report (a new version) prints once.
    _policy(server, max_prints=1, reprint=ReprintPolicy.NEVER)
    send(listener, oru("K2", accession="KSK100", patient="P100", impression="更正：未见异常。"))
    assert _lookup(server, kiosk, qr=url).json()["reports"] == []  # not rendered yet
    render(server)
    fresh = _lookup(server, kiosk, qr=url).json()
    [corrected] = fresh["reports"]
    assert corrected["version"] == 2 and corrected["corrected"] is True
    assert corrected["times_printed"] == 0 and corrected["print_allowed"] is True
    assert _printed(server, kiosk, rid, fresh["ticket"]).status_code == 200
    assert _printed(server, kiosk, rid, fresh["ticket"]).status_code == 403

    with server.archive.db.read_session() as session:
        rows = list(session.scalars(select(KioskPrint).order_by(KioskPrint.id)))
    assert len(rows) == 5
    assert {r.kiosk for r in rows} == {"kiosk-lobby-1"} and all(r.kiosk_client_id for r in rows)
    assert len({r.document_id for r in rows}) == 2  # four of version 1, one of version 2


def test_kiosk__registration_label_opens_the_patients_reports(
    live_server: LiveServer, listener: HL7Listener, tmp_path: Path
) -> None:
    """The QR label printed at registration (before any report) finds the same patient."""
    server = live_server
    send(listener, order_message("L1", placer="HIS700", filler="RIS700", accession="KSK700"))
    with server.archive.db.read_session() as session:
        order_id = session.scalars(
            select(ImagingOrder.id).where(ImagingOrder.accession_number == "KSK700")
        ).one()
    label = httpx.get(f"{server.url}/api/orders/{order_id}/label.png", headers=server.headers)
    assert label.status_code == 200, label.text
    (tmp_path / "label.png").write_bytes(label.content)
    [url] = qr_codes(tmp_path / "label.png")
    kiosk = register_kiosk(server)

    early = _lookup(server, kiosk, qr=url)
    assert early.status_code == 200 and early.json()["reports"] == []
    assert early.json()["message"].startswith("暂无可打印的报告")

    send(listener, oru("L2", accession="KSK700", placer="HIS700", patient="P900", name="张三丰"))
    render(server)
    found = _lookup(server, kiosk, qr=url)
    assert [r["id"] for r in found.json()["reports"]] == [report_id(server, "KSK700")]
    assert found.json()["patient"]["name"] == "张*丰"
    rid = report_id(server, "KSK700")
    assert _pdf(server, kiosk, rid, found.json()["ticket"]).content.startswith(b"%PDF-")


def test_kiosk__lookup_by_id_card_and_medical_card(
    live_server: LiveServer, listener: HL7Listener
) -> None:
    server = live_server
    # PID-3 names the hospital patient ID, the medical card (MC) and the ID card (NNCHN).
    send(
        listener,
        oru(
            "C1",
            accession="KSK200",
            patient=f"P200^^^HIS^PI~MC778899^^^HIS^MC~{ID_CARD}^^^^NNCHN",
            name="李^四海",
        ),  # fmt: skip
    )
    # A second person with an ID card and only a preliminary report: nothing to print.
    other_card = "11010519800101" + "001"
    other_card += idcard.check_character(other_card)
    send(
        listener,
        oru(
            "C2",
            accession="KSK201",
            status="P",
            patient=f"P201^^^HIS^PI~{other_card}^^^^NNCHN",
            name="赵六",
        ),  # fmt: skip
    )
    render(server)
    rid = report_id(server, "KSK200")
    kiosk = register_kiosk(server)

    before = audit_head(server)
    by_id = _lookup(server, kiosk, card_type="id-card", card_number=ID_CARD.lower())
    assert by_id.status_code == 200, by_id.text
    assert [r["id"] for r in by_id.json()["reports"]] == [rid]
    assert by_id.json()["patient"]["name"] == "李*海"
    assert ID_CARD not in by_id.text and "P200" not in by_id.text
    row = one_record(server, before, "kiosk-lookup", patient_id="P200")
    assert row.detail and row.detail["card"] == "110105********002X"
    assert ID_CARD not in json.dumps(row.detail)

    by_card = _lookup(server, kiosk, card_type="medical-card", card_number="MC778899")
    assert by_card.status_code == 200 and [r["id"] for r in by_card.json()["reports"]] == [rid]
    ticket = by_card.json()["ticket"]
    assert _pdf(server, kiosk, rid, ticket).content.startswith(b"%PDF-")

    # Unknown card and a known person without a printable report: the same answer.
    unknown_card = "44010619900307" + "123"
    unknown_card += idcard.check_character(unknown_card)
    nobody = _lookup(server, kiosk, card_type="id-card", card_number=unknown_card)
    no_report = _lookup(server, kiosk, card_type="id-card", card_number=other_card)
    nothing = _lookup(server, kiosk, card_type="medical-card", card_number="MC000000")
    assert nobody.status_code == no_report.status_code == nothing.status_code == 404
    assert nobody.json() == no_report.json() == nothing.json()
    assert nobody.json()["error"] == "no_printable_report"
    message = nobody.json()["message"]
    assert message.startswith("没有可打印的报告") and " · no printable report" in message

    # A number failing the GB 11643 check character is malformed input.
    bad = _lookup(server, kiosk, card_type="id-card", card_number=ID_CARD[:-1] + "1")
    assert bad.status_code == 400 and " · " in bad.json()["message"]

    with server.archive.db.read_session() as session:
        from cloudfilm.audit.models import AuditEvent

        lookups = list(
            session.scalars(select(AuditEvent).where(AuditEvent.event_type == "kiosk-lookup"))
        )
    assert len(lookups) == 6
    assert sorted(r.outcome for r in lookups) == [0, 0, 4, 4, 4, 4]


def test_kiosk__only_released_rendered_reports_are_listed(
    live_server: LiveServer, listener: HL7Listener
) -> None:
    server = live_server
    server.archive.settings.reports.release_delay_hours = 48
    send(
        listener,
        oru("R1", accession="KSK301", patient="P300"),  # waits for its release delay
        oru("R2", accession="KSK302", patient="P300"),  # released early by staff
        oru("R3", accession="KSK303", patient="P300"),  # released, then withdrawn
    )
    render(server)
    worker = ReportWorker(server.archive)
    desk = Actor.cli("pytest")
    assert worker.release(report_id(server, "KSK302"), by=desk, force=True)
    assert worker.release(report_id(server, "KSK303"), by=desk, force=True)
    kiosk = register_kiosk(server)
    with server.archive.db.session() as session:  # the token in KSK301's QR code
        token = tokens.issue(
            session, purpose="report", person_id=None, report_id=report_id(server, "KSK301")
        )

    listed = _lookup(server, kiosk, qr=token).json()["reports"]
    assert sorted(r["id"] for r in listed) == sorted(
        [report_id(server, "KSK302"), report_id(server, "KSK303")]
    )
    send(listener, oru("R4", accession="KSK303", patient="P300", status="X"))
    found = _lookup(server, kiosk, qr=token).json()
    assert [r["id"] for r in found["reports"]] == [report_id(server, "KSK302")]
    # The unreleased and the withdrawn report cannot be fetched by id either.
    for accession in ("KSK301", "KSK303"):
        refused = _pdf(server, kiosk, report_id(server, accession), found["ticket"])
        assert refused.status_code == 404 and refused.json()["error"] == "report_not_printable"


def test_kiosk__unregistered_kiosks_and_bad_tickets_are_refused(
    live_server: LiveServer, listener: HL7Listener
) -> None:
    server = live_server
    send(
        listener,
        oru("T1", accession="KSK401", patient="P401", name="甲乙丙"),
        oru("T2", accession="KSK402", patient="P402", name="丁戊己"),
    )
    render(server)
    mine, theirs = report_id(server, "KSK401"), report_id(server, "KSK402")
    kiosk = register_kiosk(server)
    with server.archive.db.session() as session:
        token = tokens.issue(session, purpose="report", person_id=None, report_id=mine)
    ticket = _lookup(server, kiosk, qr=token).json()["ticket"]

    # Not a kiosk: no token, a wrong token, a client without kiosk:print, a user.
    make_user(server, "rad", ["radiologist"])
    callers = {
        "nobody": ({}, 401, "authentication-failed"),
        "wrong token": ({"Authorization": "Bearer cft_forged"}, 401, "authentication-failed"),
        "study client": (server.headers, 403, "access-denied"),
        "radiologist": (signed_in(server, "rad"), 403, "access-denied"),
    }
    for who, (headers, status, event) in callers.items():
        for method, path, body in (
            ("POST", "/api/kiosk/lookup", {"qr": token}),
            ("GET", f"/api/kiosk/reports/{mine}/pdf?ticket={ticket}", None),
            ("POST", f"/api/kiosk/reports/{mine}/printed", {"ticket": ticket}),
        ):
            before = audit_head(server)
            answer = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
            assert answer.status_code == status, (who, path, answer.text)
            one_record(server, before, event)
    with server.archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(KioskPrint)) == 0

    # Tickets: another person's report, forged, missing, expired, another kiosk's.
    before = audit_head(server)
    other = _pdf(server, kiosk, theirs, ticket)
    assert other.status_code == 404 and other.json()["error"] == "report_not_printable"
    one_record(server, before, "kiosk-refused", object_id=str(theirs))
    assert _printed(server, kiosk, theirs, ticket).status_code == 404
    head, body_part, mac = ticket.split(".")
    forged_subject = tickets.encode(
        server.archive.settings,
        tickets.Ticket("kiosk-lobby-1", Subject("person", 999), server.clock.now()),
    ).split(".")[1]
    for forged in (
        f"{head}.{forged_subject}.{mac}",  # someone else's person under this MAC
        f"{head}.{body_part}.{mac[:-2]}AA",
        "kt1.e30.AAAA",
        "",
        "x" * 600,
        "kt1.\u4e2d\u6587.\u0000",
    ):
        refused = httpx.get(
            f"{server.url}/api/kiosk/reports/{mine}/pdf",
            params={"ticket": forged},
            headers=kiosk,
        )
        assert refused.status_code in (400, 403), (forged[:40], refused.text)
        if refused.status_code == 403:
            assert refused.json()["error"] == "ticket_invalid"
    second = register_kiosk(server, "kiosk-lobby-2")
    wrong_kiosk = _pdf(server, second, mine, ticket)
    assert wrong_kiosk.status_code == 403 and wrong_kiosk.json()["error"] == "ticket_other_kiosk"
    assert _pdf(server, kiosk, mine, ticket).status_code == 200
    server.clock.advance(minutes=11)
    before = audit_head(server)
    expired = _printed(server, kiosk, mine, ticket)
    assert expired.status_code == 403 and expired.json()["error"] == "ticket_expired"
    assert "过期" in expired.json()["message"]
    one_record(server, before, "kiosk-refused")
    with server.archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(KioskPrint)) == 0


def test_kiosk__hostile_input_is_refused_never_500(
    live_server: LiveServer, listener: HL7Listener
) -> None:
    server = live_server
    send(listener, oru("H1", accession="KSK500", patient="P500"))
    render(server)
    kiosk = register_kiosk(server)
    bodies: list[object] = [
        {"qr": "x" * 5000},
        {"qr": "A" * 1000},
        {"qr": "https://evil.example/m/e/" + "B" * 2000},
        {"qr": "' OR '1'='1' --"},
        {"qr": "https://h/m/e/x'; DROP TABLE report; --"},
        {"qr": "https://h/m/e/AAAAAAAAAAAAAAAAAAAAAAAA"},
        {"qr": "AAAAAAAAAAAAAAAAAAAAAAAA%00"},
        {"qr": "abc\x00def"},
        {"qr": "\x1b[2J\x07"},
        {"qr": "\u202eAAAAAAAAAAAAAAAAAAAAAAAA"},
        {"qr": "http://[::1/m/e/AAAAAAAAAAAAAAAAAAAAAAAA"},
        {"qr": ""},
        {"card_type": "id-card", "card_number": "'; DROP TABLE mpi_person; --"},
        {"card_type": "id-card", "card_number": "1" * 64},
        {"card_type": "medical-card", "card_number": "' OR 1=1 --"},
        {"card_type": "medical-card", "card_number": "MC\x00\x01"},
        {"card_type": "medical-card", "card_number": "9" * 65},
        {"card_type": "passport", "card_number": "E12345678"},
        {"qr": "abc", "card_type": "id-card", "card_number": ID_CARD},
        {},
        ["not", "an", "object"],
        {"qr": 12345},
        {"qr": None, "extra": "field"},
    ]
    for body in bodies:
        before = audit_head(server)
        answer = _lookup_raw(server, kiosk, json.dumps(body))
        assert answer.status_code in (400, 404), (body, answer.status_code, answer.text)
        assert " · " in answer.json()["message"], answer.text
        assert len(audit_since(server, before)) == 1, body
    for raw in (b"{not json", b"\xff\xfe", b"x" * 100_000):
        assert _lookup_raw(server, kiosk, raw).status_code == 400
    for path in ("abc", "-1", "99999999999999999999999", "1%00"):
        answer = httpx.get(
            f"{server.url}/api/kiosk/reports/{path}/pdf",
            headers={**kiosk, "X-Kiosk-Ticket": "kt1.x.y"},
        )
        assert answer.status_code in (400, 403, 404), (path, answer.text)
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def _lookup_raw(server: LiveServer, kiosk: dict[str, str], raw: str | bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/kiosk/lookup",
        content=raw,
        headers={**kiosk, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # rules, not SQL
def test_kiosk__print_permission_is_for_kiosk_clients_only(archive: Archive) -> None:
    with pytest.raises(Conflict, match="kiosk:print"):
        RoleSpec(code="lobby", name="大厅", permissions=[Permission.KIOSK_PRINT]).check_duty()
    assert all(Permission.KIOSK_PRINT not in spec.permissions for spec in BUILTIN_ROLES)
    with archive.db.session() as session:
        now = datetime.now(UTC)
        with pytest.raises(Conflict, match="kiosk:print alone"):
            create_client(session=session, name="k", now=now, scopes=["kiosk:print", "study:read"])
        client, _ = create_client(session=session, name="ris", now=now)
        assert "kiosk:print" not in client.scopes  # never by default
    assert mask_name("张小三") == "张*三" and mask_name("张三") == "张*"
    assert mask_name("欧阳^娜娜") == "欧**娜" and mask_name("Zhang^San") == "Z**** S**"
    assert mask_name("") == "" and mask_name("王") == "*"
    assert timedelta(minutes=KioskSettings().ticket_minutes) <= timedelta(minutes=10)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the CLI opens the data dir
def test_kiosk__registered_and_revoked_with_the_cli(live_server: LiveServer) -> None:
    server = live_server
    data_dir = str(server.archive.settings.data_dir)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloudfilm", "client", *args, "--data-dir", data_dir],
            capture_output=True,
            text=True,
            timeout=120,
        )

    mixed = cli("create", "kiosk-mixed", "--scope", "kiosk:print", "--scope", "study:read")
    assert mixed.returncode == 1 and "kiosk:print alone" in mixed.stdout + mixed.stderr
    made = cli("create", "kiosk-cli", "--scope", "kiosk:print")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("cfs_")
    token = httpx.post(
        f"{server.url}/api/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "kiosk-cli",
            "client_secret": secret,
        },
    ).json()
    assert token["scope"] == "kiosk:print"
    kiosk = {"Authorization": f"Bearer {token['access_token']}"}
    answer = _lookup(server, kiosk, qr="A" * 24)
    assert answer.status_code == 404 and answer.json()["error"] == "unknown_code"
    assert cli("disable", "kiosk-cli").returncode == 0
    assert _lookup(server, kiosk, qr="A" * 24).status_code == 401


def test_kiosk__simultaneous_confirmations_print_once(
    live_server: LiveServer, listener: HL7Listener
) -> None:
    """Eight confirmations of one report at the same moment under max_prints = 1, never:
    exactly one is recorded (the report row lock on PostgreSQL, the write lock on SQLite)."""
    server = live_server
    _policy(server, max_prints=1, reprint=ReprintPolicy.NEVER)
    send(listener, oru("S1", accession="KSK600", patient="P600"))
    render(server)
    rid = report_id(server, "KSK600")
    kiosk = register_kiosk(server)
    with server.archive.db.session() as session:
        token = tokens.issue(session, purpose="report", person_id=None, report_id=rid)
    ticket = _lookup(server, kiosk, qr=token).json()["ticket"]
    barrier = threading.Barrier(8)

    def confirm() -> int:
        barrier.wait()
        return _printed(server, kiosk, rid, ticket).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(lambda _: confirm(), range(8)))
    assert statuses == [200] + [403] * 7
    with server.archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(KioskPrint)) == 1
