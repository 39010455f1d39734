"""``/api/reports`` (submit and read reports, their PDF) and ``/api/orders/{id}/label``
(the registration QR label)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit, client_address
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import Conflict, NotFound
from cloudfilm.mpi.models import Person
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import DocumentKind, Report, ReportStatus
from cloudfilm.reports.pdf import local_time
from cloudfilm.sharing import labels, notices, tokens

router = APIRouter(tags=["reports"])

Writer = Annotated[Principal, Depends(Permit(Permission.STUDY_STORE))]
Reader = Annotated[Principal, Depends(Permit(Permission.STUDY_READ))]
Registrar = Annotated[Principal, Depends(Permit(Permission.PATIENT_READ))]


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


class ReportIn(BaseModel):
    """A report as a RIS or reporting system submits it (the JSON twin of ORU^R01)."""

    status: Literal["preliminary", "final", "corrected", "withdrawn"]
    accession_number: Annotated[str, Field(max_length=64)] = ""
    study_instance_uid: Annotated[str, Field(max_length=64)] = ""
    placer_order_number: Annotated[str, Field(max_length=64)] = ""
    filler_order_number: Annotated[str, Field(max_length=64)] = ""
    patient_id: Annotated[str, Field(max_length=64)] = ""
    exam_name: Annotated[str, Field(max_length=200)] = ""
    modality: Annotated[str, Field(max_length=16)] = ""
    body_part: Annotated[str, Field(max_length=64)] = ""
    department: Annotated[str, Field(max_length=64)] = ""
    findings: Annotated[str, Field(max_length=reports.MAX_TEXT)] = ""
    impression: Annotated[str, Field(max_length=reports.MAX_TEXT)] = ""
    recommendation: Annotated[str, Field(max_length=reports.MAX_TEXT)] = ""
    examining_doctor: Annotated[str, Field(max_length=100)] = ""
    reporting_doctor: Annotated[str, Field(max_length=100)] = ""
    reviewing_doctor: Annotated[str, Field(max_length=100)] = ""
    examined_at: datetime | None = None
    reported_at: datetime | None = None
    approved_at: datetime | None = None
    critical: bool = False
    key_images: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)] = []


@router.post(
    "/api/reports", summary="Submit a report version (RIS / reporting system)", status_code=201
)
def submit(body: ReportIn, request: Request, caller: Writer) -> dict[str, Any]:
    archive = _archive(request)
    data = reports.ReportData(**{**body.model_dump(), "status": ReportStatus(body.status)})
    actor = caller.actor(client_address(request))
    with archive.db.session() as session:
        result = reports.submit(
            session, data=data, source=f"api:{actor.id}"[:128], actor=actor, storage=archive.storage
        )
        return {"outcome": result.outcome, **reports.describe(session, result.report)}


def _visible_report(session: Any, caller: Principal, report_id: int) -> Report:
    report: Report | None = session.get(Report, report_id)
    if report is None:
        raise NotFound(f"报告 {report_id} 不存在 · no report {report_id}")
    scope = caller.study_scope
    if scope is not None:
        visible = report.study_instance_uid and session.scalar(
            select(Study.id).where(Study.study_instance_uid == report.study_instance_uid, scope)
        )
        if not visible:  # outside the caller's data scope: as if it did not exist
            raise NotFound(f"报告 {report_id} 不存在 · no report {report_id}")
    return report


@router.get("/api/reports/{report_id}", summary="A report: current version and history")
def get_report(report_id: int, request: Request, caller: Reader) -> dict[str, Any]:
    archive = _archive(request)
    with archive.db.session() as session:
        report = _visible_report(session, caller, report_id)
        out = reports.describe(session, report)
        out["versions"] = [
            {
                "version": v.version,
                "status": v.status,
                "created_at": v.created_at.isoformat(),
                "source": v.source,
                "findings": v.findings,
                "impression": v.impression,
            }
            for v in reports.versions_of(session, report)
        ]
        _audit_read(session, caller, request, report, "report read")
    return out


def _audit_read(
    session: Any, caller: Principal, request: Request, report: Report, what: str
) -> None:
    audit.record(
        session=session,
        actor=caller.actor(client_address(request)),
        event_type=AuditEventType.REPORT_READ,
        action=AuditAction.READ,
        object_type="report",
        object_id=str(report.id),
        patient_id=report.patient_id or None,
        study_instance_uid=report.study_instance_uid or None,
        message=what,
    )


@router.get(
    "/api/reports/{report_id}/pdf", summary="The current report PDF", response_class=Response
)
def report_pdf(report_id: int, request: Request, caller: Reader) -> Response:
    archive = _archive(request)
    with archive.db.session() as session:
        report = _visible_report(session, caller, report_id)
        doc = reports.current_document(session, report.id, DocumentKind.REPORT_PDF)
        if doc is None or report.render_pending:
            raise Conflict("报告 PDF 尚未生成 · the report PDF is not rendered yet")
        _audit_read(session, caller, request, report, "report PDF downloaded")
        key = doc.storage_key
    return Response(
        archive.storage.read(key),
        media_type="application/pdf",
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/api/orders/{order_id}/label.{kind}",
    summary="The registration QR label of an order (PDF 60×40 mm, or PNG at 203 dpi)",
    response_class=Response,
)
def label(
    order_id: int, kind: Literal["pdf", "png"], request: Request, caller: Registrar
) -> Response:
    archive = _archive(request)
    settings = archive.settings
    with archive.db.session() as session:
        order = session.get(ImagingOrder, order_id)
        if order is None:
            raise NotFound(f"医嘱 {order_id} 不存在 · no order {order_id}")
        person = session.get(Person, order.person_id) if order.person_id else None
        url = tokens.entry_url(settings, notices.registration_token(session, order))
        text = labels.LabelText(
            hospital=settings.reports.hospital_name,
            name=person.name if person else "",
            exam=order.procedure_text or order.procedure_code,
            accession=order.accession_number,
            date=local_time(order.scheduled_at),
        )
        audit.record(
            session=session,
            actor=caller.actor(client_address(request)),
            event_type=AuditEventType.LABEL_PRINTED,
            action=AuditAction.READ,
            object_type="order",
            object_id=str(order.id),
            patient_id=order.patient_id or None,
            message=f"registration label ({kind})",
        )
    if kind == "pdf":
        return Response(labels.label_pdf(text, url), media_type="application/pdf")
    return Response(labels.label_png(text, url), media_type="image/png")
