"""What a release sets off, in the releasing transaction: the patient's notice (SMS
through the notification outbox) and the cloud-film charge (billing). Both are outbox
rows: they are sent after the commit, by their own workers, and retried there."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.billing import service as billing
from cloudfilm.config import Settings
from cloudfilm.notify import service as notify
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports.models import Report, ReportVersion
from cloudfilm.reports.service import resolve_study_uid
from cloudfilm.sharing import tokens
from cloudfilm.sharing.notices import phone_of


def charge(
    session: Session, report: Report, version: ReportVersion, event: str, at: datetime
) -> int | None:
    """The cloud-film charge of the report's exam delivered by ``event`` (``released``,
    ``first-view``): :func:`cloudfilm.billing.service.record_delivery` (flush only)."""
    return billing.record_delivery(
        session,
        event=event,
        study_instance_uid=report.study_instance_uid,
        accession_number=report.accession_number,
        patient_id=report.patient_id,
        person_id=report.person_id,
        department=version.department,
        modality=version.modality,
        exam_name=version.exam_name,
        at=at,
    )


def on_release(
    session: Session, report: Report, version: ReportVersion, settings: Settings, now: datetime
) -> dict[str, Any]:
    """Queue the notice and the charge of a release; what was queued, for the audit."""
    queued: dict[str, Any] = {}
    order = session.get(ImagingOrder, report.order_id) if report.order_id else None
    if not report.study_instance_uid:
        report.study_instance_uid = resolve_study_uid(session, report, order)
    if report.study_instance_uid:
        queued["charge_id"] = charge(session, report, version, "released", now)
    phone = phone_of(session, report.person_id) if settings.reports.notify_release else None
    if phone:
        token = tokens.issue(
            session,
            purpose="report",
            person_id=report.person_id,
            patient_id=report.patient_id,
            accession_number=report.accession_number,
            study_instance_uid=report.study_instance_uid,
            report_id=report.id,
            now=now,
        )
        queued["notification_id"] = notify.enqueue(
            session,
            channel="sms",
            template="report-released",
            to=phone,
            variables={
                "hospital": settings.reports.hospital_name,
                "exam": version.exam_name or "影像",
                "link": tokens.entry_url(settings, token),
            },
            object_type="report",
            object_id=str(report.id),
            dedupe_key=f"report-released:{report.id}",
        )
    return queued
