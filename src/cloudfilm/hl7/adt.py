"""ADT messages → the patient master index (:mod:`cloudfilm.mpi`).

A01 (admit), A04 (register), A08 (update), A28 (add person) and A31 (update person)
create or update the person that PID-3 names; A40 (merge patient, identifier list)
merges the person of MRG-1 into the person of PID-3. References are to HL7 v2.5.1:
3.4.2 PID, 3.4.3 MRG, 3.3.40 A40; data types 2.A.14 CX, 2.A.89 XPN, 2.A.88 XTN,
2.A.85 XAD.

An ADT that cannot be applied raises :class:`MessageError` (AE): the listener answers AE
with the reason in ERR and the message stays stored as ``failed`` for replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.audit import service as audit
from cloudfilm.errors import Conflict, NotFound
from cloudfilm.hl7 import handlers
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError
from cloudfilm.hl7.models import HL7Message
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.models import Person
from cloudfilm.mpi.service import Demographics, Identifier, InvalidIdentifier

UPDATE_TRIGGERS = ("A01", "A04", "A08", "A28", "A31")
MERGE_TRIGGER = "A40"


@dataclass(frozen=True, slots=True)
class _Separators:
    field: str
    repetition: str
    component: str
    subcomponent: str


def _separators(message: Any) -> _Separators:
    # python-hl7: "\r|~^&" (segment, field, repetition, component, subcomponent)
    seps = str(message.separators)
    return _Separators(seps[1], seps[2], seps[3], seps[4] if len(seps) > 4 else "&")


def _field(segment: Any, number: int) -> str:
    return str(segment[number]) if len(segment) > number else ""


def _components(text: str, seps: _Separators) -> list[str]:
    return text.split(seps.component)


def _part(parts: list[str], number: int) -> str:
    """Component ``number`` (1-based), its first subcomponent."""
    return parts[number - 1] if len(parts) >= number else ""


class _Reader:
    """Fields of one message, split and unescaped (2.7.4 escape sequences)."""

    def __init__(self, message: Any) -> None:
        self.message = message
        self.seps = _separators(message)

    def text(self, value: str) -> str:
        return str(self.message.unescape(value)).strip() if value else ""

    def repetitions(self, segment: Any, number: int) -> list[list[str]]:
        raw = _field(segment, number)
        return [
            [self.text(c.split(self.seps.subcomponent)[0]) for c in _components(r, self.seps)]
            for r in raw.split(self.seps.repetition)
            if r
        ]


def _identifiers(reader: _Reader, segment: Any, number: int, where: str) -> list[Identifier]:
    """CX repetitions: CX.1 ID number, CX.4 assigning authority (HD namespace ID), CX.5
    identifier type code (table 0203; absent: PI)."""
    found = []
    for parts in reader.repetitions(segment, number):
        value = _part(parts, 1)
        if not value:
            continue
        try:
            found.append(mpi.identifier(_part(parts, 5) or "PI", _part(parts, 4), value))
        except InvalidIdentifier as exc:
            raise MessageError(AckCode.ERROR, DATA_TYPE_ERROR, str(exc), where) from exc
    return found


DATA_TYPE_ERROR = ErrorCode.DATA_TYPE_ERROR


def _name(reader: _Reader, pid: Any) -> str | None:
    """PID-5: the legal name (XPN.7 = L) or the first one; family and given name joined
    as Chinese names are written (张 + 三丰), other names as ``FAMILY^GIVEN``."""
    names = reader.repetitions(pid, 5)
    if not names:
        return None
    chosen = next((n for n in names if _part(n, 7).upper() == "L"), names[0])
    family, given, middle = _part(chosen, 1), _part(chosen, 2), _part(chosen, 3)
    if any("\u3400" <= ch <= "\u9fff" for ch in family + given):
        return family + given + middle
    return "^".join(p for p in (family, given, middle) if p)


def _phones(reader: _Reader, pid: Any) -> list[Identifier]:
    """PID-13 home phone (XTN): XTN.1 (the number as text, before v2.5), else XTN.12
    (unformatted), else area code XTN.6 + local number XTN.7."""
    found = []
    for parts in reader.repetitions(pid, 13):
        number = _part(parts, 1) or _part(parts, 12) or (_part(parts, 6) + _part(parts, 7))
        if not number or _part(parts, 3).upper() in ("INTERNET", "X.400", "NET"):
            continue  # an e-mail address, not a phone
        try:
            found.append(mpi.identifier(mpi.PHONE, "", number))
        except InvalidIdentifier as exc:
            raise MessageError(AckCode.ERROR, DATA_TYPE_ERROR, str(exc), "PID^1^13") from exc
    return found


def _demographics(reader: _Reader, pid: Any) -> Demographics:
    """PID-5, -7, -8, -11. Fields absent from the message leave the index as it is."""
    address = None
    if len(pid) > 11 and _field(pid, 11):
        first = reader.repetitions(pid, 11)
        if first:
            address = " ".join(p for p in first[0][:6] if p)
    birth = reader.text(_field(pid, 7).split(reader.seps.component)[0]) if len(pid) > 7 else None
    sex = reader.text(_field(pid, 8)) if len(pid) > 8 else None
    return Demographics(
        name=_name(reader, pid),
        sex=sex or None,
        birth_date=birth or None,
        address=address,
    )


def _person_fields(reader: _Reader, pid: Any) -> tuple[list[Identifier], Demographics]:
    identifiers = _identifiers(reader, pid, 3, "PID^1^3")
    if not identifiers:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.REQUIRED_FIELD_MISSING,
            "PID-3 患者标识为空 · PID-3 patient identifier list is empty",
            "PID^1^3",
        )
    return identifiers + _phones(reader, pid), _demographics(reader, pid)


def _register(session: Session, reader: _Reader, pid: Any, source: str) -> Person:
    identifiers, demographics = _person_fields(reader, pid)
    try:
        return mpi.register(
            session=session, identifiers=identifiers, demographics=demographics, source=source
        )
    except InvalidIdentifier as exc:
        raise MessageError(AckCode.ERROR, DATA_TYPE_ERROR, str(exc), "PID^1") from exc
    except Conflict as exc:
        raise MessageError(AckCode.ERROR, ErrorCode.DUPLICATE_KEY, str(exc), "PID^1^3") from exc


def _sender(record: HL7Message) -> audit.Actor:
    sender = "^".join(p for p in (record.sending_application, record.sending_facility) if p)
    return audit.Actor.system(f"hl7:{sender}" if sender else "hl7")


def _segments(message: Any, name: str) -> list[Any]:
    return [s for s in message if str(s[0]) == name]


@handlers.register("ADT^A01")
@handlers.register("ADT^A04")
@handlers.register("ADT^A08")
@handlers.register("ADT^A28")
@handlers.register("ADT^A31")
def on_person(*, session: Session, message: Any, record: HL7Message) -> None:
    """Create or update the person of PID (identifiers, demographics, phones)."""
    reader = _Reader(message)
    pids = _segments(message, "PID")
    if not pids:
        raise MessageError(
            AckCode.ERROR, ErrorCode.SEGMENT_SEQUENCE, "缺少 PID 段 · PID segment missing", "PID"
        )
    person = _register(session, reader, pids[0], f"hl7:#{record.id}")
    from cloudfilm.hl7.orm import record_pv1  # orm builds on this module

    record_pv1(session=session, message=message, person_id=person.id, source=f"hl7:#{record.id}")


@handlers.register("ADT^A40")
def on_merge(*, session: Session, message: Any, record: HL7Message) -> None:
    """Each PID/MRG pair: register the surviving person of PID-3 (the HIS sends its full
    demographics), then merge the person of MRG-1 into it."""
    reader = _Reader(message)
    source = f"hl7:#{record.id}"
    pairs: list[tuple[Any, Any]] = []
    pid: Any = None
    for segment in message:
        name = str(segment[0])
        if name == "PID":
            pid = segment
        elif name == "MRG" and pid is not None:
            pairs.append((pid, segment))
            pid = None
    if not pairs:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.SEGMENT_SEQUENCE,
            "A40 需要 PID 段及其后的 MRG 段 · A40 needs a PID segment followed by MRG",
            "MRG",
        )
    for number, (pid, mrg) in enumerate(pairs, start=1):
        priors = _identifiers(reader, mrg, 1, f"MRG^{number}^1")
        if not priors:
            raise MessageError(
                AckCode.ERROR,
                ErrorCode.REQUIRED_FIELD_MISSING,
                "MRG-1 被合并患者标识为空 · MRG-1 prior patient identifier list is empty",
                f"MRG^{number}^1",
            )
        survivor = _register(session, reader, pid, source)
        prior = next((p for p in priors if mpi.find(session=session, ident=p)), priors[0])
        try:
            mpi.merge(
                session=session, survivor=survivor, prior=prior, actor=_sender(record),
                source=source,
            )  # fmt: skip
        except NotFound as exc:
            raise MessageError(
                AckCode.ERROR, ErrorCode.UNKNOWN_KEY, str(exc), f"MRG^{number}^1"
            ) from exc
        except Conflict as exc:
            raise MessageError(
                AckCode.ERROR, ErrorCode.DUPLICATE_KEY, str(exc), f"MRG^{number}^1"
            ) from exc
