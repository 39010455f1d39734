"""``/api/portal/entry/...``: the patient's door of a report QR code, registration label or
SMS link (:mod:`cloudfilm.sharing.portal`). Public routes: the entry token and the identity
check are the credentials; the session then opens one exam."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType
from cloudfilm.auth.guard import AuthError, Permit, client_address
from cloudfilm.errors import CloudFilmError, NotFound, PermissionDenied
from cloudfilm.reports.models import DocumentKind
from cloudfilm.reports.service import current_document
from cloudfilm.sharing import portal

router = APIRouter(
    prefix="/api/portal", tags=["portal"], dependencies=[Depends(Permit.public_route())]
)


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _patient(request: Request) -> audit.Actor:
    return audit.Actor(ActorType.ANONYMOUS, "patient", source=client_address(request))


class IdCardCheck(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    """The patient's name as on the ID card."""
    id_number: Annotated[str, Field(min_length=15, max_length=32)]
    """The 18-digit resident ID-card number (GB 11643)."""


@router.get("/entry/{token}", summary="What an entry link opens (before the identity check)")
def get_entry(token: str, request: Request) -> dict[str, Any]:
    archive = _archive(request)
    with archive.db.session() as session:
        row = portal.lookup(session, token, _patient(request))
        found = portal.describe_entry(session, row) if row is not None else None
    if found is None:
        raise NotFound(portal.UNKNOWN)
    return found


@router.post(
    "/entry/{token}/verify",
    summary="Identity check by name and ID-card number; a session for this exam",
)
def verify(token: str, body: IdCardCheck, request: Request) -> dict[str, Any]:
    archive = _archive(request)
    refused: CloudFilmError | None = None
    with archive.db.session() as session:
        row = portal.lookup(session, token, _patient(request))
        if row is None:
            refused = NotFound(portal.UNKNOWN)
        else:
            try:
                result = portal.verify_id_card(
                    session, row, name=body.name, id_number=body.id_number,
                    actor=_patient(request),
                )  # fmt: skip
            except (PermissionDenied, NotFound) as exc:  # the failure is counted and audited
                refused = exc
    if refused is not None:
        raise refused
    return {"session": result.value, "expires_in": result.expires_in}


def _session_value(authorization: str | None) -> str:
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise AuthError(401, "unauthenticated", "需要先完成身份验证 · verify your identity first")
    return value.strip()


@router.get("/exam", summary="The exam of the verified session: progress and released report")
def exam(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    archive = _archive(request)
    with archive.db.session() as session:
        row = portal.open_session(session, _session_value(authorization))
        view = portal.exam_view(session, row)
        if view["report"] is not None:
            portal.first_view(session, row)
            audit.record(
                session=session,
                actor=_patient(request),
                event_type=AuditEventType.REPORT_READ,
                action=AuditAction.READ,
                object_type="report",
                object_id=str(view["report"]["id"]),
                patient_id=row.patient_id or None,
                message="patient read the report (portal)",
            )
    return view


@router.get(
    "/exam/report.pdf",
    summary="The released report PDF of the verified session's exam",
    response_class=Response,
)
def exam_pdf(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    archive = _archive(request)
    with archive.db.session() as session:
        row = portal.open_session(session, _session_value(authorization))
        report = portal.report_of_entry(session, row)
        doc = current_document(session, report.id, DocumentKind.REPORT_PDF)
        if doc is None:
            raise NotFound("报告 PDF 正在生成 · the report PDF is being rendered")
        audit.record(
            session=session,
            actor=_patient(request),
            event_type=AuditEventType.REPORT_READ,
            action=AuditAction.READ,
            object_type="report",
            object_id=str(report.id),
            patient_id=row.patient_id or None,
            message="patient downloaded the report PDF (portal)",
            detail={"document_uid": doc.uid},
        )
        key = doc.storage_key
    return Response(
        archive.storage.read(key),
        media_type="application/pdf",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": 'inline; filename="report.pdf"',
        },
    )
