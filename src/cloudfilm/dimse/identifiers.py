"""Query/Retrieve identifiers ↔ the archive's matching engine (PS3.4 C.4, C.6).

A C-FIND, C-MOVE or C-GET request carries an *Identifier*: a data set whose elements are
the keys. This module turns one into a ``SELECT`` with :mod:`cloudfilm.archive.matching`
and, for C-FIND, builds the response identifiers from index rows. No database access and
no networking happen here.

Matching (PS3.4 C.2.2.2) is the shared engine's: single value, list of UIDs, universal,
wild card (``*``, ``?``) and range (``a-b``, ``a-``, ``-b``) matching on the keys in
:data:`~cloudfilm.archive.matching.KEYS`. Patient's Name additionally matches each of
its component groups (alphabetic, ideographic, phonetic): ``王*`` finds
``Wang^XiaoDong=王^小东``. Keys we do not index are universally matched and returned
empty (PS3.4 C.4.1.1.3.2); keys below the query level are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import ColumnElement, Select, and_, func, or_, true

from cloudfilm.archive.matching import (
    KEYS,
    Level,
    Query,
    QueryError,
    build_select,
    ordered,
    row_values,
)
from cloudfilm.archive.models import Instance, Patient, Series, Study


class Root(StrEnum):
    PATIENT = "patient"
    STUDY = "study"


@dataclass(frozen=True, slots=True)
class InformationModel:
    """A Query/Retrieve information model (PS3.4 C.6.1, C.6.2)."""

    uid: str
    root: Root
    service: str
    """``C-FIND``, ``C-MOVE`` or ``C-GET``."""

    @property
    def levels(self) -> tuple[Level, ...]:
        if self.root is Root.PATIENT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


MODELS: dict[str, InformationModel] = {
    str(uid): InformationModel(str(uid), root, service)
    for uid, root, service in (
        (PatientRootQueryRetrieveInformationModelFind, Root.PATIENT, "C-FIND"),
        (StudyRootQueryRetrieveInformationModelFind, Root.STUDY, "C-FIND"),
        (PatientRootQueryRetrieveInformationModelMove, Root.PATIENT, "C-MOVE"),
        (StudyRootQueryRetrieveInformationModelMove, Root.STUDY, "C-MOVE"),
        (PatientRootQueryRetrieveInformationModelGet, Root.PATIENT, "C-GET"),
        (StudyRootQueryRetrieveInformationModelGet, Root.STUDY, "C-GET"),
    )
}
"""The information models we serve, by SOP Class UID."""

_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
"""The unique key of each level (PS3.4 C.6.1.1, C.6.2.1)."""

_SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
_QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
_PATIENT_COUNTS = (
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
#: Character sets a response may use besides UTF-8: those that encode every character.
_UNIVERSAL_CHARSETS = ("ISO_IR 192", "GB18030")


@dataclass(frozen=True, slots=True)
class ReturnKey:
    """An element the C-FIND response carries: the request's keys plus the unique keys."""

    tag: BaseTag
    keyword: str
    vr: str


@dataclass(slots=True)
class FindRequest:
    """A parsed C-FIND identifier."""

    level: Level
    matches: dict[str, str]
    """The matching keys with their values, as received (for the audit trail)."""
    statement: Select[Any]
    keys: list[ReturnKey]
    charset: str = "ISO_IR 192"
    """The character set non-ASCII responses use: the request's, when it can encode
    everything (GB18030), else UTF-8."""
    wants_patient_counts: bool = False


@dataclass(slots=True)
class RetrieveRequest:
    """A parsed C-MOVE or C-GET identifier: which instances to send."""

    level: Level
    matches: dict[str, str]
    statement: Select[str, str, str, str, str, str]
    """Rows of (SOP Instance UID, SOP Class UID, Transfer Syntax UID, storage key,
    Study Instance UID, Patient ID), in study, series and instance order."""


@dataclass(frozen=True, slots=True)
class MatchedInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    storage_key: str
    study_instance_uid: str
    patient_id: str


def parse_find(identifier: Dataset, model: InformationModel) -> FindRequest:
    """The query for a C-FIND identifier (PS3.4 C.4.1.2, C.2.2.2).

    Raises
    ------
    QueryError
        When the identifier cannot be used: missing or unsupported Query/Retrieve Level,
        a malformed value (``2024-13-01``), wild cards in a UID (C-FIND status ``A900``).
    """
    level = _level(identifier, model)
    depth = _ORDER.index(level)
    matches: dict[str, str] = {}
    name: str | None = None
    keys: list[ReturnKey] = []
    charset = "ISO_IR 192"
    for elem in _elements(identifier):
        if elem.tag == _SPECIFIC_CHARACTER_SET:
            requested = _values(elem.value)
            charset = next((c for c in requested if c in _UNIVERSAL_CHARSETS), charset)
            continue
        if elem.tag == _QUERY_RETRIEVE_LEVEL or elem.tag.group in (0x0000, 0x0002):
            continue
        keyword = elem.keyword or ""
        vr = dictionary_VR(elem.tag) if keyword and elem.VR == "UN" else elem.VR
        keys.append(ReturnKey(elem.tag, keyword, "US" if vr == "US or SS" else vr))
        key = KEYS.get(keyword)
        if key is None or elem.VR == "SQ":
            continue  # not indexed: universal matching (PS3.4 C.4.1.1.3.2)
        if _ORDER.index(key.level) > depth:
            continue  # below the query level: not a key of this query
        if keyword == "ModalitiesInStudy" and level is Level.PATIENT:
            continue
        value = _text(keyword, elem.value)
        if value in ("", "*"):
            continue
        if keyword == "PatientName":
            name = value
        else:
            matches[keyword] = value
    for above in _ORDER[_ORDER.index(model.levels[0]) : depth + 1]:
        keyword = UNIQUE_KEYS[above]
        if all(k.keyword != keyword for k in keys):  # always return the unique keys
            tag = Tag(keyword)
            keys.append(ReturnKey(tag, keyword, dictionary_VR(tag)))
    statement = build_select(Query(level=level, matches=dict(matches)))
    if name is not None:
        statement = statement.where(patient_name_condition(name))
        matches["PatientName"] = name
    return FindRequest(
        level=level,
        matches=matches,
        statement=ordered(statement, level),
        keys=keys,
        charset=charset,
        wants_patient_counts=any(k.keyword in _PATIENT_COUNTS for k in keys),
    )


def parse_retrieve(identifier: Dataset, model: InformationModel) -> RetrieveRequest:
    """The instances a C-MOVE or C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

    Only the unique keys of the retrieve level and the levels above it select; the
    unique key of the retrieve level is required, so that an empty identifier never
    sends the whole archive. Other keys are ignored.

    Raises
    ------
    QueryError
        Missing level or unique key, wild cards in a unique key.
    """
    level = _level(identifier, model)
    matches: dict[str, str] = {}
    for above in _ORDER[: _ORDER.index(level) + 1]:
        keyword = UNIQUE_KEYS[above]
        value = _text(keyword, _get(identifier, keyword))
        if value and ("*" in value or "?" in value):
            raise QueryError(f"{keyword}: a retrieve names objects by value, not by pattern")
        if value:
            matches[keyword] = value
        elif above is level:
            raise QueryError(f"a {level.value} level retrieve needs {keyword}")
    statement = (
        build_select(Query(level=Level.IMAGE, matches=matches))
        .with_only_columns(
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.storage_key,
            Study.study_instance_uid,
            Patient.patient_id,
        )
        .order_by(Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    return RetrieveRequest(level=level, matches=matches, statement=statement)


def patient_name_condition(value: str) -> ColumnElement[bool]:
    """Patient's Name matching, group by group (PS3.4 C.2.2.2.1, C.2.2.2.4).

    A value without ``=`` matches the whole name or any one of its component groups, so
    a query by the ideographic name alone finds ``Wang^XiaoDong=王^小东``. A value with
    ``=`` matches its groups against the stored groups in order. Case-insensitive, as
    PS3.4 permits for PN; ``*`` and ``?`` are wild cards.
    """
    groups = value.split("=")
    if len(groups) == 1:
        columns = (
            Patient.patient_name,
            Patient.patient_name_alphabetic,
            Patient.patient_name_ideographic,
            Patient.patient_name_phonetic,
        )
        return or_(*(_pn_match(column, value) for column in columns))
    stored = (
        Patient.patient_name_alphabetic,
        Patient.patient_name_ideographic,
        Patient.patient_name_phonetic,
    )
    parts = [_pn_match(c, g) for c, g in zip(stored, groups, strict=False) if g not in ("", "*")]
    return and_(*parts) if parts else true()


def _pn_match(column: Any, value: str) -> ColumnElement[bool]:
    folded = value.lower()
    if "*" in folded or "?" in folded:
        escaped = folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = escaped.replace("*", "%").replace("?", "_")
        return func.lower(column).like(pattern, escape="\\")
    result: ColumnElement[bool] = func.lower(column) == folded
    return result


def values(level: Level, row: Any, *, ae_title: str) -> dict[str, Any]:
    """Every attribute we can return for one result row at ``level``, by keyword."""
    return {**row_values(level, row), "RetrieveAETitle": ae_title}


def response(request: FindRequest, found: dict[str, Any]) -> Dataset:
    """The C-FIND response identifier: every requested key, filled from ``found`` where
    we have a value and empty otherwise (PS3.4 C.4.1.1.3.2)."""
    ds = Dataset()
    non_ascii = False
    for key in request.keys:
        if key.vr == "SQ":
            ds.add_new(key.tag, "SQ", [])
            continue
        value = found.get(key.keyword) if key.keyword else None
        if value in ("", [], None):
            value = None
        elif isinstance(value, str):
            non_ascii = non_ascii or not value.isascii()
        ds.add_new(key.tag, key.vr, value)
    ds.QueryRetrieveLevel = request.level.value
    if non_ascii:
        ds.SpecificCharacterSet = request.charset
    return ds


def _level(identifier: Dataset, model: InformationModel) -> Level:
    raw = _get(identifier, "QueryRetrieveLevel")
    text = str(raw or "").strip().upper()
    try:
        level = Level(text)
    except ValueError:
        raise QueryError(
            f"Query/Retrieve Level {text!r} is not one of PATIENT, STUDY, SERIES, IMAGE"
            if text
            else "the identifier has no Query/Retrieve Level (0008,0052)"
        ) from None
    if level not in model.levels:
        raise QueryError(f"{level.value} is not a level of the {model.root.value} root model")
    return level


def _elements(identifier: Dataset) -> Iterable[Any]:
    """The identifier's elements, decoded; a value pydicom cannot decode is a QueryError."""
    try:
        return list(identifier)
    except Exception as exc:
        raise QueryError(f"the identifier cannot be decoded: {exc}") from exc


def _get(identifier: Dataset, keyword: str) -> Any:
    try:
        return identifier.get(keyword)
    except Exception as exc:
        raise QueryError(f"{keyword}: the value cannot be decoded") from exc


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _text(keyword: str, value: Any) -> str:
    """A key's value as the DICOM match string (``\\`` between values)."""
    try:
        return "\\".join(_values(value)).strip()
    except Exception as exc:
        raise QueryError(f"{keyword}: the value cannot be decoded") from exc
