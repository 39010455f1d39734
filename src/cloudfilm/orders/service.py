"""Use cases of imaging orders: take an order in (HL7 ORM/OMI, FHIR ServiceRequest),
change its status, record its visit, and find the studies it belongs to.

Functions flush and never commit (STYLE 2): the HL7 listener and the FHIR routes own the
transactions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Study
from cloudfilm.db import settings_of
from cloudfilm.errors import NotFound
from cloudfilm.orders.models import (
    Encounter,
    ImagingOrder,
    OrderStatus,
    OrderStatusChange,
)

LOCAL_ZONE = timezone(timedelta(hours=8))
"""The zone of times senders give without one (HL7 TS, FHIR dates): the hospitals served
keep China Standard Time."""

#: How far along each status is: HL7 status messages only move an order forward, so a
#: late (out-of-order) SC "scheduled" after "completed" leaves it completed.
_RANK = {
    OrderStatus.NEW: 0,
    OrderStatus.SCHEDULED: 1,
    OrderStatus.IN_PROGRESS: 2,
    OrderStatus.COMPLETED: 3,
    OrderStatus.CANCELLED: 4,
}


@dataclass(slots=True)
class OrderData:
    """Fields a message or request sets; ``None`` leaves the stored value as it is."""

    placer_order_number: str | None = None
    filler_order_number: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    procedure_code: str | None = None
    procedure_text: str | None = None
    procedure_system: str | None = None
    modality: str | None = None
    department: str | None = None
    ward: str | None = None
    room: str | None = None
    bed: str | None = None
    visit_type: str | None = None
    visit_number: str | None = None
    requesting_doctor: str | None = None
    scheduled_at: datetime | None = None
    authored_at: datetime | None = None
    patient_id: str | None = None
    patient_authority: str | None = None


@dataclass(slots=True)
class VisitData:
    """A visit as PV1 gives it; ``visit_number`` (PV1-19) names it."""

    visit_number: str
    visit_type: str | None = None
    ward: str | None = None
    room: str | None = None
    bed: str | None = None
    department: str | None = None
    admitted_at: datetime | None = None
    discharged_at: datetime | None = None


_LIMITS = {c.name: getattr(c.type, "length", None) for c in ImagingOrder.__table__.columns}


def _now() -> datetime:
    return datetime.now(UTC)


def find_order(
    *, session: Session, placer: str | None = None, filler: str | None = None
) -> ImagingOrder | None:
    """The order with placer number ``placer``, else the one with filler number ``filler``
    (when ``placer`` is given, only an order without a placer number of its own: the filler
    number of another placer's order is not this one)."""
    if placer:
        found = session.scalars(
            select(ImagingOrder).where(ImagingOrder.placer_order_number == placer)
        ).one_or_none()
        if found is not None:
            return found
    if filler:
        query = select(ImagingOrder).where(ImagingOrder.filler_order_number == filler)
        if placer:
            query = query.where(ImagingOrder.placer_order_number == "")
        return session.scalars(query.order_by(ImagingOrder.id).limit(1)).first()
    return None


def get_order(*, session: Session, order_id: int) -> ImagingOrder:
    order = session.get(ImagingOrder, order_id)
    if order is None:
        raise NotFound(f"no order {order_id}")
    return order


def _history(
    session: Session,
    order: ImagingOrder,
    before: str | None,
    control: str,
    source: str,
    now: datetime,
) -> None:
    session.add(
        OrderStatusChange(
            order_id=order.id,
            changed_at=now,
            status_from=before,
            status_to=order.status,
            control=control[:16],
            source=source[:128],
        )
    )


def save_order(
    *,
    session: Session,
    data: OrderData,
    status: OrderStatus | None,
    control: str,
    source: str,
    person_id: int | None = None,
    order: ImagingOrder | None = None,
    forward_only: bool = True,
    now: datetime | None = None,
) -> ImagingOrder:
    """Create the order ``data`` names (placer, else filler number) or update ``order``
    or the one found: fields given replace the stored ones, ``status`` is applied (with
    ``forward_only`` never backwards, never out of cancelled/completed), and every
    status change is kept in the history."""
    moment = now or _now()
    if order is None:
        order = find_order(
            session=session, placer=data.placer_order_number, filler=data.filler_order_number
        )
    created = order is None
    if order is None:
        order = ImagingOrder(
            status=(status or OrderStatus.NEW).value,
            created_at=moment,
            updated_at=moment,
        )
        session.add(order)
    for field in fields(OrderData):
        value = getattr(data, field.name)
        if value is None:
            continue
        if isinstance(value, str):
            limit = _LIMITS.get(field.name)
            value = value.strip()[:limit] if limit else value.strip()
        setattr(order, field.name, value)
    if person_id is not None:
        order.person_id = person_id
    order.source = source[:128]
    order.updated_at = moment
    session.flush()
    before = None if created else order.status
    if created:
        _history(session, order, None, control, source, moment)
        from cloudfilm.sharing.notices import on_registered  # sharing builds on orders

        on_registered(session, order, settings_of(session))
    elif status is not None and status.value != order.status:
        current = OrderStatus(order.status)
        terminal = current in (OrderStatus.COMPLETED, OrderStatus.CANCELLED)
        if not forward_only or (not terminal and _RANK[status] > _RANK[current]):
            order.status = status.value
            _history(session, order, before, control, source, moment)
    session.flush()
    return order


def history_of(*, session: Session, order: ImagingOrder) -> list[OrderStatusChange]:
    return list(
        session.scalars(
            select(OrderStatusChange)
            .where(OrderStatusChange.order_id == order.id)
            .order_by(OrderStatusChange.id)
        )
    )


def record_visit(
    *,
    session: Session,
    visit: VisitData,
    person_id: int | None,
    source: str,
    now: datetime | None = None,
) -> Encounter:
    """Create or update the encounter of ``visit.visit_number`` (PV1 of ADT or an order)."""
    moment = now or _now()
    number = visit.visit_number.strip()[:64]
    encounter = session.scalars(
        select(Encounter).where(Encounter.visit_number == number)
    ).one_or_none()
    if encounter is None:
        encounter = Encounter(visit_number=number, created_at=moment)
        session.add(encounter)
    for name in ("visit_type", "ward", "room", "bed", "department"):
        value = getattr(visit, name)
        if value:
            limit = getattr(Encounter.__table__.c[name].type, "length", 64)
            setattr(encounter, name, value.strip()[:limit])
    if visit.admitted_at is not None:
        encounter.admitted_at = visit.admitted_at
    if visit.discharged_at is not None:
        encounter.discharged_at = visit.discharged_at
    if person_id is not None:
        encounter.person_id = person_id
    encounter.source = source[:128]
    encounter.updated_at = moment
    session.flush()
    return encounter


# ------------------------------------------------------------------ orders ↔ studies


def study_link() -> ColumnElement[bool]:
    """The join condition order ↔ study: the same accession number, or the Study
    Instance UID the order names (IPC-3). A join, so it holds whichever arrives first."""
    return or_(
        and_(
            ImagingOrder.accession_number != "",
            ImagingOrder.accession_number == Study.accession_number,
        ),
        and_(
            ImagingOrder.study_instance_uid != "",
            ImagingOrder.study_instance_uid == Study.study_instance_uid,
        ),
    )


def orders_of_study(*, session: Session, study: Study) -> list[ImagingOrder]:
    """The orders a study was made for (usually one)."""
    conditions = [ImagingOrder.study_instance_uid == study.study_instance_uid]
    if study.accession_number:
        conditions.append(ImagingOrder.accession_number == study.accession_number)
    return list(
        session.scalars(select(ImagingOrder).where(or_(*conditions)).order_by(ImagingOrder.id))
    )


def orders_by_study(*, session: Session, study_ids: list[int]) -> dict[int, list[ImagingOrder]]:
    """The orders of many studies at once (a study list, a search page): study row id →
    its orders, oldest first; studies without an order are left out."""
    found: dict[int, list[ImagingOrder]] = {}
    if not study_ids:
        return found
    for study_id, order in session.execute(
        select(Study.id, ImagingOrder)
        .join(ImagingOrder, study_link())
        .where(Study.id.in_(study_ids))
        .order_by(ImagingOrder.id)
    ):
        found.setdefault(study_id, []).append(order)
    return found


def studies_of_order(
    *, session: Session, order: ImagingOrder, scope: ColumnElement[bool] | None = None
) -> list[Study]:
    """The studies made for ``order``; ``scope`` narrows them to a caller's data scope."""
    conditions = []
    if order.accession_number:
        conditions.append(Study.accession_number == order.accession_number)
    if order.study_instance_uid:
        conditions.append(Study.study_instance_uid == order.study_instance_uid)
    if not conditions:
        return []
    query = select(Study).where(or_(*conditions)).order_by(Study.id)
    if scope is not None:
        query = query.where(scope)
    return list(session.scalars(query))


def studies_ordered(**equal: Any) -> ColumnElement[bool]:
    """A condition on :class:`Study`: made for an order whose columns equal ``equal``
    (``ward="心内科一病区", bed="12"``, ``requesting_doctor=...``): what a clinician's
    search by ward, bed or requesting doctor joins through."""
    conditions = [getattr(ImagingOrder, name) == value for name, value in equal.items()]
    return exists(select(ImagingOrder.id).where(study_link(), *conditions))


def visible_order(scope: ColumnElement[bool] | None) -> ColumnElement[bool] | None:
    """A caller with a data scope sees an order through a study of it in the scope (an
    order without a study yet only to callers without a scope)."""
    if scope is None:
        return None
    return exists(select(Study.id).where(study_link(), scope))
