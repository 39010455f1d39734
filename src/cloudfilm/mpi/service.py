"""Use cases of the patient master index: register and update persons, look them up by
identifier (PIX) and by demographics (PDQ), merge and unmerge (ADT A40).

Functions take the session keyword-only, flush and never commit (STYLE 2); the HL7
listener, the command line and the HTTP routes own the transactions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import and_, false, func, or_, select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Patient, Study
from cloudfilm.archive.names import has_han, to_pinyin, without_accents
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.crypto.keys import SealError
from cloudfilm.errors import BadRequest, Conflict, NotFound
from cloudfilm.mpi import idcard
from cloudfilm.mpi.keys import MPIKeys, keys_of
from cloudfilm.mpi.models import Person, PersonHistory, PersonIdentifier, PersonMerge

ID_CARD = "NNCHN"
"""HL7 table 0203 ``NNxxx``: national person identifier of China (居民身份证号码)."""
PHONE = "PHONE"
"""A phone number (PID-13, or a PID-3 repeat typed PHONE/TEL)."""
SEALED_TYPES = frozenset({ID_CARD, PHONE})

#: Type codes senders use → the one we store. Chinese HIS write the ID card as ID, NI or
#: SFZ; HL7 v2.5 table 0203 says NNCHN. Anything else is kept as sent (upper-cased).
TYPE_ALIASES = {
    "NI": ID_CARD,
    "ID": ID_CARD,
    "SFZ": ID_CARD,
    "NNCHN": ID_CARD,
    "TEL": PHONE,
    "PH": PHONE,
    "PHONE": PHONE,
}

#: What the types mean, for people reading API answers.
TYPE_LABELS = {
    "PI": "患者ID · hospital patient ID",
    "MR": "病案号 · medical record number",
    "MC": "就诊卡/医保卡号 · medical card number",
    ID_CARD: "身份证号 · resident ID card",
    "PPN": "护照号 · passport",
    PHONE: "电话 · phone",
    "OP": "门诊号 · outpatient number",
    "IP": "住院号 · inpatient number",
}

SEXES = frozenset({"M", "F", "O", "U", "A", "N"})
#: GB/T 2261.1 codes and Chinese words some HIS send in PID-8 → HL7 table 0001.
SEX_ALIASES = {"1": "M", "2": "F", "0": "U", "9": "U", "男": "M", "女": "F", "未知": "U"}
_TYPE = re.compile(r"^[A-Z0-9_]{1,16}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidIdentifier(BadRequest):
    """An identifier that cannot be taken: bad type, bad characters, bad ID-card number."""


@dataclass(frozen=True, slots=True)
class Identifier:
    """An identifier as a sender gives it (normalised by :func:`identifier`)."""

    id_type: str
    authority: str
    value: str

    @property
    def sealed(self) -> bool:
        return self.id_type in SEALED_TYPES


@dataclass(slots=True)
class Demographics:
    """Fields a message or request sets; ``None`` leaves the stored value as it is."""

    name: str | None = None
    sex: str | None = None
    birth_date: str | None = None
    address: str | None = None


def _clean(text: str, limit: int, what: str) -> str:
    value = text.strip()
    if _CONTROL.search(value):
        raise InvalidIdentifier(f"{what}含有控制字符 · {what} holds control characters")
    if len(value) > limit:
        raise InvalidIdentifier(f"{what}过长（最多{limit}个字符） · {what} longer than {limit}")
    return value


def normalize_phone(value: str) -> str:
    digits = re.sub(r"[\s()\-+.]", "", value.strip().translate(_FULL_DIGITS))
    if digits.startswith("0086"):
        digits = digits[4:]
    elif digits.startswith("86") and len(digits) == 13:
        digits = digits[2:]
    if not digits.isdigit() or not 5 <= len(digits) <= 20:
        raise InvalidIdentifier("电话号码无效 · the phone number is not 5 to 20 digits")
    return digits


_FULL_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")


def identifier(id_type: str, authority: str, value: str) -> Identifier:
    """Validate and normalise one identifier.

    Raises
    ------
    InvalidIdentifier
        An empty value, a type that is not a code, control characters, a value that is
        too long, an ID-card number failing GB 11643, a phone that is not digits.
    """
    kind = (id_type or "PI").strip().upper()
    kind = TYPE_ALIASES.get(kind, kind)
    if not _TYPE.match(kind):
        raise InvalidIdentifier(
            "标识类型应为1-16位字母或数字代码（HL7 表0203，如 PI、MC、NNCHN） · "
            "the identifier type is a code of 1-16 letters or digits (HL7 table 0203)"
        )
    issuer = _clean(authority or "", 64, "发证机构 assigning authority")
    number = _clean(value or "", 64, "标识值 identifier value")
    if not number:
        raise InvalidIdentifier("标识值为空 · the identifier value is empty")
    if kind == ID_CARD:
        try:
            number = idcard.validate(number)
        except idcard.InvalidIdCard as exc:
            raise InvalidIdentifier(str(exc)) from exc
    elif kind == PHONE:
        number = normalize_phone(number)
    return Identifier(kind, issuer, number)


# ---------------------------------------------------------------- lookups


def _match(keys: MPIKeys, ident: Identifier) -> Any:
    if ident.sealed:
        condition = PersonIdentifier.blind_index == keys.blind_index(ident.id_type, ident.value)
    else:
        condition = PersonIdentifier.value == ident.value
    return and_(
        PersonIdentifier.id_type == ident.id_type,
        PersonIdentifier.authority == ident.authority,
        condition,
    )


def resolve(session: Session, person: Person) -> Person:
    """The person that ``person`` was merged into, followed to the end (or itself)."""
    seen = {person.id}
    while person.merged_into is not None:
        merged = session.get(Person, person.merged_into)
        if merged is None or merged.id in seen:
            break
        seen.add(merged.id)
        person = merged
    return person


def find(*, session: Session, ident: Identifier) -> Person | None:
    """The (surviving) person holding ``ident``; for a phone shared by several persons,
    the one that has held it longest."""
    keys = keys_of(session)
    row = session.scalars(
        select(PersonIdentifier).where(_match(keys, ident)).order_by(PersonIdentifier.id).limit(1)
    ).first()
    return resolve(session, row.person) if row is not None else None


def get_person(*, session: Session, person_id: int) -> Person:
    person = session.get(Person, person_id)
    if person is None:
        raise NotFound(f"患者主索引中无此人 · no person {person_id} in the patient index")
    return person


def _persons_holding(session: Session, keys: MPIKeys, idents: Iterable[Identifier]) -> list[Person]:
    found: dict[int, Person] = {}
    for ident in idents:
        if ident.id_type == PHONE:
            continue  # shared by families: never decides who someone is
        rows = session.scalars(select(PersonIdentifier).where(_match(keys, ident))).all()
        for row in rows:
            person = resolve(session, row.person)
            found[person.id] = person
    return list(found.values())


# ---------------------------------------------------------------- register / update


def _now() -> datetime:
    return datetime.now(UTC)


def _name_forms(name: str) -> tuple[str, str]:
    if has_han(name):
        pinyin, initials = to_pinyin(name)
        return pinyin.replace("^", ""), initials
    plain = re.sub(r"[^a-z]", "", without_accents(name).lower())
    return plain, ""


def normalize_birth_date(value: str) -> str:
    """``YYYYMMDD`` from ``YYYYMMDD[HHMM...]`` or ``YYYY-MM-DD``; empty stays empty."""
    text = value.strip().replace("-", "")[:8]
    if not text:
        return ""
    try:
        born = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError as exc:
        raise InvalidIdentifier(
            "出生日期应为 YYYYMMDD 或 YYYY-MM-DD · birth date is YYYYMMDD or YYYY-MM-DD"
        ) from exc
    if len(text) != 8 or not text.isdigit() or born.year < 1800:
        raise InvalidIdentifier("出生日期无效 · the birth date is invalid")
    return text


def _checked(demo: Demographics) -> dict[str, str]:
    values: dict[str, str] = {}
    if demo.name is not None:
        values["name"] = _clean(demo.name, 200, "姓名 name")
    if demo.sex is not None:
        sex = demo.sex.strip()
        sex = SEX_ALIASES.get(sex, sex.upper())
        if sex and sex not in SEXES:
            raise InvalidIdentifier("性别应为 M、F、O、U · sex is M, F, O or U (HL7 table 0001)")
        values["sex"] = sex
    if demo.birth_date is not None:
        values["birth_date"] = normalize_birth_date(demo.birth_date)
    if demo.address is not None:
        values["address"] = _clean(demo.address, 400, "地址 address")
    return values


def _apply_demographics(
    session: Session, person: Person, values: dict[str, str], source: str, now: datetime
) -> None:
    before = {k: getattr(person, k) for k, v in values.items() if getattr(person, k) != v}
    if not before:
        return
    after = {k: values[k] for k in before}
    for key, value in after.items():
        setattr(person, key, value)
    if "name" in after:
        person.name_pinyin, person.name_initials = _name_forms(person.name)
    person.updated_at = now
    session.add(
        PersonHistory(
            person_id=person.id, changed_at=now, source=source[:128], before=before, after=after
        )
    )


def _add_identifier(
    session: Session, keys: MPIKeys, person: Person, ident: Identifier, now: datetime
) -> None:
    row = PersonIdentifier(
        person_id=person.id, id_type=ident.id_type, authority=ident.authority, created_at=now
    )
    if ident.sealed:
        row.value_sealed = keys.seal(ident.value)
        row.key_id = keys.key_id
        row.blind_index = keys.blind_index(ident.id_type, ident.value)
    else:
        row.value = ident.value
    session.add(row)


def register(
    *,
    session: Session,
    identifiers: Sequence[Identifier],
    demographics: Demographics,
    source: str,
    now: datetime | None = None,
) -> Person:
    """Create the person the identifiers name, or update the one that holds them (ADT
    A01/A04/A08/A28/A31, FHIR Patient): new identifiers are added, changed demographics
    recorded in the history, and the phone numbers replaced by the ones given.

    Raises
    ------
    InvalidIdentifier
        No identifier other than a phone, or bad demographics.
    Conflict
        The identifiers belong to two different persons (they must be merged first).
    """
    if not any(i.id_type != PHONE for i in identifiers):
        raise InvalidIdentifier(
            "至少需要一个患者标识（电话除外） · at least one identifier other than a phone"
        )
    keys = keys_of(session)
    now = now or _now()
    values = _checked(demographics)
    holders = _persons_holding(session, keys, identifiers)
    if len(holders) > 1:
        raise Conflict(
            "这些标识属于患者主索引中的不同人员，请先合并（ADT A40） · the identifiers belong "
            f"to {len(holders)} different persons ({', '.join(str(p.id) for p in holders)}): "
            "merge them first (ADT A40)"
        )
    if holders:
        person = holders[0]
    else:
        person = Person(created_at=now, updated_at=now)
        session.add(person)
        session.flush()
    _apply_demographics(session, person, values, source, now)
    existing = session.scalars(
        select(PersonIdentifier).where(PersonIdentifier.person_id == person.id)
    ).all()
    phones = [i for i in identifiers if i.id_type == PHONE]
    held = {(r.id_type, r.authority, r.value, r.blind_index) for r in existing}
    if phones:
        wanted = {keys.blind_index(PHONE, p.value) for p in phones}
        for row in existing:
            if row.id_type == PHONE and row.blind_index not in wanted:
                session.delete(row)
    seen: set[tuple[str, str, str | None, str | None]] = set()
    for ident in identifiers:
        index = keys.blind_index(ident.id_type, ident.value) if ident.sealed else None
        key = (ident.id_type, ident.authority, None if ident.sealed else ident.value, index)
        if key in held or key in seen:
            continue
        seen.add(key)
        _add_identifier(session, keys, person, ident, now)
        person.updated_at = now
    session.flush()
    return person


# ---------------------------------------------------------------- merge / unmerge


def merge(
    *,
    session: Session,
    survivor: Identifier | Person,
    prior: Identifier,
    actor: audit.Actor,
    source: str,
    now: datetime | None = None,
) -> PersonMerge:
    """Merge the person holding ``prior`` into ``survivor`` (ADT A40 semantics): every
    identifier of the prior person moves to the survivor, so its studies follow; the
    prior person stays, marked ``merged_into``, for :func:`unmerge`. Audited.

    A merge that was done already (the prior identifier is the survivor's) is answered
    with that merge again: a resent A40 changes nothing.

    Raises
    ------
    NotFound
        Either person is not in the index.
    Conflict
        Merging a person into itself by other identifiers.
    """
    now = now or _now()
    kept = survivor if isinstance(survivor, Person) else find(session=session, ident=survivor)
    if kept is None:
        raise NotFound(
            "合并失败：保留的患者不在患者主索引中 · merge refused: the surviving patient "
            "is not in the patient index (register it first, e.g. ADT A01/A28)"
        )
    kept = resolve(session, kept)
    gone = find(session=session, ident=prior)
    if gone is None:
        raise NotFound(
            f"合并失败：患者主索引中没有被合并患者（{prior.id_type} {prior.authority}）· "
            "merge refused: no patient in the index holds the prior identifier (MRG-1); "
            "check the identifier and its assigning authority"
        )
    if gone.id == kept.id:
        done = session.scalars(
            select(PersonMerge)
            .where(PersonMerge.survivor_id == kept.id, PersonMerge.undone_at.is_(None))
            .order_by(PersonMerge.id.desc())
        ).first()
        if done is not None:
            return done
        raise Conflict(
            "合并失败：两个标识属于同一人 · merge refused: both identifiers name the same person"
        )
    moved = session.scalars(
        select(PersonIdentifier).where(PersonIdentifier.person_id == gone.id)
    ).all()
    for row in moved:
        row.person_id = kept.id
        row.merged_from = gone.id
    gone.merged_into = kept.id
    gone.updated_at = kept.updated_at = now
    record = PersonMerge(
        survivor_id=kept.id,
        prior_id=gone.id,
        identifier_ids=sorted(r.id for r in moved),
        merged_at=now,
        source=source[:128],
    )
    session.add(record)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.PATIENT_MERGED,
        action=AuditAction.UPDATE,
        object_type="mpi-person",
        object_id=str(kept.id),
        patient_id=_primary_id(moved),
        message=f"person {gone.id} merged into {kept.id}",
        detail={
            "merge": record.id,
            "survivor": kept.id,
            "prior": gone.id,
            "identifiers_moved": len(moved),
            "source": source,
        },
    )
    return record


def unmerge(
    *,
    session: Session,
    prior_id: int,
    actor: audit.Actor,
    source: str,
    now: datetime | None = None,
) -> PersonMerge:
    """Reverse the last merge of person ``prior_id``: its identifiers (and so its studies)
    go back to it and it is a person of its own again. Audited.

    Raises
    ------
    NotFound
        No such person, or it is not merged.
    """
    now = now or _now()
    gone = get_person(session=session, person_id=prior_id)
    record = session.scalars(
        select(PersonMerge)
        .where(PersonMerge.prior_id == gone.id, PersonMerge.undone_at.is_(None))
        .order_by(PersonMerge.id.desc())
    ).first()
    if record is None or gone.merged_into is None:
        raise NotFound(
            f"该患者（{prior_id}）未被合并，无法拆分 · person {prior_id} is not merged: "
            "nothing to unmerge"
        )
    # The identifiers that merge moved, where they are now: with the survivor, or with the
    # person the survivor was merged into since. One that went back to its own person by
    # another unmerge in between stays there.
    survivor = session.get(Person, record.survivor_id)
    holder = resolve(session, survivor).id if survivor is not None else record.survivor_id
    rows = session.scalars(
        select(PersonIdentifier).where(
            PersonIdentifier.id.in_(record.identifier_ids or [-1]),
            PersonIdentifier.person_id == holder,
        )
    ).all()
    for row in rows:
        row.person_id = gone.id
        row.merged_from = None
    gone.merged_into = None
    gone.updated_at = now
    record.undone_at = now
    record.undone_by = source[:128]
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.PATIENT_UNMERGED,
        action=AuditAction.UPDATE,
        object_type="mpi-person",
        object_id=str(gone.id),
        patient_id=_primary_id(rows),
        message=f"person {gone.id} unmerged from {record.survivor_id}",
        detail={
            "merge": record.id,
            "survivor": record.survivor_id,
            "prior": gone.id,
            "identifiers_returned": len(rows),
            "source": source,
        },
    )
    return record


def _primary_id(rows: Iterable[PersonIdentifier]) -> str | None:
    """A hospital patient ID for the audit record's patient field (never a sealed one)."""
    for row in rows:
        if row.id_type == "PI" and row.value:
            return row.value[:64]
    return None


# ---------------------------------------------------------------- PDQ


@dataclass(slots=True)
class DemographicQuery:
    name: str | None = None
    pinyin: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    id_card: str | None = None
    limit: int = 20


_LIKE_SPECIAL = re.compile(r"([\\%_])")


def _prefix(value: str) -> str:
    return _LIKE_SPECIAL.sub(r"\\\1", value) + "%"


def pdq(*, session: Session, query: DemographicQuery) -> list[Person]:
    """Persons (not merged away) matching every given criterion: the name exactly or as a
    prefix, the pinyin (full or initials, as a prefix), the birth date, sex, ID-card
    number (through the blind index).

    Raises
    ------
    InvalidIdentifier
        No criterion, or one that is malformed.
    """
    conditions: list[Any] = [Person.merged_into.is_(None)]
    given = False
    if query.name:
        name = _clean(query.name, 100, "姓名 name").lower()
        conditions.append(func.lower(Person.name).like(_prefix(name), escape="\\"))
        given = True
    if query.pinyin:
        pinyin = re.sub(r"[\s^'·]", "", query.pinyin.lower())
        if not pinyin.isascii() or not pinyin.isalpha() or len(pinyin) > 64:
            raise InvalidIdentifier("拼音只能包含字母 · pinyin is letters only")
        conditions.append(
            or_(
                Person.name_pinyin.like(_prefix(pinyin), escape="\\"),
                Person.name_initials.like(_prefix(pinyin), escape="\\"),
            )
        )
        given = True
    if query.birth_date:
        conditions.append(Person.birth_date == normalize_birth_date(query.birth_date))
        given = True
    if query.sex:
        sex = query.sex.strip()
        sex = SEX_ALIASES.get(sex, sex.upper())
        if sex not in SEXES:
            raise InvalidIdentifier("性别应为 M、F、O、U · sex is M, F, O or U (HL7 table 0001)")
        conditions.append(Person.sex == sex)
    if query.id_card:
        ident = identifier(ID_CARD, "", query.id_card)
        keys = keys_of(session)
        holders = select(PersonIdentifier.person_id).where(
            PersonIdentifier.id_type == ID_CARD,
            PersonIdentifier.blind_index == keys.blind_index(ID_CARD, ident.value),
        )
        conditions.append(Person.id.in_(holders))
        given = True
    if not given:
        raise InvalidIdentifier(
            "请至少提供姓名、拼音、出生日期或身份证号之一 · give at least one of name, "
            "pinyin, birth_date, id_card"
        )
    limit = max(1, min(query.limit, 100))
    return list(session.scalars(select(Person).where(*conditions).order_by(Person.id).limit(limit)))


# ---------------------------------------------------------------- the archive side


def identifiers_of(*, session: Session, person: Person) -> list[PersonIdentifier]:
    return list(
        session.scalars(
            select(PersonIdentifier)
            .where(PersonIdentifier.person_id == person.id)
            .order_by(PersonIdentifier.id)
        )
    )


def patients_condition(rows: Iterable[PersonIdentifier]) -> Any:
    """Archive patients of these identifiers: PatientID = the value and Issuer of
    Patient ID = the assigning authority; a DICOM patient without an issuer matches a
    hospital patient ID (type PI) of any authority."""
    parts = []
    for row in rows:
        if row.value is None:
            continue  # sealed numbers are not DICOM Patient IDs
        same = Patient.patient_id == row.value
        parts.append(and_(same, Patient.issuer_of_patient_id == row.authority))
        if row.id_type == "PI" and row.authority:
            parts.append(and_(same, Patient.issuer_of_patient_id == ""))
    return or_(*parts) if parts else false()


def studies_of(
    *, session: Session, person: Person, scope: Any = None, limit: int = 200
) -> list[Study]:
    """The archive's studies of ``person`` (through its identifiers), newest first;
    ``scope`` narrows them to the caller's data scope (a condition on :class:`Study`)."""
    rows = identifiers_of(session=session, person=resolve(session, person))
    query = (
        select(Study)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(patients_condition(rows))
        .order_by(Study.study_date.desc(), Study.id.desc())
        .limit(limit)
    )
    if scope is not None:
        query = query.where(scope)
    return list(session.scalars(query))


def person_of_patient(*, session: Session, patient_id: str, issuer: str = "") -> Person | None:
    """The person an archive patient (PatientID + Issuer of Patient ID) belongs to."""
    conditions = [PersonIdentifier.value == patient_id]
    if issuer:
        conditions.append(PersonIdentifier.authority == issuer)
    else:
        conditions.append(PersonIdentifier.id_type == "PI")
    row = session.scalars(
        select(PersonIdentifier).where(*conditions).order_by(PersonIdentifier.id).limit(1)
    ).first()
    return resolve(session, row.person) if row is not None else None


def history_of(*, session: Session, person: Person) -> list[PersonHistory]:
    return list(
        session.scalars(
            select(PersonHistory)
            .where(PersonHistory.person_id == person.id)
            .order_by(PersonHistory.id)
        )
    )


def mask_name(name: str) -> str:
    """``张小三`` → ``张*三``, ``张三`` → ``张*``, ``Zhang San`` → ``Z**** S**``."""
    text = (name or "").strip()
    if not text:
        return ""
    if has_han(text):
        chars = [c for c in text if c not in "^ \t"]
        if len(chars) <= 1:
            return "*"
        if len(chars) == 2:
            return chars[0] + "*"
        return chars[0] + "*" * (len(chars) - 2) + chars[-1]
    words = [w for w in re.split(r"[\s^]+", text) if w]
    return " ".join(w[0] + "*" * (len(w) - 1) for w in words)


def mask(id_type: str, value: str) -> str:
    """``110105********002X``, ``138****5678``: enough to recognise, not to use."""
    if id_type == ID_CARD and len(value) == 18:
        return value[:6] + "*" * 8 + value[14:]
    if len(value) >= 7:
        return value[:3] + "*" * (len(value) - 7) + value[-4:]
    return "*" * len(value)


def describe_identifier(keys: MPIKeys, row: PersonIdentifier, *, reveal: bool) -> dict[str, Any]:
    if row.value_sealed is not None:
        try:
            clear = keys.open(row.value_sealed)
        except SealError:
            clear = ""  # sealed under another application secret: say so, do not fail
        if not clear:
            value = f"（无法解密，密钥 {row.key_id}）· cannot be opened (key {row.key_id})"
        else:
            value = clear if reveal else mask(row.id_type, clear)
    else:
        value = row.value or ""
    return {
        "type": row.id_type,
        "type_label": TYPE_LABELS.get(row.id_type, row.id_type),
        "authority": row.authority,
        "value": value,
        "masked": row.value_sealed is not None and not reveal,
    }
