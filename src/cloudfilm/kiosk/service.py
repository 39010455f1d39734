"""Use cases of the self-service printing kiosk: look a patient up, list what may be
printed, hand out the PDF, record the print, and let staff allow a reprint.

Functions take the session keyword-only and flush, never commit (STYLE 2); the kiosk
router owns the transactions and writes each request's audit record.

Rules:

* a kiosk sees only reports that are released (:func:`cloudfilm.reports.service.is_released`)
  and whose current version's PDF is rendered; withdrawn, unreleased or not yet rendered
  versions never appear;
* the print count is per report *version* (its PDF): a corrected report starts at 0;
* ``kiosk.max_prints`` prints are free; then ``kiosk.reprint`` decides: ``allowed`` (up to
  ``kiosk.max_reprints`` more), ``staff-approval`` (one more per approval) or ``never``;
* a card lookup answers the same "no printable report" whether or not the person exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from cloudfilm.auth.models import ApiClient
from cloudfilm.config import KioskSettings, ReprintPolicy, Settings
from cloudfilm.db import settings_of
from cloudfilm.errors import BadRequest, Conflict, NotFound, PermissionDenied
from cloudfilm.kiosk import tickets
from cloudfilm.kiosk.models import KioskPrint, KioskReprintApproval
from cloudfilm.kiosk.tickets import Subject, Ticket
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.keys import keys_of
from cloudfilm.mpi.models import Person, PersonIdentifier
from cloudfilm.mpi.service import mask_name
from cloudfilm.orders.service import LOCAL_ZONE
from cloudfilm.reports.models import Document, DocumentKind, Report, ReportStatus, ReportVersion
from cloudfilm.reports.service import is_released
from cloudfilm.sharing import tokens
from cloudfilm.storage.base import StorageBackend

MAX_SCAN = 1024
"""Characters of scanned text looked at (a report QR code holds about 60)."""
MAX_REPORTS = 50
"""Reports listed per lookup, newest first."""
CARD_TYPES = {"id-card": mpi.ID_CARD, "medical-card": "MC"}
"""Card types a kiosk reads → identifier types of the patient index (HL7 table 0203)."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_APPROVED = (ReportStatus.FINAL.value, ReportStatus.CORRECTED.value)


class KioskRefused(PermissionDenied):
    """A print the reprint policy does not allow now (403)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NothingToPrint(NotFound):
    """Unknown QR code or card, or a report this ticket may not print (404)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


NO_PRINTABLE_REPORT = (
    "no_printable_report",
    "没有可打印的报告；如有疑问请到服务台 · no printable report: please ask at the service desk",
)
UNKNOWN_CODE = (
    "unknown_code",
    "无法识别的二维码，或二维码已失效 · the code is not one of ours, or it is no longer valid",
)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a kiosk may print a report version now, and why not."""

    allowed: bool
    code: str | None = None
    message: str | None = None


@dataclass(slots=True)
class Printable:
    """A report a kiosk may see, with the PDF it would print and its counts."""

    report: Report
    version: ReportVersion
    document: Document
    prints: int = 0
    approvals: int = 0


@dataclass(slots=True)
class Lookup:
    ticket: Ticket
    name: str
    """The masked name (张*三)."""
    reports: list[Printable]
    decisions: list[Decision]
    patient_id: str | None
    """For the audit record only: the hospital patient ID of the first report."""


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- policy


def decide(policy: KioskSettings, prints: int, approvals: int) -> Decision:
    """What ``policy`` allows for a version printed ``prints`` times with ``approvals``."""
    allowance = policy.max_prints
    if policy.reprint is ReprintPolicy.ALLOWED:
        allowance += policy.max_reprints + approvals
    elif policy.reprint is ReprintPolicy.STAFF_APPROVAL:
        allowance += approvals
    if prints < allowance:
        return Decision(True)
    if policy.reprint is ReprintPolicy.NEVER:
        return Decision(
            False,
            "reprint_not_allowed",
            f"本报告已打印 {prints} 次，自助机不再补打，请到服务台办理 · this report was "
            f"printed {prints} time(s); kiosks make no reprints: please ask at the service desk",
        )
    if policy.reprint is ReprintPolicy.STAFF_APPROVAL:
        return Decision(
            False,
            "approval_required",
            f"本报告已打印 {prints} 次，补打需服务台工作人员确认 · this report was printed "
            f"{prints} time(s); a reprint needs approval by staff at the service desk",
        )
    return Decision(
        False,
        "print_limit_reached",
        f"本报告已达打印次数上限（{prints} 次），请到服务台办理 · this report reached its "
        f"print limit ({prints} prints): please ask at the service desk",
    )


# ---------------------------------------------------------------- names and codes


def token_of(scanned: str) -> str:
    """The entry token in a scanned text: the full URL of a report or label QR code
    (``<public url>/m/e/<token>``, any host: the token is what counts) or the bare token.

    Raises
    ------
    BadRequest
        Empty, longer than :data:`MAX_SCAN`, or holding control characters.
    NothingToPrint
        Anything else that is not one of our codes (``unknown_code``).
    """
    text = (scanned or "").strip()
    if not text:
        raise BadRequest("扫码内容为空 · the scanned text is empty")
    if len(text) > MAX_SCAN:
        raise BadRequest(
            f"扫码内容超过 {MAX_SCAN} 个字符 · the scanned text is longer than {MAX_SCAN} "
            "characters"
        )
    if _CONTROL.search(text):
        raise BadRequest("扫码内容含有控制字符 · the scanned text holds control characters")
    candidate = text
    if "/" in text:
        try:
            path = urlsplit(text).path if "://" in text else text
        except ValueError:
            raise NothingToPrint(*UNKNOWN_CODE) from None
        at = path.rfind(tokens.PORTAL_ENTRY_PATH)
        if at < 0:
            raise NothingToPrint(*UNKNOWN_CODE)
        candidate = path[at + len(tokens.PORTAL_ENTRY_PATH) :].strip("/")
    if not _TOKEN.match(candidate):
        raise NothingToPrint(*UNKNOWN_CODE)
    return candidate


# ---------------------------------------------------------------- who


def _person_ids(session: Session, person_id: int) -> list[int]:
    """``person_id`` and every person merged into it (their reports are theirs now)."""
    found = {person_id}
    frontier = [person_id]
    for _ in range(16):  # merge chains are short; a cycle must not loop for ever
        merged = set(session.scalars(select(Person.id).where(Person.merged_into.in_(frontier))))
        frontier = list(merged - found)
        if not frontier:
            break
        found.update(frontier)
    return sorted(found)


def _card_person(session: Session, settings: Settings, card_type: str, number: str) -> int | None:
    """The one (surviving) person holding this card, else ``None`` (none, or several)."""
    ident = mpi.identifier(CARD_TYPES[card_type], "", number)
    query = select(PersonIdentifier.person_id).where(PersonIdentifier.id_type == ident.id_type)
    if ident.sealed:
        keys = keys_of(session)
        query = query.where(
            PersonIdentifier.blind_index == keys.blind_index(ident.id_type, ident.value)
        )
    else:
        query = query.where(PersonIdentifier.value == ident.value)
    if ident.id_type == "MC" and settings.kiosk.medical_card_authority:
        query = query.where(PersonIdentifier.authority == settings.kiosk.medical_card_authority)
    holders: set[int] = set()
    for person_id in session.scalars(query.limit(8)):
        person = session.get(Person, person_id)
        if person is not None:
            holders.add(mpi.resolve(session, person).id)
    return holders.pop() if len(holders) == 1 else None


# ---------------------------------------------------------------- what


_PRINTS = (
    select(func.count(KioskPrint.id))
    .where(KioskPrint.document_id == Document.id)
    .correlate(Document)
    .scalar_subquery()
)
_APPROVALS = (
    select(func.count(KioskReprintApproval.id))
    .where(KioskReprintApproval.document_id == Document.id)
    .correlate(Document)
    .scalar_subquery()
)


def printable_reports(session: Session, subject: Subject, now: datetime) -> list[Printable]:
    """The reports ``subject`` may have printed: released, with the current version's PDF
    rendered; newest release first, at most :data:`MAX_REPORTS`. One query: report, its
    current version, the PDF of that version and its print and approval counts."""
    query = (
        select(Report, ReportVersion, Document, _PRINTS, _APPROVALS)
        .join(ReportVersion, ReportVersion.id == Report.current_version_id)
        # The PDF of the *current* version: while a correction is being rendered the
        # report is not printable (never print the superseded text).
        .join(
            Document,
            and_(
                Document.report_id == Report.id,
                Document.report_version_id == Report.current_version_id,
                Document.kind == DocumentKind.REPORT_PDF.value,
                Document.status == "current",
            ),
        )
        .where(
            Report.status.in_(_APPROVED),
            Report.withdrawn_at.is_(None),
            Report.released_at.is_not(None),
            Report.released_at <= now,
            Report.render_pending.is_(False),
        )
    )
    if subject.kind == "person":
        query = query.where(Report.person_id.in_(_person_ids(session, subject.id)))
    else:
        query = query.where(Report.id == subject.id)
    query = query.order_by(Report.released_at.desc(), Report.id.desc()).limit(MAX_REPORTS)
    return [
        Printable(report, version, doc, int(prints or 0), int(approvals or 0))
        for report, version, doc, prints, approvals in session.execute(query)
        if is_released(report, now)
    ]


def _name_of(session: Session, subject: Subject, reports: list[Printable]) -> str:
    person_id: int | None = subject.id if subject.kind == "person" else None
    if person_id is None and reports:
        person_id = reports[0].report.person_id
    person = session.get(Person, person_id) if person_id is not None else None
    return mask_name(person.name) if person is not None else ""


def _lookup(
    session: Session, subject: Subject, *, kiosk: str, now: datetime, settings: Settings
) -> Lookup:
    reports = printable_reports(session, subject, now)
    return Lookup(
        ticket=tickets.issue(settings, kiosk=kiosk, subject=subject, now=now),
        name=_name_of(session, subject, reports),
        reports=reports,
        decisions=[decide(settings.kiosk, r.prints, r.approvals) for r in reports],
        patient_id=(reports[0].report.patient_id or None) if reports else None,
    )


def lookup_qr(session: Session, *, scanned: str, kiosk: str, now: datetime | None = None) -> Lookup:
    """Look up the patient of a scanned report or registration QR code.

    A known code answers with its person's printable reports (possibly none yet: the
    patient holds the code, so nothing is revealed); an unknown, expired or revoked one
    raises :class:`NothingToPrint` (``unknown_code``)."""
    now = now or _now()
    settings = settings_of(session)
    entry = tokens.resolve(session, token_of(scanned), now=now)
    if entry is None:
        raise NothingToPrint(*UNKNOWN_CODE)
    person_id = entry.person_id
    report_id = entry.report_id
    if report_id is None and entry.order_id is not None:  # a registration label
        report_id = session.scalars(
            select(Report.id).where(Report.order_id == entry.order_id).order_by(Report.id).limit(1)
        ).first()
    if person_id is None and report_id is not None:
        report = session.get(Report, report_id)
        person_id = report.person_id if report is not None else None
    if person_id is not None:
        person = session.get(Person, person_id)
        subject = Subject("person", mpi.resolve(session, person).id if person else person_id)
    elif report_id is not None:
        subject = Subject("report", report_id)
    else:
        raise NothingToPrint(*NO_PRINTABLE_REPORT)
    return _lookup(session, subject, kiosk=kiosk, now=now, settings=settings)


def lookup_card(
    session: Session, *, card_type: str, number: str, kiosk: str, now: datetime | None = None
) -> Lookup:
    """Look up the patient holding an ID card or medical card.

    An unknown card, a card two persons hold, and a person without a printable report
    all raise the same :class:`NothingToPrint` (``no_printable_report``): a card number
    typed at a kiosk must not tell whether someone is a patient here."""
    if card_type not in CARD_TYPES:
        raise BadRequest(
            "卡类型应为 id-card 或 medical-card · card_type is id-card or medical-card"
        )
    now = now or _now()
    settings = settings_of(session)
    person_id = _card_person(session, settings, card_type, number)
    if person_id is None:
        raise NothingToPrint(*NO_PRINTABLE_REPORT)
    found = _lookup(session, Subject("person", person_id), kiosk=kiosk, now=now, settings=settings)
    if not found.reports:
        raise NothingToPrint(*NO_PRINTABLE_REPORT)
    return found


def describe(item: Printable, decision: Decision) -> dict[str, Any]:
    """A report as a kiosk lists it: no patient ID, no ID numbers, no findings."""
    version = item.version
    moment = version.examined_at or item.report.approved_at
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return {
        "id": item.report.id,
        "exam_name": version.exam_name,
        "modality": version.modality,
        "exam_date": moment.astimezone(LOCAL_ZONE).date().isoformat() if moment else None,
        "version": version.version,
        "corrected": version.status == ReportStatus.CORRECTED.value,
        "times_printed": item.prints,
        "print_allowed": decision.allowed,
        "refusal": (
            {"code": decision.code, "message": decision.message} if not decision.allowed else None
        ),
    }


# ---------------------------------------------------------------- printing


def printable_for(
    session: Session, ticket: Ticket, report_id: int, *, now: datetime | None = None
) -> Printable:
    """The report ``report_id`` if ``ticket`` may print it (released, rendered, its
    person's); else :class:`NothingToPrint` (``report_not_printable``)."""
    now = now or _now()
    for item in printable_reports(session, ticket.subject, now):
        if item.report.id == report_id:
            return item
    raise NothingToPrint(
        "report_not_printable",
        f"报告 {report_id} 不在本凭证可打印的报告中 · report {report_id} is not among the "
        "reports this ticket may print",
    )


def _checked(
    session: Session, ticket: Ticket, report_id: int, now: datetime, *, lock: bool
) -> Printable:
    if lock:
        # On PostgreSQL the row lock puts two confirmations of one report in line, so the
        # count each one checks includes the other's print.
        session.get(Report, report_id, with_for_update=True)
    item = printable_for(session, ticket, report_id, now=now)
    decision = decide(settings_of(session).kiosk, item.prints, item.approvals)
    if not decision.allowed:
        assert decision.code is not None and decision.message is not None
        raise KioskRefused(decision.code, decision.message)
    return item


def pdf_for(
    session: Session,
    storage: StorageBackend,
    ticket: Ticket,
    report_id: int,
    *,
    now: datetime | None = None,
) -> tuple[Printable, bytes]:
    """The PDF a kiosk is about to print, if the reprint policy allows a print now."""
    item = _checked(session, ticket, report_id, now or _now(), lock=False)
    return item, storage.read(item.document.storage_key)


def record_print(
    session: Session, ticket: Ticket, report_id: int, *, now: datetime | None = None
) -> tuple[Printable, KioskPrint]:
    """Record that the ticket's kiosk printed ``report_id`` (flush only); refused with
    :class:`KioskRefused` when the reprint policy does not allow another print."""
    now = now or _now()
    item = _checked(session, ticket, report_id, now, lock=True)
    client_id = session.scalar(select(ApiClient.id).where(ApiClient.name == ticket.kiosk))
    row = KioskPrint(
        report_id=item.report.id,
        document_id=item.document.id,
        kiosk_client_id=client_id,
        kiosk=ticket.kiosk[:64],
        printed_at=now,
    )
    session.add(row)
    session.flush()
    item.prints += 1
    return item, row


def approve_reprint(
    session: Session, *, report_id: int, by: str, reason: str = "", now: datetime | None = None
) -> tuple[Printable, KioskReprintApproval]:
    """Allow one more kiosk print of ``report_id``'s current version (flush only).

    Raises
    ------
    NotFound
        The report is not one a kiosk may print (not released, not rendered, withdrawn).
    Conflict
        The policy is ``never``, or a print is allowed already (nothing to approve).
    """
    now = now or _now()
    settings = settings_of(session)
    if settings.kiosk.reprint is ReprintPolicy.NEVER:
        raise Conflict(
            "补打策略为 never：自助机不补打，请在服务台打印 · the reprint policy is never: "
            "kiosks make no reprints, print it at the service desk"
        )
    if _CONTROL.search(reason) or len(reason) > 200:
        raise BadRequest(
            "补打原因最多 200 个字符，且不含控制字符 · the reason is at most 200 characters, "
            "without control characters"
        )
    session.get(Report, report_id, with_for_update=True)
    item = printable_for(session, Ticket("", Subject("report", report_id), now), report_id, now=now)
    if decide(settings.kiosk, item.prints, item.approvals).allowed:
        raise Conflict(
            "该报告现在即可在自助机打印，无需批准 · this report may be printed at a kiosk now: "
            "nothing to approve"
        )
    row = KioskReprintApproval(
        report_id=item.report.id,
        document_id=item.document.id,
        approved_by=by[:128],
        reason=reason.strip(),
        approved_at=now,
    )
    session.add(row)
    session.flush()
    item.approvals += 1
    return item, row
