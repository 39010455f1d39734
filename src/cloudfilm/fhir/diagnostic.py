"""FHIR R4 DiagnosticReport (create, update = a new version, read, search) and Binary (the
report PDFs of the document registry), on the reports of :mod:`cloudfilm.reports`.

Mapping: ``identifier`` (system ``urn:cloudfilm:accession``) the accession number;
``basedOn`` the ServiceRequest; ``imagingStudy`` the study (id = Study Instance UID);
``status`` preliminary | final | corrected (amended) | entered-in-error (withdrawn);
``conclusion`` the impression; the findings a contained Observation coded LOINC 59776-5
(Procedure findings) referenced from ``result``; ``performer`` the reporting doctor,
``resultsInterpreter`` the reviewing doctor; ``effectiveDateTime`` the exam, ``issued`` the
approval; ``presentedForm`` the rendered PDF (a Binary url) — or, on input, a PDF the RIS
sends (base64 ``data``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import ColumnElement, func, select

from cloudfilm.archive.models import Patient, Study
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import BadRequest
from cloudfilm.fhir import mapping
from cloudfilm.fhir.params import FHIRError, instant_condition, paging, parse_date, parse_token
from cloudfilm.fhir.requests import _parse_instant
from cloudfilm.fhir.router import (
    _SEARCH_PARAMS,
    DEFAULT_COUNT,
    MAX_COUNT,
    FHIRRoute,
    Reader,
    Searcher,
    _archive,
    _each,
    _entry,
    _id_or_none,
    _page_bundle,
    _parameters,
    _resource_body,
    _respond,
    _row_id,
    _scope,
    fhir_base,
)
from cloudfilm.httpaudit import note
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import Document, DocumentKind, Report, ReportStatus, ReportVersion

router = APIRouter(prefix="/fhir/R4", tags=["FHIR R4"], route_class=FHIRRoute)
Storer = Annotated[Principal, Depends(Permit(Permission.STUDY_STORE))]

LOINC = "http://loinc.org"
FINDINGS_CODE = "59776-5"
IMAGING_REPORT = "18748-4"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
TO_FHIR = {
    "preliminary": "preliminary",
    "final": "final",
    "corrected": "corrected",
    "withdrawn": "entered-in-error",
}
FROM_FHIR = {
    "preliminary": ReportStatus.PRELIMINARY,
    "partial": ReportStatus.PRELIMINARY,
    "final": ReportStatus.FINAL,
    "amended": ReportStatus.CORRECTED,
    "corrected": ReportStatus.CORRECTED,
    "appended": ReportStatus.CORRECTED,
    "entered-in-error": ReportStatus.WITHDRAWN,
    "cancelled": ReportStatus.WITHDRAWN,
}


def _moment(value: Any) -> str | None:
    return mapping.instant(value) if value is not None else None


def diagnostic_report(
    base: str, report: Report, version: ReportVersion, pdf: Document | None, patient_pk: int | None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(report.id),
        "meta": {
            "versionId": str(version.version),
            "lastUpdated": mapping.instant(report.updated_at),
        },
        "status": TO_FHIR[report.status],
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [
                {"system": LOINC, "code": IMAGING_REPORT, "display": "Diagnostic imaging study"}
            ],
            **({"text": version.exam_name} if version.exam_name else {}),
        },
    }
    if report.accession_number:
        resource["identifier"] = [
            {"system": mapping.ACCESSION_SYSTEM, "value": report.accession_number}
        ]
    if report.order_id is not None:
        resource["basedOn"] = [{"reference": f"ServiceRequest/{report.order_id}"}]
    if patient_pk is not None:
        resource["subject"] = {"reference": f"Patient/{patient_pk}"}
    elif report.patient_id:
        resource["subject"] = {
            "identifier": {
                "system": mapping.patient_system(report.patient_authority),
                "value": report.patient_id,
            }
        }
    if effective := _moment(version.examined_at):
        resource["effectiveDateTime"] = effective
    if issued := _moment(version.approved_at or report.approved_at or version.reported_at):
        resource["issued"] = issued
    if version.reporting_doctor:
        resource["performer"] = [{"display": version.reporting_doctor}]
    if version.reviewing_doctor:
        resource["resultsInterpreter"] = [{"display": version.reviewing_doctor}]
    if version.findings:
        resource["contained"] = [
            {
                "resourceType": "Observation",
                "id": "findings",
                "status": "final" if report.status != "preliminary" else "preliminary",
                "code": {
                    "coding": [
                        {"system": LOINC, "code": FINDINGS_CODE, "display": "Procedure findings"}
                    ],
                    "text": "检查所见",
                },
                "valueString": version.findings,
            }
        ]
        resource["result"] = [{"reference": "#findings"}]
    if report.study_instance_uid:
        resource["imagingStudy"] = [{"reference": f"ImagingStudy/{report.study_instance_uid}"}]
    if version.impression:
        resource["conclusion"] = version.impression
    if pdf is not None:
        form = {"contentType": "application/pdf", "language": "zh-CN",
                "url": f"{base}/Binary/{pdf.uid}", "size": pdf.size, "title": pdf.title,
                "creation": mapping.instant(pdf.created_at)}  # fmt: skip
        resource["presentedForm"] = [form]
    return resource


def _text_of(items: list[Any]) -> str:
    for item in items or []:
        if isinstance(item, dict) and item.get("display"):
            return str(item["display"])[:100]
    return ""


def read_diagnostic_report(body: Any) -> tuple[reports.ReportData, str | None, int | None]:
    """Validate (fhir.resources) and read a pushed DiagnosticReport: the report data, the
    patient reference (``Patient/id``) and the order id of ``basedOn``."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    if not isinstance(body, dict) or body.get("resourceType") != "DiagnosticReport":
        raise FHIRError(400, "structure", "the body is not a DiagnosticReport resource")
    try:
        DiagnosticReport.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'DiagnosticReport'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise FHIRError(400, "structure", f"invalid DiagnosticReport: {problems}") from exc
    status = FROM_FHIR.get(body.get("status", ""))
    if status is None:
        raise FHIRError(
            422,
            "value",
            f"status: {body.get('status')!r} is not a report (preliminary, final, amended, "
            "corrected, entered-in-error)",
        )
    data = reports.ReportData(status=status)
    for ident in body.get("identifier", []):
        if ident.get("value") and ident.get("system") in (mapping.ACCESSION_SYSTEM, None, ""):
            data.accession_number = str(ident["value"])[:64]
    for ref in body.get("imagingStudy", []):
        text = str(ref.get("reference", ""))
        if text.startswith("ImagingStudy/"):
            data.study_instance_uid = text.removeprefix("ImagingStudy/")[:64]
    order_id = None
    for ref in body.get("basedOn", []):
        text = str(ref.get("reference", ""))
        if text.startswith("ServiceRequest/"):
            order_id = _id_or_none(text.removeprefix("ServiceRequest/"))
    code = body.get("code", {})
    data.exam_name = str(code.get("text") or "")[:200]
    data.impression = str(body.get("conclusion") or "")
    contained = {f"#{r.get('id')}": r for r in body.get("contained", []) if isinstance(r, dict)}
    findings = []
    for ref in body.get("result", []):
        obs = contained.get(str(ref.get("reference", "")))
        if obs and obs.get("resourceType") == "Observation" and obs.get("valueString"):
            codes = {c.get("code") for c in obs.get("code", {}).get("coding", [])}
            if FINDINGS_CODE in codes or not codes:
                findings.append(str(obs["valueString"]))
    data.findings = "\n".join(findings)
    data.examined_at = _parse_instant(body.get("effectiveDateTime"), "effectiveDateTime")
    data.approved_at = _parse_instant(body.get("issued"), "issued")
    data.reported_at = data.approved_at
    data.reporting_doctor = _text_of(body.get("performer", []))
    data.reviewing_doctor = _text_of(body.get("resultsInterpreter", []))
    for form in body.get("presentedForm", []):
        if form.get("contentType") == "application/pdf" and form.get("data"):
            try:
                data.source_pdf = base64.b64decode(form["data"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise FHIRError(400, "structure", "presentedForm.data: not base64") from exc
    subject = body.get("subject", {}).get("reference")
    return data, subject, order_id


def _patient_pks(session: Any, rows: list[Report]) -> dict[int, int]:
    ids = {r.patient_id for r in rows if r.patient_id}
    if not ids:
        return {}
    found = dict(
        session.execute(
            select(Patient.patient_id, Patient.id).where(Patient.patient_id.in_(ids))
        ).all()
    )
    return {r.id: found[r.patient_id] for r in rows if r.patient_id in found}


def _as_fhir(request: Request, session: Any, rows: list[Report]) -> list[dict[str, Any]]:
    base = fhir_base(request)
    pks = _patient_pks(session, rows)
    out = []
    for row in rows:
        version = reports.current_version(session, row)
        pdf = reports.current_document(session, row.id, DocumentKind.REPORT_PDF)
        out.append(diagnostic_report(base, row, version, pdf, pks.get(row.id)))
    return out


def _visible(caller: Principal) -> ColumnElement[bool] | None:
    scope = _scope(caller)
    if scope is None:
        return None
    return Report.study_instance_uid.in_(select(Study.study_instance_uid).where(scope))


def _one(session: Any, id: str, caller: Principal) -> Report:  # noqa: A002
    stmt = select(Report).where(Report.id == _row_id("DiagnosticReport", id))
    if (visible := _visible(caller)) is not None:
        stmt = stmt.where(visible)
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise FHIRError(404, "not-found", f"no DiagnosticReport {id[:64]!r} in this archive")
    return row  # type: ignore[no-any-return]


def _patient_condition(raw: str) -> ColumnElement[bool]:
    pk = _id_or_none(raw.removeprefix("Patient/"))
    return Report.patient_id.in_(select(Patient.patient_id).where(Patient.id == pk))


def _status_condition(raw: str) -> ColumnElement[bool]:
    code = parse_token(raw).code
    return Report.status.in_([ours for ours, theirs in TO_FHIR.items() if theirs == code] or ["-"])


def _conditions(values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    conditions = _each(values, "_id", lambda v: Report.id == _id_or_none(v))
    conditions += _each(
        values, "identifier", lambda v: Report.accession_number == parse_token(v).code
    )
    for name in ("patient", "subject"):
        conditions += _each(values, name, _patient_condition)
    conditions += _each(values, "status", _status_condition)
    conditions += _each(
        values, "issued", lambda v: instant_condition(Report.approved_at, parse_date("issued", v))
    )
    conditions += _each(
        values, "based-on",
        lambda v: Report.order_id == _id_or_none(v.removeprefix("ServiceRequest/")),
    )  # fmt: skip
    return conditions


@router.get("/DiagnosticReport", summary="Search reports")
def search_reports(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["DiagnosticReport"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(Report).where(*_conditions(values))
    if (visible := _visible(caller)) is not None:
        stmt = stmt.where(visible)
    with _archive(request).db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows = (
            list(
                session.scalars(
                    stmt.order_by(Report.updated_at.desc(), Report.id.desc())
                    .limit(page.count)
                    .offset(page.offset)
                )
            )
            if page.count
            else []
        )
        resources = _as_fhir(request, session, rows)
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "DiagnosticReport")
    base = fhir_base(request)
    return _respond(
        _page_bundle(request, "DiagnosticReport", page, total, [_entry(base, r) for r in resources])
    )


@router.get("/DiagnosticReport/{id}", summary="Read a report")
def read_report(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    with _archive(request).db.read_session() as session:
        row = _one(session, id, caller)
        [resource] = _as_fhir(request, session, [row])
        patient_id = row.patient_id
    note(request, AuditEventType.REPORT_READ, AuditAction.READ, "fhir", f"DiagnosticReport/{id}",
         patient_id=patient_id or None)  # fmt: skip
    return _respond(resource)


def _apply(
    request: Request, caller: Principal, body: Any, id: str | None
) -> tuple[dict[str, Any], int]:  # noqa: A002
    data, subject, order_id = read_diagnostic_report(body)
    if id is not None and body.get("id") != id:
        raise FHIRError(400, "invalid", f"id: the body's id must be {id!r} (the URL's)")
    archive = _archive(request)
    actor = caller.actor(request.client.host if request.client else None)
    with archive.db.session() as session:
        if id is not None:
            existing = _one(session, id, caller)
            data.accession_number = existing.accession_number or data.accession_number
            data.study_instance_uid = existing.study_instance_uid or data.study_instance_uid
        if order_id is not None:
            from cloudfilm.orders.models import ImagingOrder

            order = session.get(ImagingOrder, order_id)
            if order is None:
                raise FHIRError(422, "not-found", f"basedOn: no ServiceRequest/{order_id} here")
            data.placer_order_number = order.placer_order_number
            data.filler_order_number = order.filler_order_number
            data.accession_number = data.accession_number or order.accession_number
        if subject:
            row = session.get(Patient, _id_or_none(subject.removeprefix("Patient/")))
            if row is None:
                raise FHIRError(422, "not-found", f"subject: no {subject} here")
            data.patient_id, data.patient_authority = row.patient_id, row.issuer_of_patient_id
        try:
            result = reports.submit(
                session,
                data=data,
                source=f"fhir:{actor.id}"[:128],
                actor=actor,
                storage=archive.storage,
            )
        except BadRequest as exc:
            raise FHIRError(422, "business-rule", str(exc)) from exc
        [resource] = _as_fhir(request, session, [result.report])
        report_id = result.report.id
    return resource, report_id


@router.post("/DiagnosticReport", summary="Create a report (a RIS pushing it)", status_code=201)
async def create_report(request: Request, caller: Storer) -> Response:
    body = await _resource_body(request)
    resource, report_id = await run_in_threadpool(_apply, request, caller, body, None)
    response = _respond(resource, 201)
    response.headers["Location"] = f"{fhir_base(request)}/DiagnosticReport/{report_id}"
    return response


@router.put("/DiagnosticReport/{id}", summary="Update a report (a new version, kept)")
async def update_report(id: str, request: Request, caller: Storer) -> Response:  # noqa: A002
    body = await _resource_body(request)
    resource, _ = await run_in_threadpool(_apply, request, caller, body, id)
    return _respond(resource)


@router.get("/Binary/{id}", summary="A registered document (report PDF)")
def read_binary(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    archive = _archive(request)
    with archive.db.read_session() as session:
        doc = session.scalars(select(Document).where(Document.uid == id[:64])).one_or_none()
        if doc is None or doc.report_id is None:
            raise FHIRError(404, "not-found", f"no Binary {id[:64]!r} in this archive")
        _one(session, str(doc.report_id), caller)  # the caller's data scope
        key, mime, patient_id = doc.storage_key, doc.mime_type, doc.patient_id
    data = archive.storage.read(key)
    note(
        request,
        AuditEventType.REPORT_READ,
        AuditAction.READ,
        "fhir",
        f"Binary/{id}",
        patient_id=patient_id or None,
    )
    accept = request.headers.get("accept", "")
    if "fhir+json" in accept:
        return _respond(
            {
                "resourceType": "Binary",
                "id": id,
                "contentType": mime,
                "data": base64.b64encode(data).decode("ascii"),
            }
        )
    return Response(data, media_type=mime, headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ DocumentReference

#: Document kinds → (LOINC code, display) of DocumentReference.type.
DOCUMENT_TYPES = {
    DocumentKind.REPORT_PDF.value: (IMAGING_REPORT, "Diagnostic imaging study"),
    DocumentKind.SOURCE_PDF.value: (IMAGING_REPORT, "Diagnostic imaging study"),
}
_DOC_STATUS = {"current": "current", "deprecated": "superseded"}
_DOC_TEXT = {
    DocumentKind.REPORT_PDF.value: "诊断报告",
    DocumentKind.SOURCE_PDF.value: "RIS 报告原件",
}


def document_reference(
    base: str, doc: Document, patient_pk: int | None, replaces: list[int]
) -> dict[str, Any]:
    """One entry of the document registry as an R4 DocumentReference (XDS metadata:
    uniqueId = masterIdentifier, classCode = category, typeCode = type)."""
    code, display = DOCUMENT_TYPES.get(doc.kind, (IMAGING_REPORT, "Diagnostic imaging study"))
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": str(doc.id),
        "meta": {"lastUpdated": mapping.instant(doc.created_at)},
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{doc.uid}"},
        "status": _DOC_STATUS.get(doc.status, "current"),
        "type": {"coding": [{"system": LOINC, "code": code, "display": display}],
                 "text": _DOC_TEXT.get(doc.kind, doc.kind)},
        "category": [{"coding": [{"system": LOINC, "code": "LP29684-5", "display": "Radiology"}]}],
        "date": mapping.instant(doc.created_at),
        "content": [{"attachment": {"contentType": doc.mime_type, "url": f"{base}/Binary/{doc.uid}",
                                    "size": doc.size, "title": doc.title,
                                    "creation": mapping.instant(doc.created_at)}}],
    }  # fmt: skip
    if patient_pk is not None:
        resource["subject"] = {"reference": f"Patient/{patient_pk}"}
    elif doc.patient_id:
        resource["subject"] = {"identifier": {"value": doc.patient_id}}
    if replaces:
        resource["relatesTo"] = [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{old}"}}
            for old in replaces
        ]
    related = []
    if doc.report_id is not None:
        related.append({"reference": f"DiagnosticReport/{doc.report_id}"})
    if doc.study_instance_uid:
        related.append({"reference": f"ImagingStudy/{doc.study_instance_uid}"})
    if related:
        resource["context"] = {"related": related}
    return resource


def _documents_as_fhir(
    request: Request, session: Any, rows: list[Document]
) -> list[dict[str, Any]]:
    base = fhir_base(request)
    ids = {d.patient_id for d in rows if d.patient_id}
    pairs = select(Patient.patient_id, Patient.id).where(Patient.patient_id.in_(ids))
    pks = dict(session.execute(pairs).all()) if ids else {}
    replaced: dict[int, list[int]] = {}
    for old_id, new_id in session.execute(
        select(Document.id, Document.replaced_by_id).where(
            Document.replaced_by_id.in_([d.id for d in rows])
        )
    ):
        replaced.setdefault(new_id, []).append(old_id)
    return [
        document_reference(base, d, pks.get(d.patient_id), replaced.get(d.id, [])) for d in rows
    ]


def _visible_documents(caller: Principal) -> ColumnElement[bool] | None:
    scope = _scope(caller)
    if scope is None:
        return None
    return Document.study_instance_uid.in_(select(Study.study_instance_uid).where(scope))


def _document_conditions(values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    def patient(raw: str) -> ColumnElement[bool]:
        pk = _id_or_none(raw.removeprefix("Patient/"))
        return Document.patient_id.in_(select(Patient.patient_id).where(Patient.id == pk))

    def status(raw: str) -> ColumnElement[bool]:
        code = parse_token(raw).code
        return Document.status.in_([k for k, v in _DOC_STATUS.items() if v == code] or ["-"])

    conditions = _each(values, "_id", lambda v: Document.id == _id_or_none(v))
    conditions += _each(
        values, "identifier",
        lambda v: Document.uid == parse_token(v).code.removeprefix("urn:oid:"),
    )  # fmt: skip
    for name in ("patient", "subject"):
        conditions += _each(values, name, patient)
    conditions += _each(values, "status", status)
    conditions += _each(
        values, "date", lambda v: instant_condition(Document.created_at, parse_date("date", v))
    )
    conditions += _each(
        values, "related",
        lambda v: Document.report_id == _id_or_none(v.removeprefix("DiagnosticReport/")),
    )  # fmt: skip
    return conditions


@router.get("/DocumentReference", summary="Search the document registry")
def search_documents(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["DocumentReference"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(Document).where(Document.report_id.is_not(None), *_document_conditions(values))
    if (visible := _visible_documents(caller)) is not None:
        stmt = stmt.where(visible)
    with _archive(request).db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        ordered = stmt.order_by(Document.created_at.desc(), Document.id.desc())
        rows = (
            list(session.scalars(ordered.limit(page.count).offset(page.offset)))
            if page.count
            else []
        )
        resources = _documents_as_fhir(request, session, rows)
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "DocumentReference")
    base = fhir_base(request)
    entries = [_entry(base, r) for r in resources]
    return _respond(_page_bundle(request, "DocumentReference", page, total, entries))


@router.get("/DocumentReference/{id}", summary="Read a document registry entry")
def read_document(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    stmt = select(Document).where(
        Document.id == _row_id("DocumentReference", id), Document.report_id.is_not(None)
    )
    if (visible := _visible_documents(caller)) is not None:
        stmt = stmt.where(visible)
    with _archive(request).db.read_session() as session:
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise FHIRError(404, "not-found", f"no DocumentReference {id[:64]!r} in this archive")
        [resource] = _documents_as_fhir(request, session, [row])
        patient_id = row.patient_id
    note(request, AuditEventType.QUERY, AuditAction.READ, "fhir", f"DocumentReference/{id}",
         patient_id=patient_id or None)  # fmt: skip
    return _respond(resource)
