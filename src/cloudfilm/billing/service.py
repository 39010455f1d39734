"""Use cases of billing: charge a delivered cloud film, reverse it, list charges, keep
an imported HIS charge list.

Functions that take ``session`` flush and never commit (STYLE 2): the caller owns the
transaction, so a charge commits with the release (or first view) that caused it, or
not at all. The settings come from ``session.info`` (:class:`~cloudfilm.db.Database`
puts them there).

Public hooks, called by the report release and the patient portal:

* :func:`record_delivery` — one charge per exam and charge item, whatever how often the
  delivery event comes;
* :func:`record_withdrawal` — a withdrawn report reverses the exam's charge (a reversal
  row with quantity -1; nothing is deleted).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloudfilm import db
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.service import Actor
from cloudfilm.billing.models import Charge, ChargeKind, ChargeState, HisChargeLine, ImportBatch
from cloudfilm.config import BillingSettings, ChargeDelivery, ChargeEvent
from cloudfilm.errors import BadRequest, Conflict

EVENTS = frozenset(e.value for e in ChargeEvent)
WITHDRAWN = "withdrawn"
_ACTOR = Actor.system("billing")
CENT = Decimal("0.01")


def settings_of(session: Session) -> BillingSettings:
    return db.settings_of(session).billing


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _clip(value: str | None, limit: int) -> str:
    return (value or "").replace("\x00", "").strip()[:limit]


def _control_id() -> str:
    return "CF" + secrets.token_hex(10).upper()


def _outbox_state(billing: BillingSettings) -> str:
    return ChargeState.LOCAL if billing.delivery is ChargeDelivery.NONE else ChargeState.PENDING


def _active(session: Session, study_instance_uid: str, item_code: str) -> Charge | None:
    """The exam's charge for ``item_code`` that no reversal has taken back."""
    reversal = select(Charge.reverses_id).where(Charge.reverses_id.is_not(None))
    return session.scalars(
        select(Charge)
        .where(
            Charge.study_instance_uid == study_instance_uid,
            Charge.item_code == item_code,
            Charge.kind == ChargeKind.CHARGE.value,
            Charge.id.not_in(reversal),
        )
        .order_by(Charge.seq.desc())
        .limit(1)
    ).first()


def record_delivery(
    session: Session,
    *,
    event: str,
    study_instance_uid: str,
    accession_number: str,
    patient_id: str,
    person_id: int | None,
    department: str,
    modality: str,
    exam_name: str,
    at: datetime,
) -> int | None:
    """Charge the cloud film of an exam delivered by ``event`` (``released`` or
    ``first-view``) at ``at``; flush only.

    Returns the id of the exam's charge — the one already there when the exam was
    charged before (a repeated event never makes a second charge) — or None when billing
    is off or ``event`` is not ``billing.charge_event``. An exam whose charges were all
    reversed (a withdrawn report) is charged again when it is delivered again.
    """
    if event not in EVENTS:
        raise BadRequest(
            f"收费事件 {event[:20]!r} 未知 · unknown delivery event {event[:20]!r} "
            f"(released, first-view)"
        )
    billing = settings_of(session)
    if not billing.enabled or event != billing.charge_event.value:
        return None
    uid = _clip(study_instance_uid, 64)
    if not uid:
        raise BadRequest("缺少检查实例 UID · study_instance_uid is empty")
    existing = _active(session, uid, billing.item_code)
    if existing is not None:
        return existing.id
    price = billing.price_for(modality or "").quantize(CENT)
    seq = (
        session.scalar(
            select(func.max(Charge.seq)).where(
                Charge.study_instance_uid == uid,
                Charge.item_code == billing.item_code,
                Charge.kind == ChargeKind.CHARGE.value,
            )
        )
        or 0
    ) + 1
    now = datetime.now(UTC)
    charge = Charge(
        kind=ChargeKind.CHARGE.value,
        seq=seq,
        study_instance_uid=uid,
        accession_number=_clip(accession_number, 64),
        person_id=person_id,
        patient_id=_clip(patient_id, 64),
        department=_clip(department, 64),
        modality=_clip(modality, 16).upper(),
        exam_name=_clip(exam_name, 128),
        item_code=billing.item_code,
        item_name=billing.item_name,
        quantity=1,
        unit_price=price,
        amount=price,
        currency=billing.currency,
        event=event,
        event_at=_aware(at),
        created_at=now,
        state=_outbox_state(billing),
        attempts=0,
        not_before=now,
        control_id=_control_id(),
    )
    # A concurrent delivery of the same exam loses on the unique key, not with a second
    # charge: its savepoint rolls back and the winner's charge is returned.
    try:
        with session.begin_nested():
            session.add(charge)
    except IntegrityError:
        winner = _active(session, uid, billing.item_code)
        if winner is None:
            raise
        return winner.id
    audit.record(
        session=session,
        actor=_ACTOR,
        event_type=AuditEventType.CHARGE_RECORDED,
        action=AuditAction.CREATE,
        object_type="charge",
        object_id=str(charge.id),
        patient_id=charge.patient_id or None,
        study_instance_uid=uid,
        message=f"云胶片收费 · cloud film charged: {price} {billing.currency} ({event})",
        detail={"charge_id": charge.id, "event": event, "amount": str(price)},
    )
    return charge.id


def record_withdrawal(session: Session, *, study_instance_uid: str, at: datetime) -> int | None:
    """Reverse the exam's charge (its report was withdrawn): a reversal row with quantity
    -1 and the negative amount, sent to the HIS like a charge; flush only.

    Returns the reversal's id (the existing one when the charge was reversed already),
    or None when the exam has no charge.
    """
    uid = _clip(study_instance_uid, 64)
    billing = settings_of(session)
    charges = list(
        session.scalars(
            select(Charge)
            .where(Charge.study_instance_uid == uid, Charge.kind == ChargeKind.CHARGE.value)
            .order_by(Charge.id)
        )
    )
    if not charges:
        return None
    reversals = {
        row.reverses_id: row
        for row in session.scalars(
            select(Charge).where(Charge.reverses_id.in_([c.id for c in charges]))
        )
    }
    now = datetime.now(UTC)
    made: list[Charge] = []
    for charge in charges:
        if charge.id in reversals:
            continue
        reversal = Charge(
            kind=ChargeKind.REVERSAL.value,
            seq=charge.seq,
            reverses_id=charge.id,
            study_instance_uid=uid,
            accession_number=charge.accession_number,
            person_id=charge.person_id,
            patient_id=charge.patient_id,
            department=charge.department,
            modality=charge.modality,
            exam_name=charge.exam_name,
            item_code=charge.item_code,
            item_name=charge.item_name,
            quantity=-1,
            unit_price=charge.unit_price,
            amount=-charge.amount,
            currency=charge.currency,
            event=WITHDRAWN,
            event_at=_aware(at),
            created_at=now,
            state=_outbox_state(billing)
            if charge.state != ChargeState.LOCAL
            else ChargeState.LOCAL.value,
            attempts=0,
            not_before=now,
            control_id=_control_id(),
        )
        session.add(reversal)
        made.append(reversal)
    if not made:
        return max(reversals.values(), key=lambda r: r.id).id
    session.flush()
    first = made[0]
    audit.record(
        session=session,
        actor=_ACTOR,
        event_type=AuditEventType.CHARGE_REVERSED,
        action=AuditAction.UPDATE,
        object_type="charge",
        object_id=str(first.reverses_id),
        patient_id=first.patient_id or None,
        study_instance_uid=uid,
        message="报告撤回，云胶片收费冲销 · report withdrawn, cloud film charge reversed",
        detail={"reversal_ids": [r.id for r in made], "amount": str(sum(r.amount for r in made))},
    )
    return first.id


def list_charges(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    department: str | None = None,
    state: str | None = None,
    limit: int = 500,
    offset: int = 0,
) -> list[Charge]:
    """Charges and reversals by ``event_at`` in [start, end), newest first."""
    query = select(Charge)
    if start is not None:
        query = query.where(Charge.event_at >= start)
    if end is not None:
        query = query.where(Charge.event_at < end)
    if department:
        query = query.where(Charge.department == department)
    if state:
        query = query.where(Charge.state == state)
    return list(
        session.scalars(
            query.order_by(Charge.event_at.desc(), Charge.id.desc()).limit(limit).offset(offset)
        )
    )


def resend(session: Session, *, charge_ids: list[int] | None = None) -> int:
    """Put failed and given-up charges back in the queue (all, or those of ``charge_ids``);
    how many."""
    query = select(Charge).where(
        Charge.state.in_([ChargeState.FAILED.value, ChargeState.GIVEN_UP.value])
    )
    if charge_ids is not None:
        query = query.where(Charge.id.in_(charge_ids))
    count = 0
    now = datetime.now(UTC)
    for charge in session.scalars(query):
        charge.state = ChargeState.PENDING.value
        charge.attempts = 0
        charge.not_before = now
        charge.lease_until = None
        count += 1
    session.flush()
    return count


def charge_dict(charge: Charge) -> dict[str, Any]:
    return {
        "id": charge.id,
        "kind": charge.kind,
        "reverses_id": charge.reverses_id,
        "study_instance_uid": charge.study_instance_uid,
        "accession_number": charge.accession_number,
        "patient_id": charge.patient_id,
        "department": charge.department,
        "modality": charge.modality,
        "exam_name": charge.exam_name,
        "item_code": charge.item_code,
        "item_name": charge.item_name,
        "quantity": charge.quantity,
        "unit_price": str(charge.unit_price),
        "amount": str(charge.amount),
        "currency": charge.currency,
        "event": charge.event,
        "event_at": _aware(charge.event_at).isoformat(),
        "state": charge.state,
        "attempts": charge.attempts,
        "last_error": charge.last_error,
        "control_id": charge.control_id,
    }


# -- imported HIS charge lists -------------------------------------------------------------


@dataclass(slots=True)
class HisLine:
    """One good line of a HIS charge list, as read."""

    line_no: int
    accession_number: str
    patient_id: str
    item_code: str
    amount: Decimal
    department: str
    charged_at: datetime


@dataclass(slots=True)
class LineError:
    line: int
    message: str
    """``中文 · English``."""


@dataclass(slots=True)
class ImportResult:
    batch_id: int
    file_name: str
    file_format: str
    kept: int
    errors: list[LineError] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "file_name": self.file_name,
            "format": self.file_format,
            "kept": self.kept,
            "rejected": len(self.errors),
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
        }


def save_import(
    session: Session,
    *,
    file_name: str,
    file_format: str,
    sha256: str,
    imported_by: str,
    lines: list[HisLine],
    errors: list[LineError],
    actor: Actor,
    audited: bool = True,
) -> ImportResult:
    """Keep a read charge list (its good lines, its errors) as one batch, audited unless
    ``audited`` is false (an HTTP request, whose one audit record the middleware writes).
    The same bytes imported twice are refused (:class:`Conflict`): a list counts once."""
    earlier = session.scalar(select(ImportBatch.id).where(ImportBatch.sha256 == sha256))
    if earlier is not None:
        raise Conflict(
            f"该收费清单已导入（批次 {earlier}） · this charge list was imported already "
            f"(batch {earlier}); nothing was added"
        )
    batch = ImportBatch(
        file_name=_clip(file_name, 255) or "(unnamed)",
        file_format=file_format,
        sha256=sha256,
        imported_by=_clip(imported_by, 128),
        imported_at=datetime.now(UTC),
        line_count=len(lines),
        rejected_count=len(errors),
        errors=[{"line": e.line, "message": e.message} for e in errors[:1000]],
    )
    session.add(batch)
    session.flush()
    session.add_all(
        HisChargeLine(
            batch_id=batch.id,
            line_no=line.line_no,
            accession_number=line.accession_number,
            patient_id=line.patient_id,
            item_code=line.item_code,
            amount=line.amount,
            department=line.department,
            charged_at=line.charged_at,
        )
        for line in lines
    )
    session.flush()
    result = ImportResult(batch.id, batch.file_name, file_format, len(lines), errors)
    if not audited:
        return result
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.BILLING_IMPORTED,
        action=AuditAction.CREATE,
        object_type="billing-import",
        object_id=str(batch.id),
        message=f"HIS 收费清单导入 {len(lines)} 行，拒收 {len(errors)} 行 · HIS charge list "
        f"imported: {len(lines)} line(s) kept, {len(errors)} rejected",
        detail={
            "batch_id": batch.id,
            "file_name": batch.file_name,
            "format": file_format,
            "kept": len(lines),
            "rejected": len(errors),
        },
    )
    return result
