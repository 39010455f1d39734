"""Order messages → imaging orders (:mod:`cloudfilm.orders`): ORM^O01 and OMI^O23.

References are to HL7 v2.5.1: 4.4.1 ORM^O01, 4.4.6 OMI^O23, 4.5.1 ORC (order control
table 0119, order status table 0038), 4.5.3 OBR, 4.5.4 TQ1, 4.5.6 IPC, 3.4.3 PV1; data
types 2.A.28 EI, 2.A.89 CWE, 2.A.99 XCN, 2.A.53 PL, 2.A.78 TS.

One order per ORC group (ORC, then its TQ1, OBR and IPC segments); the patient of PID-3
is created or updated in the master index as ADT does; PV1 gives the visit. ORC-1:

* ``NW`` new order: creates it, or updates the order with the same placer number (a
  repeated or resent NW never makes a second order);
* ``XO`` change: updates the order (creates it when the change overtook its NW);
* ``SC`` status changed: sets the status of ORC-5 (the order's details stay as they are);
* ``CA`` (also ``OC``, ``DC``, ``OD``, ``CR``) cancel: the order becomes cancelled; a cancel
  of an order never received is answered AE 204 and kept for replay.

Status messages only move an order forward: a late SC never reopens a completed or
cancelled order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.hl7 import handlers
from cloudfilm.hl7.adt import _field, _part, _Reader, _register, _segments
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError
from cloudfilm.hl7.models import HL7Message
from cloudfilm.orders import service as orders
from cloudfilm.orders.models import OrderStatus, VisitType
from cloudfilm.orders.service import LOCAL_ZONE, OrderData, VisitData

NEW_CONTROLS = frozenset({"NW"})
CHANGE_CONTROLS = frozenset({"XO"})
STATUS_CONTROLS = frozenset({"SC"})
CANCEL_CONTROLS = frozenset({"CA", "OC", "DC", "OD", "CR"})

#: ORC-5 order status (table 0038) → our status.
ORDER_STATUS = {
    "SC": OrderStatus.SCHEDULED,
    "IP": OrderStatus.IN_PROGRESS,
    "A": OrderStatus.IN_PROGRESS,
    "CM": OrderStatus.COMPLETED,
    "CA": OrderStatus.CANCELLED,
    "DC": OrderStatus.CANCELLED,
}

#: PV1-2 patient class (table 0004, and the local codes Chinese HIS use for 体检).
VISIT_TYPES = {
    "O": VisitType.OUTPATIENT,
    "I": VisitType.INPATIENT,
    "E": VisitType.EMERGENCY,
    "T": VisitType.PHYSICAL_EXAM,
    "H": VisitType.PHYSICAL_EXAM,
    "PE": VisitType.PHYSICAL_EXAM,
    "门诊": VisitType.OUTPATIENT,
    "住院": VisitType.INPATIENT,
    "急诊": VisitType.EMERGENCY,
    "体检": VisitType.PHYSICAL_EXAM,
}

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


def parse_ts(value: str, where: str) -> datetime | None:
    """TS/DTM ``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]`` → an aware datetime (UTC); without
    a zone the sender's local time (:data:`~cloudfilm.orders.service.LOCAL_ZONE`)."""
    value = value.strip()
    if not value:
        return None
    match = _TS.match(value)
    if match is None:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.DATA_TYPE_ERROR,
            f"{where.replace('^', '-')} 不是 HL7 日期时间 · not an HL7 date/time: {value[:40]!r}",
            where,
        )
    y, mo, d, h, mi, s, zone = match.groups()
    tz = LOCAL_ZONE
    if zone:
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5])))
    try:
        moment = datetime(
            int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0), tzinfo=tz
        )
    except ValueError as exc:
        raise MessageError(
            AckCode.ERROR, ErrorCode.DATA_TYPE_ERROR,
            f"{where.replace('^', '-')} 日期无效 · invalid date: {value[:40]!r}", where,
        ) from exc  # fmt: skip
    return moment.astimezone(UTC)


@dataclass(slots=True)
class _Group:
    """One ORC with the segments that follow it up to the next ORC."""

    number: int
    orc: Any
    obr: Any = None
    tq1: Any = None
    ipcs: list[Any] = field(default_factory=list)


def _groups(message: Any) -> list[_Group]:
    groups: list[_Group] = []
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            groups.append(_Group(len(groups) + 1, segment))
        elif not groups:
            continue
        elif name == "OBR" and groups[-1].obr is None:
            groups[-1].obr = segment
        elif name == "TQ1" and groups[-1].tq1 is None:
            groups[-1].tq1 = segment
        elif name == "IPC":
            groups[-1].ipcs.append(segment)
    return groups


def _first(reader: _Reader, segment: Any, number: int, component: int = 1) -> str:
    if segment is None:
        return ""
    reps = reader.repetitions(segment, number)
    return _part(reps[0], component) if reps else ""


def _person_name(reader: _Reader, segment: Any, number: int) -> str:
    """XCN: family (2) + given (3) as Chinese names are written, else ``FAMILY^GIVEN``;
    the ID (1) when no name is given."""
    if segment is None:
        return ""
    reps = reader.repetitions(segment, number)
    if not reps:
        return ""
    parts = reps[0]
    family, given = _part(parts, 2), _part(parts, 3)
    if any("\u3400" <= ch <= "\u9fff" for ch in family + given):
        return family + given
    return "^".join(p for p in (family, given) if p) or _part(parts, 1)


def _visit(reader: _Reader, pv1: Any, *, strict: bool = True) -> tuple[OrderData, VisitData | None]:
    """PV1-2 class, PV1-3 location (ward^room^bed), PV1-10 service, PV1-19 visit number,
    PV1-44/45 admit and discharge (unless ``strict``, an invalid time is left out)."""

    def moment(number: int) -> datetime | None:
        try:
            return parse_ts(_first(reader, pv1, number), f"PV1^1^{number}")
        except MessageError:
            if strict:
                raise
            return None

    code = reader.text(_field(pv1, 2)).upper() if pv1 is not None else ""
    raw_class = reader.text(_field(pv1, 2)) if pv1 is not None else ""
    visit_type = VISIT_TYPES.get(code) or VISIT_TYPES.get(raw_class)
    kind = visit_type.value if visit_type else raw_class.lower()[:16]
    ward = _first(reader, pv1, 3, 1)
    room = _first(reader, pv1, 3, 2)
    bed = _first(reader, pv1, 3, 3)
    service = _first(reader, pv1, 10, 1)
    number = _first(reader, pv1, 19, 1)
    data = OrderData(
        ward=ward or None,
        room=room or None,
        bed=bed or None,
        visit_type=kind or None,
        visit_number=number or None,
    )
    if pv1 is None or not number:
        return data, None
    visit = VisitData(
        visit_number=number,
        visit_type=kind or None,
        ward=ward or None,
        room=room or None,
        bed=bed or None,
        department=service or ward or None,
        admitted_at=moment(44),
        discharged_at=moment(45),
    )
    return data, visit


def record_pv1(*, session: Session, message: Any, person_id: int | None, source: str) -> None:
    """The visit of an ADT's PV1 (when it carries a visit number, PV1-19). Leniently: the
    ADT is about the person, so a PV1 time that is not a date leaves the time out instead
    of refusing the message."""
    pv1s = _segments(message, "PV1")
    if not pv1s:
        return
    _, visit = _visit(_Reader(message), pv1s[0], strict=False)
    if visit is not None:
        orders.record_visit(session=session, visit=visit, person_id=person_id, source=source)


def _order_data(reader: _Reader, group: _Group, omi: bool) -> OrderData:
    orc, obr, n = group.orc, group.obr, group.number
    ipc = group.ipcs[0] if group.ipcs else None
    accession = _first(reader, ipc, 1) if omi and ipc is not None else ""
    accession = accession or _first(reader, obr, 18)
    modality = _first(reader, obr, 24) or (_first(reader, ipc, 5) if ipc is not None else "")
    department = _first(reader, orc, 17, 2) or _first(reader, orc, 17, 1)
    scheduled = parse_ts(_first(reader, obr, 36), f"OBR^{n}^36") or (
        parse_ts(_first(reader, group.tq1, 7), f"TQ1^{n}^7") if group.tq1 is not None else None
    )
    return OrderData(
        placer_order_number=_first(reader, orc, 2) or _first(reader, obr, 2),
        filler_order_number=_first(reader, orc, 3) or _first(reader, obr, 3) or None,
        accession_number=accession or None,
        study_instance_uid=(_first(reader, ipc, 3) or None) if ipc is not None else None,
        procedure_code=_first(reader, obr, 4, 1) or None,
        procedure_text=_first(reader, obr, 4, 2) or None,
        procedure_system=_first(reader, obr, 4, 3) or None,
        modality=modality.upper() or None,
        department=department or None,
        requesting_doctor=_person_name(reader, orc, 12) or _person_name(reader, obr, 16) or None,
        scheduled_at=scheduled,
        authored_at=parse_ts(_first(reader, orc, 9), f"ORC^{n}^9"),
    )


def _missing(text: str, where: str, code: ErrorCode = ErrorCode.REQUIRED_FIELD_MISSING) -> None:
    raise MessageError(AckCode.ERROR, code, text, where)


def _apply(*, session: Session, message: Any, record: HL7Message, omi: bool) -> None:
    reader = _Reader(message)
    source = f"hl7:#{record.id}"
    groups = _groups(message)
    if not groups:
        _missing("缺少 ORC 段 · ORC segment missing", "ORC", ErrorCode.SEGMENT_SEQUENCE)
    pids = _segments(message, "PID")
    pv1s = _segments(message, "PV1")
    person = _register(session, reader, pids[0], source) if pids else None
    visit_data, visit = _visit(reader, pv1s[0] if pv1s else None)
    encounter_id: int | None = None
    if visit is not None:
        encounter_id = orders.record_visit(
            session=session,
            visit=visit,
            person_id=person.id if person is not None else None,
            source=source,
        ).id
    for group in groups:
        n = group.number
        control = reader.text(_field(group.orc, 1)).upper()
        if not control:
            _missing("ORC-1 医嘱控制码为空 · ORC-1 order control is empty", f"ORC^{n}^1")
        known = NEW_CONTROLS | CHANGE_CONTROLS | STATUS_CONTROLS | CANCEL_CONTROLS
        if control not in known:
            _missing(
                f"ORC-1 医嘱控制码 {control[:8]} 不支持 · order control {control[:8]!r} is not "
                f"supported (NW, XO, SC, CA)",
                f"ORC^{n}^1",
                ErrorCode.DATA_TYPE_ERROR,
            )
        if group.obr is None and control in NEW_CONTROLS | CHANGE_CONTROLS:
            _missing(
                f"第 {n} 个 ORC 后缺少 OBR 段 · ORC {n} ({control}) is not followed by an OBR",
                f"OBR^{n}",
                ErrorCode.SEGMENT_SEQUENCE,
            )
        data = _order_data(reader, group, omi)
        if not data.placer_order_number and not data.filler_order_number:
            _missing(
                "ORC-2/OBR-2 申请单号与 ORC-3/OBR-3 执行单号均为空 · neither placer (ORC-2) "
                "nor filler (ORC-3) order number is given",
                f"ORC^{n}^2",
            )
        existing = orders.find_order(
            session=session,
            placer=data.placer_order_number,
            filler=data.filler_order_number,
        )
        if control in CANCEL_CONTROLS | STATUS_CONTROLS and existing is None:
            _missing(
                f"医嘱 {data.placer_order_number or data.filler_order_number} 不存在，无法"
                f"{'取消' if control in CANCEL_CONTROLS else '更新状态'} · unknown order "
                f"(placer {data.placer_order_number!r}, filler {data.filler_order_number!r}): "
                f"{control} cannot be applied; the message is kept for replay",
                f"ORC^{n}^2",
                ErrorCode.UNKNOWN_KEY,
            )
        if control in NEW_CONTROLS | CHANGE_CONTROLS and person is None and existing is None:
            _missing("缺少 PID 段 · PID segment missing", "PID", ErrorCode.SEGMENT_SEQUENCE)
        order_status = ORDER_STATUS.get(reader.text(_field(group.orc, 5)).upper())
        if control in CANCEL_CONTROLS | STATUS_CONTROLS:
            # Only the status changes: the order's details stay those of its NW/XO.
            data = OrderData(
                placer_order_number=data.placer_order_number,
                filler_order_number=data.filler_order_number,
            )
        if control in CANCEL_CONTROLS:
            status: OrderStatus | None = OrderStatus.CANCELLED
        elif control in STATUS_CONTROLS:
            if order_status is None:
                _missing(
                    "SC 消息的 ORC-5 医嘱状态为空或未知 · ORC-5 order status is empty or not "
                    "one of SC, IP, A, CM, CA, DC",
                    f"ORC^{n}^5",
                )
            status = order_status
        elif control in NEW_CONTROLS:
            status = order_status or OrderStatus.NEW
        else:
            status = order_status
        if control in NEW_CONTROLS | CHANGE_CONTROLS:
            for name in ("ward", "room", "bed", "visit_type", "visit_number"):
                setattr(data, name, getattr(visit_data, name))
            if idents := (reader.repetitions(pids[0], 3) if pids else []):
                data.patient_id = _part(idents[0], 1)
                data.patient_authority = _part(idents[0], 4)
        order = orders.save_order(
            session=session,
            data=data,
            status=status,
            control=control,
            source=source,
            person_id=person.id if person is not None else None,
            order=existing,
        )
        if encounter_id is not None and control in NEW_CONTROLS | CHANGE_CONTROLS:
            order.encounter_id = encounter_id
    session.flush()


@handlers.register("ORM^O01")
def on_orm(*, session: Session, message: Any, record: HL7Message) -> None:
    """ORM^O01 general order: OBR-18 carries the accession number (RIS convention)."""
    _apply(session=session, message=message, record=record, omi=False)


@handlers.register("OMI^O23")
def on_omi(*, session: Session, message: Any, record: HL7Message) -> None:
    """OMI^O23 imaging order: IPC-1 accession, IPC-3 Study Instance UID, IPC-5 modality."""
    _apply(session=session, message=message, record=record, omi=True)
