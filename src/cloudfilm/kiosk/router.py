"""The kiosk API (``/api/kiosk``): lookup, PDF, print confirmation, staff reprint approval.

A kiosk is an integration client holding ``kiosk:print`` (``cloudfilm client create NAME
--scope kiosk:print``); it calls with its bearer token, and after a lookup also with the
ticket it got (``X-Kiosk-Ticket``). Reprint approval is for signed-in staff holding
``kiosk:approve``. Each request leaves one audit record (``kiosk-lookup``, ``report-read``,
``kiosk-printed``, ``kiosk-refused``, ``kiosk-reprint-approved``; refusals by the guard are
``authentication-failed`` / ``access-denied``). Errors are ``{"error": code, "message":
"中文 · English"}``; the codes are listed in docs/kiosk-api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import AuthError, Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import BadRequest, Conflict, NotFound
from cloudfilm.httpaudit import note
from cloudfilm.kiosk import service, tickets
from cloudfilm.kiosk.service import KioskRefused, NothingToPrint
from cloudfilm.kiosk.tickets import Ticket, TicketRefused
from cloudfilm.mpi import service as mpi

if TYPE_CHECKING:
    from datetime import datetime

    from cloudfilm.archive.ingest import Archive

router = APIRouter(prefix="/api/kiosk", tags=["kiosk"])

TICKET_HEADER = "X-Kiosk-Ticket"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed input (scanned text, card number)"},
    401: {"description": "no or invalid bearer token: not a registered kiosk"},
    403: {
        "description": "not a kiosk (no kiosk:print), ticket invalid or expired, or the "
        "reprint policy refuses another print"
    },  # fmt: skip
    404: {"description": "unknown code or card, or no printable report"},
}


def _kiosk(
    request: Request, caller: Annotated[Principal, Depends(Permit(Permission.KIOSK_PRINT))]
) -> Principal:
    """A registered kiosk: an integration client with ``kiosk:print``, never a user."""
    if caller.user_id is not None:  # kiosk:print is never granted to a role; belt and braces
        note(request, AuditEventType.KIOSK_REFUSED, AuditAction.EXECUTE, "kiosk", caller.name,
             detail={"refused": "not_a_kiosk"})  # fmt: skip
        raise AuthError(403, "not_a_kiosk", "仅限已登记的自助机 · for registered kiosks only")
    return caller


_Kiosk = Annotated[Principal, Depends(_kiosk)]
_Approver = Annotated[Principal, Depends(Permit(Permission.KIOSK_APPROVE))]


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _now(request: Request) -> datetime:
    now: datetime = request.app.state.accounts.clock.now()
    return now


class LookupIn(BaseModel):
    """Either the scanned text of a QR code, or a card."""

    model_config = ConfigDict(extra="forbid")

    qr: Annotated[str | None, Field(max_length=4096)] = None
    """The full text the scanner read (``https://.../m/e/<token>``) or the bare token."""
    card_type: Literal["id-card", "medical-card"] | None = None
    card_number: Annotated[str | None, Field(max_length=64)] = None


class ApprovalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=200)] = ""


def _refuse(
    request: Request,
    exc: KioskRefused | NothingToPrint | TicketRefused | BadRequest,
    *,
    event: AuditEventType,
    object_type: str,
    object_id: str | None,
    detail: dict[str, Any] | None = None,
) -> NoReturn:
    code = getattr(exc, "code", "invalid_request")
    status = 400 if isinstance(exc, BadRequest) else 404 if isinstance(exc, NotFound) else 403
    note(request, event, AuditAction.EXECUTE, object_type, object_id,
         detail={**(detail or {}), "refused": code})  # fmt: skip
    raise AuthError(status, code, str(exc)) from exc


def _answer(found: service.Lookup, settings: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ticket": tickets.encode(settings, found.ticket),
        "expires_at": found.ticket.expires_at.isoformat(),
        "patient": {"name": found.name},
        "reports": [
            service.describe(item, decision)
            for item, decision in zip(found.reports, found.decisions, strict=True)
        ],
    }
    if not found.reports:
        body["message"] = (
            "暂无可打印的报告（报告可能尚未发布） · no printable report yet (the report may not "
            "be released yet)"
        )
    return body


@router.post(
    "/lookup",
    summary="Find a patient's printable reports by scanned QR code or card; get a ticket",
    responses=_ERRORS,
)
def lookup(request: Request, body: LookupIn, kiosk: _Kiosk) -> dict[str, Any]:
    archive = _archive(request)
    now = _now(request)
    by = "qr" if body.qr is not None else body.card_type or "none"
    detail: dict[str, Any] = {"by": by}
    try:
        if body.qr is not None and (body.card_type or body.card_number):
            raise BadRequest("请只提供二维码或卡号之一 · give either qr or a card, not both")
        with archive.db.read_session() as session:
            if body.qr is not None:
                found = service.lookup_qr(session, scanned=body.qr, kiosk=kiosk.name, now=now)
            elif body.card_type and body.card_number:
                ident_type = service.CARD_TYPES[body.card_type]
                detail["card"] = mpi.mask(ident_type, body.card_number.strip().upper())
                found = service.lookup_card(
                    session,
                    card_type=body.card_type,
                    number=body.card_number,
                    kiosk=kiosk.name,
                    now=now,
                )
            else:
                raise BadRequest(
                    "请提供二维码内容（qr）或卡类型与卡号（card_type、card_number） · give qr, "
                    "or card_type and card_number"
                )
            answer = _answer(found, archive.settings)
    except (NothingToPrint, BadRequest) as exc:
        _refuse(request, exc, event=AuditEventType.KIOSK_LOOKUP, object_type="kiosk-lookup",
                object_id=kiosk.name, detail=detail)  # fmt: skip
    subject = found.ticket.subject
    note(request, AuditEventType.KIOSK_LOOKUP, AuditAction.EXECUTE, "kiosk-lookup", kiosk.name,
         patient_id=found.patient_id,
         detail={**detail, "subject": str(subject),
                 "reports": [r.report.id for r in found.reports]})  # fmt: skip
    return answer


def _ticket(request: Request, kiosk: Principal, header: str | None, query: str | None) -> Ticket:
    archive = _archive(request)
    return tickets.decode(
        archive.settings, header or query or "", kiosk=kiosk.name, now=_now(request)
    )


_TicketHeader = Annotated[
    str | None,
    Header(alias=TICKET_HEADER, description="The ticket of the lookup (preferred over ?ticket)."),
]
_TicketQuery = Annotated[str | None, Query(max_length=512, description="The ticket, if no header.")]


@router.get(
    "/reports/{report_id}/pdf",
    summary="The report PDF to print (only a report of the ticket's patient, if allowed)",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"application/pdf": {}}}},
)
def report_pdf(
    request: Request,
    report_id: int,
    kiosk: _Kiosk,
    x_kiosk_ticket: _TicketHeader = None,
    ticket: _TicketQuery = None,
) -> Response:
    archive = _archive(request)
    try:
        granted = _ticket(request, kiosk, x_kiosk_ticket, ticket)
        with archive.db.read_session() as session:
            item, data = service.pdf_for(
                session, archive.storage, granted, report_id, now=_now(request)
            )
    except (TicketRefused, NothingToPrint, KioskRefused) as exc:
        _refuse(request, exc, event=AuditEventType.KIOSK_REFUSED, object_type="report",
                object_id=str(report_id), detail={"step": "pdf"})  # fmt: skip
    note(request, AuditEventType.REPORT_READ, AuditAction.READ, "report", str(report_id),
         patient_id=item.report.patient_id or None,
         study_instance_uid=item.report.study_instance_uid or None,
         detail={"kiosk": kiosk.name, "document_uid": item.document.uid,
                 "version": item.version.version, "times_printed": item.prints})  # fmt: skip
    return Response(
        data,
        media_type="application/pdf",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'inline; filename="report-{report_id}.pdf"',
            "X-Times-Printed": str(item.prints),
        },
    )


class PrintedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket: Annotated[str | None, Field(max_length=512)] = None
    """The ticket, if not sent as ``X-Kiosk-Ticket``."""


@router.post(
    "/reports/{report_id}/printed",
    summary="Confirm that the kiosk printed the report (records the print)",
    responses=_ERRORS,
)
def report_printed(
    request: Request,
    report_id: int,
    kiosk: _Kiosk,
    x_kiosk_ticket: _TicketHeader = None,
    body: PrintedIn | None = None,
) -> dict[str, Any]:
    archive = _archive(request)
    now = _now(request)
    try:
        granted = _ticket(request, kiosk, x_kiosk_ticket, body.ticket if body else None)
        with archive.db.session() as session:
            item, row = service.record_print(session, granted, report_id, now=now)
            decision = service.decide(archive.settings.kiosk, item.prints, item.approvals)
            answer = {
                "report_id": report_id,
                "print_id": row.id,
                "printed_at": row.printed_at.isoformat(),
                "times_printed": item.prints,
                "print_allowed": decision.allowed,
                "refusal": (
                    {"code": decision.code, "message": decision.message}
                    if not decision.allowed
                    else None
                ),
            }
    except (TicketRefused, NothingToPrint, KioskRefused) as exc:
        _refuse(request, exc, event=AuditEventType.KIOSK_REFUSED, object_type="report",
                object_id=str(report_id), detail={"step": "printed"})  # fmt: skip
    note(request, AuditEventType.KIOSK_PRINTED, AuditAction.CREATE, "report", str(report_id),
         patient_id=item.report.patient_id or None,
         study_instance_uid=item.report.study_instance_uid or None,
         detail={"kiosk": kiosk.name, "print_id": row.id, "document_uid": item.document.uid,
                 "version": item.version.version, "times_printed": item.prints})  # fmt: skip
    return answer


@router.post(
    "/reports/{report_id}/reprint-approval",
    summary="Allow one more kiosk print of a report (staff, kiosk:approve)",
    responses={
        401: {"description": "not signed in"},
        403: {"description": "not permitted (kiosk:approve)"},
        404: {"description": "no report a kiosk may print (not released, not rendered)"},
        409: {"description": "policy never, or printing is allowed already"},
    },
)
def reprint_approval(
    request: Request, report_id: int, staff: _Approver, body: ApprovalIn | None = None
) -> dict[str, Any]:
    archive = _archive(request)
    reason = body.reason if body else ""
    with archive.db.session() as session:
        try:
            item, row = service.approve_reprint(
                session, report_id=report_id, by=staff.name, reason=reason, now=_now(request)
            )
        except (NotFound, Conflict, BadRequest) as exc:
            status, code = (
                (404, getattr(exc, "code", "report_not_printable"))
                if isinstance(exc, NotFound)
                else (409, "conflict")
                if isinstance(exc, Conflict)
                else (400, "invalid_request")
            )
            note(request, AuditEventType.KIOSK_REPRINT_APPROVED, AuditAction.UPDATE, "report",
                 str(report_id), detail={"refused": code})  # fmt: skip
            raise AuthError(status, code, str(exc)) from exc
        answer = {
            "report_id": report_id,
            "approval_id": row.id,
            "approved_by": row.approved_by,
            "approvals": item.approvals,
            "times_printed": item.prints,
            "print_allowed": service.decide(
                archive.settings.kiosk, item.prints, item.approvals
            ).allowed,
        }
    note(request, AuditEventType.KIOSK_REPRINT_APPROVED, AuditAction.UPDATE, "report",
         str(report_id), patient_id=item.report.patient_id or None,
         detail={"approval_id": row.id, "reason": reason[:200],
                 "document_uid": item.document.uid, "times_printed": item.prints})  # fmt: skip
    return answer
