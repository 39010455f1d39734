"""Notices to the patient about one exam: the registration SMS (with the link the
registration label also carries) and the phone number they go to."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.config import Settings
from cloudfilm.mpi.keys import keys_of
from cloudfilm.mpi.models import PersonIdentifier
from cloudfilm.mpi.service import PHONE
from cloudfilm.notify import service as notify
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports.pdf import local_time
from cloudfilm.sharing import tokens


def phone_of(session: Session, person_id: int | None) -> str | None:
    """The newest phone number the master index holds for the person, opened."""
    if person_id is None:
        return None
    sealed = session.scalars(
        select(PersonIdentifier.value_sealed)
        .where(PersonIdentifier.person_id == person_id, PersonIdentifier.id_type == PHONE)
        .order_by(PersonIdentifier.id.desc())
        .limit(1)
    ).first()
    return keys_of(session).open(sealed) if sealed else None


def registration_token(session: Session, order: ImagingOrder) -> str:
    """The token of the order's registration label and SMS link."""
    return tokens.issue(
        session,
        purpose="registration",
        person_id=order.person_id,
        patient_id=order.patient_id,
        accession_number=order.accession_number,
        study_instance_uid=order.study_instance_uid,
        order_id=order.id,
    )


def on_registered(session: Session, order: ImagingOrder, settings: Settings) -> int | None:
    """A new order: its entry token, and the registration SMS when ``reports.
    notify_registration`` is on and the patient has a phone on file (flush only). The
    notification id, or None."""
    token = registration_token(session, order)
    if not settings.reports.notify_registration:
        return None
    phone = phone_of(session, order.person_id)
    if not phone:
        return None
    return notify.enqueue(
        session,
        channel="sms",
        template="exam-registered",
        to=phone,
        variables={
            "hospital": settings.reports.hospital_name,
            "exam": order.procedure_text or order.procedure_code or "影像",
            "date": local_time(order.scheduled_at, with_time=True) or "待定",
            "link": tokens.entry_url(settings, token),
        },
        object_type="order",
        object_id=str(order.id),
        dedupe_key=f"exam-registered:{order.id}",
    )
