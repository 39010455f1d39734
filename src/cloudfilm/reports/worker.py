"""The report worker: renders the PDF of each newly approved report version, registers it,
stores it as a DICOM Encapsulated PDF in its study, and releases reports whose time came.

Both queues are columns of ``report`` (``render_pending`` with a lease; ``release_at``
without ``released_at``), set in the transaction that stored the report: nothing is lost
when a process dies, and a second worker never renders the same report at the same time.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Patient, Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.dicomweb import rendered
from cloudfilm.mpi.models import Person
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.orders.service import LOCAL_ZONE
from cloudfilm.reports import pdf
from cloudfilm.reports.models import Document, DocumentKind, Report, ReportStatus, ReportVersion
from cloudfilm.reports.service import current_document, store_document
from cloudfilm.sharing import tokens

logger = logging.getLogger(__name__)

ACTOR = audit.Actor.system("reports")
LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 8
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Pass:
    rendered: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    @property
    def worked(self) -> bool:
        return bool(self.rendered or self.released or self.failed)


class ReportWorker:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.settings = archive.settings

    def run_once(self, limit: int = 16) -> Pass:
        done = Pass()
        for report_id in self._due_renders(limit):
            if self._lease(report_id):
                self.render(report_id, done)
        self.release_due(done, limit)
        return done

    # -- rendering ------------------------------------------------------------------------

    def _due_renders(self, limit: int) -> list[int]:
        now = _now()
        with self.archive.db.read_session() as session:
            return list(
                session.scalars(
                    select(Report.id)
                    .where(
                        Report.render_pending.is_(True),
                        or_(Report.render_lease_until.is_(None), Report.render_lease_until < now),
                    )
                    .order_by(Report.id)
                    .limit(limit)
                )
            )

    def _lease(self, report_id: int) -> bool:
        now = _now()
        with self.archive.db.session() as session:
            taken = session.execute(
                update(Report)
                .where(
                    Report.id == report_id,
                    Report.render_pending.is_(True),
                    or_(Report.render_lease_until.is_(None), Report.render_lease_until < now),
                )
                .values(render_lease_until=now + LEASE)
                .execution_options(synchronize_session=False)
            )
            return getattr(taken, "rowcount", 0) == 1

    def render(self, report_id: int, done: Pass) -> None:
        try:
            with self.archive.db.session() as session:
                report = session.get(Report, report_id)
                assert report is not None and report.current_version_id is not None
                version = session.get(ReportVersion, report.current_version_id)
                assert version is not None
                page, order = self._page(session, report, version)
                data, millis = pdf.render_pdf(page, self.settings.reports)
                doc = store_document(
                    session,
                    self.archive.storage,
                    data,
                    kind=DocumentKind.REPORT_PDF,
                    mime_type="application/pdf",
                    title=f"{version.exam_name or '检查报告'} 报告（第 {version.version} 版）",
                    report=report,
                    version=version,
                    order=order,
                    replaces=current_document(session, report.id, DocumentKind.REPORT_PDF),
                )
                report.render_pending = False
                report.render_lease_until = None
                report.render_error = None
                encapsulate = bool(self.settings.reports.encapsulate and report.study_instance_uid)
                audit.record(
                    session=session,
                    actor=ACTOR,
                    event_type=AuditEventType.REPORT_RENDERED,
                    action=AuditAction.CREATE,
                    object_type="report",
                    object_id=str(report.id),
                    patient_id=report.patient_id or None,
                    study_instance_uid=report.study_instance_uid or None,
                    message=f"report PDF rendered in {millis:.0f} ms ({len(data)} bytes)",
                    detail={
                        "document_uid": doc.uid,
                        "version": version.version,
                        "milliseconds": round(millis, 1),
                        "bytes": len(data),
                        "encapsulate": encapsulate,
                    },
                )
                dataset = (
                    encapsulated_pdf(session, report, version, doc, data) if encapsulate else None
                )
            # After the commit: ingest writes the index in its own transaction.
            if dataset is not None:
                self._encapsulate(report_id, dataset)
            done.rendered.append(report_id)
        except Exception as exc:  # noqa: BLE001 - kept for a retry, reported, never lost
            logger.exception("report %s: rendering failed", report_id)
            self._failed(report_id, f"{type(exc).__name__}: {exc}")
            done.failed.append(report_id)

    def _failed(self, report_id: int, error: str) -> None:
        with self.archive.db.session() as session:
            report = session.get(Report, report_id)
            if report is None:
                return
            report.render_attempts += 1
            report.render_error = error[:500]
            if report.render_attempts >= MAX_ATTEMPTS:
                report.render_pending = False  # an operator re-queues it after the fix
                report.render_lease_until = None
            else:
                backoff = timedelta(seconds=min(3600, 15 * 4 ** (report.render_attempts - 1)))
                report.render_lease_until = _now() + backoff

    def _page(
        self, session: Session, report: Report, version: ReportVersion
    ) -> tuple[pdf.ReportPage, ImagingOrder | None]:
        order = session.get(ImagingOrder, report.order_id) if report.order_id else None
        person = session.get(Person, report.person_id) if report.person_id else None
        study = (
            session.scalars(
                select(Study).where(Study.study_instance_uid == report.study_instance_uid)
            ).first()
            if report.study_instance_uid
            else None
        )
        patient_row = session.get(Patient, study.patient_pk) if study is not None else None
        name = (person.name if person else "") or (
            _readable_name(patient_row.patient_name) if patient_row else ""
        )
        sex = (person.sex if person else "") or (patient_row.patient_sex if patient_row else "")
        birth = (person.birth_date if person else "") or (
            getattr(patient_row, "patient_birth_date", "") if patient_row else ""
        )
        token = tokens.issue(
            session,
            purpose="report",
            person_id=report.person_id,
            patient_id=report.patient_id,
            accession_number=report.accession_number,
            study_instance_uid=report.study_instance_uid,
            report_id=report.id,
        )
        ward_bed = ""
        if order is not None and (order.ward or order.bed):
            ward_bed = f"{order.ward} {order.bed}床" if order.bed else order.ward
        exam_time = version.examined_at or (order.scheduled_at if order else None)
        page = pdf.ReportPage(
            patient={
                "name": name,
                "sex": pdf.SEX.get(sex.upper()[:1], sex),
                "age": pdf.age(birth, exam_time or _now()),
                "id": report.patient_id,
            },
            exam={
                "accession_number": report.accession_number,
                "department": version.department or (order.department if order else ""),
                "ward_bed": ward_bed,
                "visit_type": pdf.VISIT.get(order.visit_type, "") if order else "",
                "name": version.exam_name,
                "modality": version.modality,
                "body_part": version.body_part,
                "examined_at": pdf.local_time(exam_time),
                "requesting_doctor": order.requesting_doctor if order else "",
                "status": pdf.STATUS.get(version.status, version.status),
                "version": version.version,
                "reported_at": pdf.local_time(version.reported_at),
                "approved_at": pdf.local_time(version.approved_at or report.approved_at),
            },
            doctors={
                "examining": version.examining_doctor,
                "reporting": version.reporting_doctor,
                "reviewing": version.reviewing_doctor,
            },
            findings=version.findings,
            impression=version.impression,
            recommendation=version.recommendation,
            critical=version.critical,
            url=tokens.entry_url(self.settings, token),
            images=self._key_images(session, version),
            printed_at=_now(),
        )
        return page, order

    def _key_images(self, session: Session, version: ReportVersion) -> list[pdf.KeyImage]:
        wanted = [str(uid) for uid in version.key_images][: self.settings.reports.key_images_max]
        if not wanted:
            return []
        rows = {
            row.sop_instance_uid: row
            for row in session.scalars(
                select(Instance).where(Instance.sop_instance_uid.in_(wanted))
            )
        }
        images: list[pdf.KeyImage] = []
        for number, uid in enumerate(wanted, start=1):
            row = rows.get(uid)
            if row is None:
                continue
            try:
                blob = self.archive.storage.read(row.storage_key)
                jpeg = rendered.render(
                    blob, 1, rendered.RenderOptions("image/jpeg", None, (480, 480), 88)
                )
            except Exception as exc:  # noqa: BLE001 - an image that cannot be shown is left out
                logger.warning("key image %d of a report left out: %s", number, exc)
                continue
            images.append(pdf.KeyImage(jpeg, f"图 {number}"))
        return images

    # -- DICOM Encapsulated PDF -----------------------------------------------------------

    def _encapsulate(self, report_id: int, ds: Dataset) -> None:
        """Store the PDF in its study as a DICOM object; a failure is logged (and audited
        by ingest): the registered PDF stands, and DICOM viewers miss this one."""
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        try:
            result = self.archive.ingest(out.getvalue(), actor=ACTOR)
        except Exception:  # noqa: BLE001 - storage down: the report itself is rendered
            logger.exception("report %s: PDF not stored in its study", report_id)
            return
        if not result.ok:
            logger.warning("report %s: PDF not stored in its study: %s", report_id, result.reason)

    # -- release ----------------------------------------------------------------------------

    def release_due(self, done: Pass, limit: int = 64) -> None:
        now = _now()
        with self.archive.db.read_session() as session:
            due = list(
                session.scalars(
                    select(Report.id)
                    .where(
                        Report.released_at.is_(None),
                        Report.release_at.is_not(None),
                        Report.release_at <= now,
                        Report.status.in_([ReportStatus.FINAL.value, ReportStatus.CORRECTED.value]),
                        Report.withdrawn_at.is_(None),
                    )
                    .order_by(Report.release_at)
                    .limit(limit)
                )
            )
        for report_id in due:
            if self.release(report_id, by=ACTOR):
                done.released.append(report_id)

    def release(self, report_id: int, *, by: audit.Actor, force: bool = False) -> bool:
        """Release one report now (``force``: also a held critical one). False when it
        was released already or cannot be (withdrawn, not approved)."""
        now = _now()
        with self.archive.db.session() as session:
            report = session.get(Report, report_id, with_for_update=True)
            if report is None or report.released_at is not None:
                return False
            if not ReportStatus(report.status).approved or report.withdrawn_at is not None:
                return False
            if report.critical and self.settings.reports.hold_critical and not force:
                return False
            report.released_at = now
            if report.release_at is None or force:
                report.release_at = now
            version = session.get(ReportVersion, report.current_version_id)
            assert version is not None
            from cloudfilm.reports import release as hooks

            queued = hooks.on_release(session, report, version, self.settings, now)
            audit.record(
                session=session,
                actor=by,
                event_type=AuditEventType.REPORT_RELEASED,
                action=AuditAction.UPDATE,
                object_type="report",
                object_id=str(report.id),
                patient_id=report.patient_id or None,
                study_instance_uid=report.study_instance_uid or None,
                message="report released to the patient",
                detail={"version": version.version, **queued},
            )
        return True


def _readable_name(dicom_name: str) -> str:
    """``Zhang^San=张三`` → ``张三`` (the ideographic group when there is one)."""
    groups = dicom_name.split("=")
    chosen = groups[1] if len(groups) > 1 and groups[1] else groups[0]
    return chosen.replace(
        "^", "" if any("\u3400" <= c <= "\u9fff" for c in chosen) else " "
    ).strip()


def encapsulated_pdf(
    session: Session, report: Report, version: ReportVersion, doc: Document, data: bytes
) -> Dataset:
    """The report PDF as a DICOM Encapsulated PDF (PS3.3 A.45.1) in the report's study,
    with the patient and study attributes the archive holds for that study."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == report.study_instance_uid)
    ).first()
    patient = session.get(Patient, study.patient_pk) if study is not None else None
    person = session.get(Person, report.person_id) if report.person_id else None
    now = _now().astimezone(LOCAL_ZONE)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = doc.uid
    ds.PatientName = patient.patient_name if patient else (person.name if person else "")
    ds.PatientID = patient.patient_id if patient else report.patient_id
    if patient is not None and patient.issuer_of_patient_id:
        ds.IssuerOfPatientID = patient.issuer_of_patient_id
    ds.PatientBirthDate = (
        getattr(patient, "patient_birth_date", "")
        if patient
        else (person.birth_date if person else "")
    )
    ds.PatientSex = (patient.patient_sex if patient else (person.sex if person else ""))[:1]
    ds.StudyInstanceUID = report.study_instance_uid
    ds.StudyDate = study.study_date if study else now.strftime("%Y%m%d")
    ds.StudyTime = study.study_time if study else now.strftime("%H%M%S")
    ds.ReferringPhysicianName = study.referring_physician_name if study else ""
    ds.StudyID = study.study_id if study else ""
    ds.AccessionNumber = (study.accession_number if study else report.accession_number)[:16]
    ds.Modality = "DOC"
    # One series per report: every version's PDF is an instance of it.
    ds.SeriesInstanceUID = generate_uid(
        entropy_srcs=["cloudfilm-report-series", str(report.id), report.study_instance_uid]
    )
    ds.SeriesNumber = 9900
    ds.SeriesDescription = "诊断报告 Report"
    ds.Manufacturer = "Cloud Film"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = version.version
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = f"{version.exam_name or '检查'} 诊断报告"[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    padded = data + (b"\x00" if len(data) % 2 else b"")
    ds.EncapsulatedDocument = padded
    ds.EncapsulatedDocumentLength = len(data)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF)
    meta.MediaStorageSOPInstanceUID = UID(doc.uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


@contextmanager
def running(archive: Archive, interval: float = 5.0) -> Iterator[ReportWorker]:
    """The report worker in a background loop while the block runs."""
    from cloudfilm.storage.mirror import PeriodicLoop

    worker = ReportWorker(archive)

    def step() -> None:
        for _ in range(8):
            if not worker.run_once().worked:
                return

    loop = PeriodicLoop("reports", step, interval)
    loop.start()
    try:
        yield worker
    finally:
        loop.stop(timeout=60)
