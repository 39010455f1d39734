"""Reports as data: submissions become versions; approval starts the release timer.

Every way a report arrives (HL7 ORU^R01, FHIR DiagnosticReport, the JSON API) ends in
:func:`submit` inside the caller's transaction (flush, never commit). Rules:

* a report is one exam's: found by accession number, else by Study Instance UID;
* every submission adds a version; nothing is overwritten;
* a final report submitted again is a correction (``corrected``); a preliminary report
  after an approved one is refused (it would un-sign a signed report);
* ``withdrawn`` hides the report from patients and kiosks; a later final reinstates it;
* approval sets ``release_at`` (approval + the release delay of ``settings.reports``);
  the report worker (:mod:`cloudfilm.reports.worker`) renders the PDF and releases it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.billing import service as billing
from cloudfilm.config import Settings
from cloudfilm.db import settings_of
from cloudfilm.errors import BadRequest, Conflict, NotFound
from cloudfilm.orders import service as orders
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports.models import (
    Document,
    DocumentKind,
    Report,
    ReportStatus,
    ReportVersion,
)
from cloudfilm.storage.base import StorageBackend, new_key

_SUFFIX = {"application/pdf": "pdf", "image/png": "png"}

MAX_TEXT = 64 * 1024
"""Characters of findings, impression or recommendation accepted (a long report is ~5 000)."""
MAX_PDF_BYTES = 20 * 1024 * 1024


class InvalidReport(BadRequest):
    """A submission that cannot be a report: it names no exam, or breaks the status rules."""


@dataclass(slots=True)
class ReportData:
    """One submission, whatever door it came through."""

    status: ReportStatus
    accession_number: str = ""
    study_instance_uid: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    patient_id: str = ""
    patient_authority: str = ""
    exam_name: str = ""
    modality: str = ""
    body_part: str = ""
    department: str = ""
    findings: str = ""
    impression: str = ""
    recommendation: str = ""
    examining_doctor: str = ""
    reporting_doctor: str = ""
    reviewing_doctor: str = ""
    examined_at: datetime | None = None
    reported_at: datetime | None = None
    approved_at: datetime | None = None
    critical: bool = False
    key_images: list[str] = field(default_factory=list)
    source_pdf: bytes | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    report: Report
    version: ReportVersion
    outcome: str
    """``created``, ``updated``, ``corrected``, ``withdrawn`` or ``reinstated``."""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: str, name: str, limit: int) -> str:
    value = (value or "").replace("\x00", "").strip()
    if len(value) > limit:
        raise InvalidReport(
            f"{name} 超过 {limit} 个字符 · {name} is longer than {limit} characters"
        )
    return value


def release_delay(settings: Settings, modality: str) -> timedelta:
    rules = settings.reports
    hours = rules.release_delay_by_modality.get(modality.upper(), rules.release_delay_hours)
    return timedelta(hours=hours)


def find_report(
    session: Session, *, accession_number: str = "", study_instance_uid: str = ""
) -> Report | None:
    if accession_number:
        found = session.scalars(
            select(Report).where(Report.accession_number == accession_number)
        ).one_or_none()
        if found is not None:
            return found
    if study_instance_uid:
        return session.scalars(
            select(Report)
            .where(Report.study_instance_uid == study_instance_uid)
            .order_by(Report.id)
            .limit(1)
        ).first()
    return None


def _order_for(session: Session, data: ReportData) -> ImagingOrder | None:
    order = orders.find_order(
        session=session,
        placer=data.placer_order_number or None,
        filler=data.filler_order_number or None,
    )
    if order is None and data.accession_number:
        order = session.scalars(
            select(ImagingOrder)
            .where(ImagingOrder.accession_number == data.accession_number)
            .order_by(ImagingOrder.id.desc())
            .limit(1)
        ).first()
    return order


def resolve_study_uid(session: Session, report: Report, order: ImagingOrder | None) -> str:
    """The report's study: as given, else the order's, else the archived study with the
    report's accession number; empty when none is known yet."""
    if report.study_instance_uid:
        return report.study_instance_uid
    if order is not None and order.study_instance_uid:
        return order.study_instance_uid
    if report.accession_number:
        uid = session.scalars(
            select(Study.study_instance_uid)
            .where(Study.accession_number == report.accession_number)
            .limit(1)
        ).first()
        if uid:
            return uid
    return ""


def store_document(
    session: Session,
    storage: StorageBackend,
    data: bytes,
    *,
    kind: DocumentKind,
    mime_type: str,
    title: str,
    report: Report | None = None,
    version: ReportVersion | None = None,
    order: ImagingOrder | None = None,
    person_id: int | None = None,
    patient_id: str = "",
    accession_number: str = "",
    study_instance_uid: str = "",
    replaces: Document | None = None,
) -> Document:
    """Write the bytes to the storage, then register them (flush only). A rollback leaves
    an unregistered object behind, which scrubbing removes; never an entry without bytes."""
    uid = generate_uid()
    key = new_key(_SUFFIX.get(mime_type, "bin"))
    storage.put(key, data)
    now = _now()
    doc = Document(
        uid=uid,
        kind=kind.value,
        mime_type=mime_type,
        title=title[:200],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key=key,
        person_id=person_id if person_id is not None else (report.person_id if report else None),
        patient_id=(patient_id or (report.patient_id if report else ""))[:64],
        accession_number=(accession_number or (report.accession_number if report else ""))[:64],
        study_instance_uid=(study_instance_uid or (report.study_instance_uid if report else ""))[
            :64
        ],
        report_id=report.id if report else None,
        report_version_id=version.id if version else None,
        order_id=order.id if order else (report.order_id if report else None),
        created_at=now,
    )
    session.add(doc)
    session.flush()
    if replaces is not None:
        replaces.status = "deprecated"
        replaces.replaced_by_id = doc.id
    return doc


def current_document(session: Session, report_id: int, kind: DocumentKind) -> Document | None:
    return session.scalars(
        select(Document)
        .where(
            Document.report_id == report_id,
            Document.kind == kind.value,
            Document.status == "current",
        )
        .order_by(Document.id.desc())
        .limit(1)
    ).first()


def _next_status(report: Report | None, wanted: ReportStatus) -> tuple[ReportStatus, str]:
    if report is None:
        if wanted is ReportStatus.WITHDRAWN:
            raise InvalidReport(
                "撤回的报告不存在 · cannot withdraw a report that was never received"
            )
        return wanted, "created"
    current = ReportStatus(report.status)
    if wanted is ReportStatus.WITHDRAWN:
        return wanted, "withdrawn"
    if current is ReportStatus.WITHDRAWN:
        if wanted is ReportStatus.PRELIMINARY:
            return wanted, "updated"
        return wanted, "reinstated"
    if current.approved:
        if wanted is ReportStatus.PRELIMINARY:
            raise InvalidReport(
                "报告已审核，不能改回初步报告；请发送更正报告 · the report is approved: a "
                "preliminary version cannot follow it (send a corrected report)"
            )
        return ReportStatus.CORRECTED, "corrected"
    return wanted, "updated"


def storage_of(session: Session) -> StorageBackend:
    """The storage of the archive ``session`` belongs to (``Database.info``)."""
    storage = session.info.get("storage")
    if storage is None:
        raise RuntimeError("this session's database has no archive storage attached")
    return storage  # type: ignore[no-any-return]


def submit(
    session: Session,
    *,
    data: ReportData,
    source: str,
    actor: audit.Actor,
    storage: StorageBackend | None = None,
    person_id: int | None = None,
) -> Submitted:
    """Add ``data`` as the newest version of its exam's report (flush only)."""
    accession = _text(data.accession_number, "accession number", 64)
    study_uid = _text(data.study_instance_uid, "Study Instance UID", 64)
    if not accession and not study_uid:
        raise InvalidReport(
            "报告未指明检查：缺少检查号（Accession Number）和 Study Instance UID · the report "
            "names no exam: give an accession number or a Study Instance UID"
        )
    fields = {
        "findings": _text(data.findings, "findings", MAX_TEXT),
        "impression": _text(data.impression, "impression", MAX_TEXT),
        "recommendation": _text(data.recommendation, "recommendation", MAX_TEXT),
    }
    if data.source_pdf is not None:
        if len(data.source_pdf) > MAX_PDF_BYTES:
            raise InvalidReport("报告 PDF 过大 · the report PDF is larger than 20 MB")
        if not data.source_pdf.startswith(b"%PDF-"):
            raise InvalidReport("附带的文件不是 PDF · the attached document is not a PDF")
    settings = settings_of(session)
    report = find_report(session, accession_number=accession, study_instance_uid=study_uid)
    status, outcome = _next_status(report, data.status)
    order = _order_for(session, data)
    now = _now()
    if person_id is None and order is not None:
        person_id = order.person_id
    if report is None:
        report = Report(
            accession_number=accession or (order.accession_number if order else ""),
            study_instance_uid=study_uid,
            status=status.value,
            version_count=0,
            created_at=now,
            updated_at=now,
        )
        session.add(report)
    if study_uid and not report.study_instance_uid:
        report.study_instance_uid = study_uid
    if order is not None and report.order_id is None:
        report.order_id = order.id
    if person_id is not None:
        report.person_id = person_id
    if data.patient_id:
        report.patient_id = data.patient_id[:64]
        report.patient_authority = data.patient_authority[:64]
    elif order is not None and not report.patient_id:
        report.patient_id = order.patient_id
        report.patient_authority = order.patient_authority
    if not report.study_instance_uid:
        report.study_instance_uid = resolve_study_uid(session, report, order)
    session.flush()

    previous = (
        session.get(ReportVersion, report.current_version_id) if report.current_version_id else None
    )
    version = ReportVersion(
        report_id=report.id,
        version=report.version_count + 1,
        status=status.value,
        exam_name=_text(data.exam_name, "exam name", 200)
        or (order.procedure_text if order else "")
        or (previous.exam_name if previous else ""),
        modality=(data.modality or (order.modality if order else "") or "")[:16].upper(),
        body_part=data.body_part[:64],
        department=(data.department or (order.department if order else ""))[:64],
        examining_doctor=data.examining_doctor[:100],
        reporting_doctor=data.reporting_doctor[:100],
        reviewing_doctor=data.reviewing_doctor[:100],
        examined_at=data.examined_at,
        reported_at=data.reported_at,
        approved_at=data.approved_at if status.approved else None,
        critical=data.critical,
        key_images=[uid[:64] for uid in data.key_images[:32]],
        source=source[:128],
        created_at=now,
        **fields,
    )
    session.add(version)
    session.flush()
    if data.source_pdf is not None:
        doc = store_document(
            session,
            storage or storage_of(session),
            data.source_pdf,
            kind=DocumentKind.SOURCE_PDF,
            mime_type="application/pdf",
            title=f"{version.exam_name or '检查报告'}（RIS 原件）",
            report=report,
            version=version,
            replaces=current_document(session, report.id, DocumentKind.SOURCE_PDF),
        )
        version.source_document_id = doc.id

    report.version_count = version.version
    report.current_version_id = version.id
    report.status = status.value
    report.critical = data.critical
    report.updated_at = now
    if status is ReportStatus.WITHDRAWN:
        report.withdrawn_at = now
        report.render_pending = False
        if report.released_at is not None and report.study_instance_uid:
            billing.record_withdrawal(session, study_instance_uid=report.study_instance_uid, at=now)
    else:
        if outcome == "reinstated":  # released again, after the new approval's delay
            report.released_at = None
            report.approved_at = None
        report.withdrawn_at = None
        report.render_pending = status.approved
        report.render_attempts = 0
        report.render_error = None
        if status.approved and report.approved_at is None:
            approved = _aware(data.approved_at) or now
            report.approved_at = approved
            report.release_at = approved + release_delay(settings, version.modality)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.REPORT_RECEIVED,
        action=AuditAction.CREATE if outcome == "created" else AuditAction.UPDATE,
        object_type="report",
        object_id=str(report.id),
        patient_id=report.patient_id or None,
        study_instance_uid=report.study_instance_uid or None,
        source=source[:128],
        message=f"report {outcome}: version {version.version}, status {status.value}",
        detail={
            "version": version.version,
            "status": status.value,
            "outcome": outcome,
            "accession_number": report.accession_number,
            "critical": report.critical,
        },
    )
    return Submitted(report, version, outcome)


def get_report(session: Session, report_id: int) -> Report:
    report = session.get(Report, report_id)
    if report is None:
        raise NotFound(f"报告 {report_id} 不存在 · no report {report_id}")
    return report


def versions_of(session: Session, report: Report) -> list[ReportVersion]:
    return list(
        session.scalars(
            select(ReportVersion)
            .where(ReportVersion.report_id == report.id)
            .order_by(ReportVersion.version)
        )
    )


def current_version(session: Session, report: Report) -> ReportVersion:
    if report.current_version_id is None:
        raise Conflict("报告没有版本 · the report has no version")
    version = session.get(ReportVersion, report.current_version_id)
    assert version is not None
    return version


def is_released(report: Report, now: datetime | None = None) -> bool:
    """Open to the patient and printable: approved, not withdrawn, released."""
    return (
        ReportStatus(report.status).approved
        and report.withdrawn_at is None
        and report.released_at is not None
        and _aware(report.released_at) <= (now or _now())  # type: ignore[operator]
    )


def describe(session: Session, report: Report, *, with_text: bool = True) -> dict[str, Any]:
    version = current_version(session, report)
    out: dict[str, Any] = {
        "id": report.id,
        "accession_number": report.accession_number,
        "study_instance_uid": report.study_instance_uid,
        "patient_id": report.patient_id,
        "status": report.status,
        "version": version.version,
        "critical": report.critical,
        "exam_name": version.exam_name,
        "modality": version.modality,
        "department": version.department,
        "examining_doctor": version.examining_doctor,
        "reporting_doctor": version.reporting_doctor,
        "reviewing_doctor": version.reviewing_doctor,
        "examined_at": _iso(version.examined_at),
        "reported_at": _iso(version.reported_at),
        "approved_at": _iso(report.approved_at),
        "release_at": _iso(report.release_at),
        "released_at": _iso(report.released_at),
        "withdrawn_at": _iso(report.withdrawn_at),
        "pdf_ready": not report.render_pending and report.status != ReportStatus.WITHDRAWN,
    }
    if with_text:
        out.update(
            findings=version.findings,
            impression=version.impression,
            recommendation=version.recommendation,
            key_images=version.key_images,
        )
    return out


def _iso(moment: datetime | None) -> str | None:
    return _aware(moment).isoformat() if moment else None  # type: ignore[union-attr]
