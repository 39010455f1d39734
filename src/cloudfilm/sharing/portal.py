"""The patient's way in through an entry token (report QR code, registration label, SMS
link): an identity check, then a short-lived session that opens this exam and no other.

Checks (see ../shared/SECURITY-CHECKS.md group C): the ID-card number (GB 11643, compared
by its blind index, never in clear) together with the name. Five failures in a row lock
the token for fifteen minutes; every check is audited. The session is a signed, expiring
value naming the token and the person; the full patient portal (phone + SMS code, WeChat,
history across exams) builds on it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.config import Settings
from cloudfilm.crypto.keys import application_secret
from cloudfilm.db import settings_of
from cloudfilm.errors import BadRequest, NotFound, PermissionDenied
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.keys import keys_of
from cloudfilm.mpi.models import Person, PersonIdentifier
from cloudfilm.orders.models import ImagingOrder, OrderStatus
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import Report
from cloudfilm.sharing import tokens
from cloudfilm.sharing.models import EntryToken

SESSION_SECONDS = 30 * 60
MAX_FAILED_CHECKS = 5
LOCK = timedelta(minutes=15)
_SALT = "cloudfilm-portal-session-v1"
_UNKNOWN = "链接无效或已过期 · the link is invalid or has expired"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _same_name(given: str, on_file: str) -> bool:
    def norm(text: str) -> str:
        return "".join(unicodedata.normalize("NFKC", text).split()).replace("^", "").casefold()

    return bool(given.strip()) and norm(given) == norm(on_file)


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(application_secret(settings).decode("utf-8"), salt=_SALT)


def lookup(session: Session, token: str, actor: audit.Actor) -> EntryToken | None:
    """The live entry of ``token``, or None (the refusal audited: commit it)."""
    row = tokens.resolve(session, token)
    if row is None:
        _refused(session, actor, None, "unknown or expired token")
    return row


UNKNOWN = _UNKNOWN


def _refused(session: Session, actor: audit.Actor, row: EntryToken | None, why: str) -> None:
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.ENTRY_REFUSED,
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.MINOR_FAILURE,
        object_type="entry-token",
        object_id=str(row.id) if row else None,
        patient_id=row.patient_id or None if row else None,
        message=f"patient entry refused: {why}",
        detail={"reason": why},
    )


def describe_entry(session: Session, row: EntryToken) -> dict[str, Any]:
    """What the entry page may show before the check: the hospital, the masked name and
    the ways to prove identity."""
    settings = settings_of(session)
    person = session.get(Person, row.person_id) if row.person_id else None
    methods = []
    if person is not None and _id_cards(session, person.id):
        methods.append("id-card")
    return {
        "purpose": row.purpose,
        "hospital": settings.reports.hospital_name,
        "name": mpi.mask_name(person.name) if person else "",
        "methods": methods,
        "locked": bool(row.locked_until and _aware(row.locked_until) > _now()),
    }


def _id_cards(session: Session, person_id: int) -> list[PersonIdentifier]:
    return list(
        session.scalars(
            select(PersonIdentifier).where(
                PersonIdentifier.person_id == person_id, PersonIdentifier.id_type == mpi.ID_CARD
            )
        )
    )


@dataclass(frozen=True, slots=True)
class PortalSession:
    entry_id: int
    person_id: int
    value: str
    expires_in: int = SESSION_SECONDS


def verify_id_card(
    session: Session, row: EntryToken, *, name: str, id_number: str, actor: audit.Actor
) -> PortalSession:
    """Check name + ID-card number against the token's person; a session, or
    ``PermissionDenied`` (audited, counted towards the lock)."""
    now = _now()
    if row.locked_until is not None and _aware(row.locked_until) > now:
        _refused(session, actor, row, "locked after repeated failures")
        raise PermissionDenied(
            "验证失败次数过多，请 15 分钟后再试 · too many failed checks: try again in 15 minutes"
        )
    try:
        number = mpi.identifier(mpi.ID_CARD, "", id_number).value
    except mpi.InvalidIdentifier as exc:
        raise BadRequest(str(exc)) from exc
    person = session.get(Person, row.person_id) if row.person_id else None
    keys = keys_of(session)
    index = keys.blind_index(mpi.ID_CARD, number)
    matches = person is not None and any(
        ident.blind_index == index for ident in _id_cards(session, person.id)
    )
    if not (matches and person is not None and _same_name(name, person.name)):
        row.failed_checks += 1
        if row.failed_checks >= MAX_FAILED_CHECKS:
            row.locked_until = now + LOCK
            row.failed_checks = 0
        session.flush()
        _refused(session, actor, row, "name or ID-card number does not match")
        raise PermissionDenied("姓名或身份证号不符 · the name or ID-card number does not match")
    row.failed_checks = 0
    row.locked_until = None
    value = _serializer(settings_of(session)).dumps({"e": row.id, "p": person.id})
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.ENTRY_VERIFIED,
        action=AuditAction.EXECUTE,
        object_type="entry-token",
        object_id=str(row.id),
        patient_id=row.patient_id or None,
        study_instance_uid=row.study_instance_uid or None,
        message="patient verified by ID-card number and name",
        detail={"method": "id-card", "purpose": row.purpose},
    )
    return PortalSession(row.id, person.id, value)


def _unauthenticated(message: str) -> Exception:
    from cloudfilm.auth.guard import AuthError  # the HTTP edge's error, rendered as 401

    return AuthError(401, "unauthenticated", message)


def open_session(session: Session, value: str) -> EntryToken:
    """The entry a portal session opens; 401 when it is forged, expired, or its token was
    revoked since."""
    try:
        data = _serializer(settings_of(session)).loads(value, max_age=SESSION_SECONDS)
    except SignatureExpired as exc:
        raise _unauthenticated(
            "会话已过期，请重新验证 · the session expired: verify again"
        ) from exc
    except BadSignature as exc:
        raise _unauthenticated("会话无效，请重新验证 · invalid session: verify again") from exc
    row = session.get(EntryToken, int(data["e"]))
    if row is None or row.revoked_at is not None or row.person_id != data["p"]:
        raise _unauthenticated("会话无效，请重新验证 · invalid session: verify again")
    return row


def exam_view(session: Session, row: EntryToken) -> dict[str, Any]:
    """The one exam of the entry: where it stands, and its report once released."""
    report = session.get(Report, row.report_id) if row.report_id else None
    order = session.get(ImagingOrder, row.order_id) if row.order_id else None
    if report is None and order is not None:
        report = reports.find_report(
            session,
            accession_number=order.accession_number,
            study_instance_uid=order.study_instance_uid,
        )
    study_uid = (report.study_instance_uid if report else "") or row.study_instance_uid
    if not study_uid and order is not None:
        study_uid = order.study_instance_uid
    accession = (report.accession_number if report else "") or row.accession_number
    study = None
    if study_uid:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    elif accession:
        study = session.scalars(select(Study).where(Study.accession_number == accession)).first()
    released = report is not None and reports.is_released(report)
    cancelled = order is not None and order.status == OrderStatus.CANCELLED.value
    steps = {
        "registered": order is not None or report is not None,
        "examined": study is not None
        or (order is not None and order.status == OrderStatus.COMPLETED.value),
        "reported": report is not None and report.status != "withdrawn",
        "released": released,
    }
    view: dict[str, Any] = {
        "exam": (order.procedure_text if order else "")
        or (reports.current_version(session, report).exam_name if report else ""),
        "accession_number": accession,
        "status": "cancelled"
        if cancelled
        else next(
            (k for k in ("released", "reported", "examined", "registered") if steps[k]),
            "registered",
        ),
        "steps": steps,
        "images": bool(study),
        "study_instance_uid": study.study_instance_uid if study else None,
        "report": None,
    }
    if released and report is not None:
        view["report"] = reports.describe(session, report)
        for key in ("patient_id", "study_instance_uid"):
            view["report"].pop(key, None)
    return view


def first_view(session: Session, row: EntryToken) -> int | None:
    """The patient opened the released report: the cloud-film charge when billing charges
    on first view (``billing.charge_event = "first-view"``; a repeat returns the same
    charge, and nothing happens when billing charges on release)."""
    report = report_of_entry(session, row)
    if not report.study_instance_uid:
        return None
    from cloudfilm.reports.release import charge  # release builds on sharing

    return charge(session, report, reports.current_version(session, report), "first-view", _now())


def report_of_entry(session: Session, row: EntryToken) -> Report:
    """The released report of the entry's exam, for the PDF."""
    view_report = session.get(Report, row.report_id) if row.report_id else None
    if view_report is None and row.order_id:
        order = session.get(ImagingOrder, row.order_id)
        if order is not None:
            view_report = reports.find_report(
                session,
                accession_number=order.accession_number,
                study_instance_uid=order.study_instance_uid,
            )
    if view_report is None or not reports.is_released(view_report):
        raise NotFound("报告尚未发布 · the report is not released yet")
    return view_report
