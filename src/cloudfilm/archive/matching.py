"""Attribute matching on the index, shared by QIDO-RS and DIMSE C-FIND.

PS3.4 C.2.2.2 defines the matching types implemented here:

* single value matching (C.2.2.2.1), case-insensitive for person names;
* list of UID matching (C.2.2.2.2): ``uid1\\uid2``;
* universal matching (C.2.2.2.3): an empty value matches everything;
* wild card matching (C.2.2.2.4): ``*`` and ``?``;
* range matching (C.2.2.2.5): ``a-b``, ``a-``, ``-b`` for DA, TM and DT;
* fuzzy person-name matching (PS3.18 8.3.4.1 ``fuzzymatching``): case- and
  accent-insensitive prefix matching of name components; a Chinese name is found by its
  characters, its toneless pinyin (``wangxiaodong``, ``wang xiaodong``) or its initials
  (``wxd``).

Matching never builds SQL from text: every value is a bound parameter, and ``%``/``_``
in a query are escaped before wild cards become ``LIKE`` patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select, true
from sqlalchemy.orm import aliased

from cloudfilm.archive.models import Instance, Patient, Series, Study
from cloudfilm.archive.names import has_han, without_accents
from cloudfilm.errors import CloudFilmError


class QueryError(CloudFilmError):
    """A query the matching rules cannot accept (HTTP 400, C-FIND A900)."""


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Kind(StrEnum):
    TEXT = "text"
    UID = "uid"
    PN = "pn"
    DATE = "date"
    TIME = "time"
    INT = "int"
    MODALITIES = "modalities"


@dataclass(frozen=True, slots=True)
class Key:
    """A matchable attribute: the level it lives at, the column, how it matches."""

    level: Level
    column: Any
    kind: Kind


KEYS: dict[str, Key] = {
    "PatientID": Key(Level.PATIENT, Patient.patient_id, Kind.TEXT),
    "IssuerOfPatientID": Key(Level.PATIENT, Patient.issuer_of_patient_id, Kind.TEXT),
    "PatientName": Key(Level.PATIENT, Patient.patient_name, Kind.PN),
    "PatientSex": Key(Level.PATIENT, Patient.patient_sex, Kind.TEXT),
    "PatientBirthDate": Key(Level.PATIENT, Patient.patient_birth_date, Kind.DATE),
    "StudyInstanceUID": Key(Level.STUDY, Study.study_instance_uid, Kind.UID),
    "StudyDate": Key(Level.STUDY, Study.study_date, Kind.DATE),
    "StudyTime": Key(Level.STUDY, Study.study_time, Kind.TIME),
    "AccessionNumber": Key(Level.STUDY, Study.accession_number, Kind.TEXT),
    "StudyID": Key(Level.STUDY, Study.study_id, Kind.TEXT),
    "StudyDescription": Key(Level.STUDY, Study.study_description, Kind.TEXT),
    "ReferringPhysicianName": Key(Level.STUDY, Study.referring_physician_name, Kind.PN),
    "InstitutionName": Key(Level.STUDY, Study.institution_name, Kind.TEXT),
    "ModalitiesInStudy": Key(Level.STUDY, Series.modality, Kind.MODALITIES),
    "SeriesInstanceUID": Key(Level.SERIES, Series.series_instance_uid, Kind.UID),
    "Modality": Key(Level.SERIES, Series.modality, Kind.TEXT),
    "SeriesNumber": Key(Level.SERIES, Series.series_number, Kind.INT),
    "SeriesDescription": Key(Level.SERIES, Series.series_description, Kind.TEXT),
    "SeriesDate": Key(Level.SERIES, Series.series_date, Kind.DATE),
    "SeriesTime": Key(Level.SERIES, Series.series_time, Kind.TIME),
    "BodyPartExamined": Key(Level.SERIES, Series.body_part_examined, Kind.TEXT),
    "StationName": Key(Level.SERIES, Series.station_name, Kind.TEXT),
    "PerformedProcedureStepStartDate": Key(
        Level.SERIES, Series.performed_procedure_step_start_date, Kind.DATE
    ),
    "SOPInstanceUID": Key(Level.IMAGE, Instance.sop_instance_uid, Kind.UID),
    "SOPClassUID": Key(Level.IMAGE, Instance.sop_class_uid, Kind.UID),
    "InstanceNumber": Key(Level.IMAGE, Instance.instance_number, Kind.INT),
    "ContentDate": Key(Level.IMAGE, Instance.content_date, Kind.DATE),
    "ContentTime": Key(Level.IMAGE, Instance.content_time, Kind.TIME),
}

_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass(slots=True)
class Query:
    """What to find: the level, match keys with their DICOM match strings, paging."""

    level: Level
    matches: dict[str, str] = field(default_factory=dict)
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    scope: ColumnElement[bool] | None = None
    """The caller's data scope as a condition on :class:`Study` (``None``: every study)."""


def fold(text: str) -> str:
    """Lower case without accents or name separators: ``Müller^Hans`` → ``mullerhans``."""
    return re.sub(r"[\s^=,]", "", without_accents(text).lower())


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _range(column: ColumnElement[Any], value: str, kind: Kind) -> ColumnElement[bool]:
    low, _, high = value.partition("-")
    check = _DATE if kind is Kind.DATE else _TIME
    for bound in (low, high):
        if bound and not check.fullmatch(bound):
            raise QueryError(f"{value!r} is not a {kind.value} range (YYYYMMDD-YYYYMMDD)")
    if kind is Kind.TIME and high:
        high = high + "\uffff"  # 1012 covers 101259.999
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    conditions.append(column != "")
    return and_(*conditions)


def _pn_condition(
    column: ColumnElement[Any], value: str, fuzzy: bool, patient: bool
) -> ColumnElement[bool]:
    if not fuzzy:
        pattern = _like(value.lower()) if _has_wildcard(value) else None
        if pattern is not None:
            return func.lower(column).like(pattern, escape="\\")
        return func.lower(column) == value.lower()
    query = fold(value.replace("*", "").replace("?", ""))
    if not query:
        return true()
    prefix = _like(query) + "%"
    if not patient:  # referring physician: no pinyin columns, match the folded text
        return func.lower(func.replace(column, "^", "")).like("%" + _like(query) + "%", escape="\\")
    if has_han(query):
        ideographic = func.replace(Patient.patient_name_ideographic, "^", "")
        alphabetic = func.replace(Patient.patient_name_alphabetic, "^", "")
        return or_(ideographic.like(prefix, escape="\\"), alphabetic.like(prefix, escape="\\"))
    return or_(
        func.replace(Patient.patient_name_pinyin, "^", "").like(prefix, escape="\\"),
        Patient.patient_name_initials.like(prefix, escape="\\"),
        # each later name component (given name) as well: "xiaodong" finds wang^xiaodong
        Patient.patient_name_pinyin.like("%^" + prefix, escape="\\"),
    )


def condition(keyword: str, value: str, *, fuzzy: bool = False) -> ColumnElement[bool] | None:
    """The SQL condition for ``keyword`` matching ``value``; ``None`` for universal matching."""
    key = KEYS.get(keyword)
    if key is None:
        raise QueryError(
            f"{keyword} is not a search key here; searchable: {', '.join(sorted(KEYS))}"
        )
    if value in ("", "*"):
        return None
    column: ColumnElement[Any] = key.column
    if key.kind is Kind.UID:
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if any(_has_wildcard(u) for u in uids):
            raise QueryError(f"{keyword}: wild cards are not allowed in UIDs (PS3.4 C.2.2.2.4)")
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if key.kind in (Kind.DATE, Kind.TIME):
        if "-" in value:
            return _range(column, value, key.kind)
        check = _DATE if key.kind is Kind.DATE else _TIME
        if not _has_wildcard(value) and not check.fullmatch(value):
            raise QueryError(f"{keyword}: {value!r} is not a valid {key.kind.value}")
    if key.kind is Kind.INT:
        try:
            return column == int(value)
        except ValueError as exc:
            raise QueryError(f"{keyword}: {value!r} is not a number") from exc
    if key.kind is Kind.PN:
        return _pn_condition(column, value, fuzzy, patient=key.level is Level.PATIENT)
    if key.kind is Kind.MODALITIES:
        return study_has_modality([m.strip() for m in value.split("\\") if m.strip()])
    values = value.split("\\")
    parts = [
        column.like(_like(v), escape="\\") if _has_wildcard(v) else column == v for v in values
    ]
    return or_(*parts) if len(parts) > 1 else parts[0]


def study_has_modality(modalities: list[str]) -> ColumnElement[bool]:
    """The :class:`Study` has a series of one of ``modalities`` (ModalitiesInStudy).
    The subquery uses its own alias of the series table, so that it stays correlated to
    the study alone when the outer query selects series too."""
    series = aliased(Series)
    return exists(
        select(series.id)
        .where(series.study_pk == Study.id, series.modality.in_(modalities))
        .correlate(Study)
    )


def build_select(query: Query) -> Select[Any]:
    """``SELECT`` of the rows at ``query.level`` that match, joined up to the patient."""
    targets: dict[Level, list[Any]] = {
        Level.PATIENT: [Patient],
        Level.STUDY: [Study, Patient],
        Level.SERIES: [Series, Study, Patient],
        Level.IMAGE: [Instance, Series, Study, Patient],
    }
    stmt = select(*targets[query.level])
    if query.level is Level.IMAGE:
        stmt = stmt.join(Series, Instance.series_pk == Series.id)
    if query.level in (Level.IMAGE, Level.SERIES):
        stmt = stmt.join(Study, Series.study_pk == Study.id)
    if query.level is not Level.PATIENT:
        stmt = stmt.join(Patient, Study.patient_pk == Patient.id)
    depth = _DEPTH[query.level]
    for keyword, value in query.matches.items():
        key = KEYS.get(keyword)
        if key is None:
            raise QueryError(
                f"{keyword} is not a search key here; searchable: {', '.join(sorted(KEYS))}"
            )
        if _DEPTH[key.level] > depth and key.kind is not Kind.MODALITIES:
            level = query.level.value.lower()
            raise QueryError(f"{keyword} is below the {level} level; search deeper to use it")
        if key.kind is Kind.MODALITIES and query.level is Level.PATIENT:
            raise QueryError("ModalitiesInStudy needs a study-level search")
        cond = condition(keyword, value, fuzzy=query.fuzzy)
        if cond is not None:
            stmt = stmt.where(cond)
    if query.scope is not None:
        if query.level is Level.PATIENT:  # a patient is visible through a visible study
            stmt = stmt.where(
                exists(select(Study.id).where(Study.patient_pk == Patient.id, query.scope))
            )
        else:
            stmt = stmt.where(query.scope)
    return stmt


def ordered(stmt: Select[Any], level: Level) -> Select[Any]:
    """Stable order: newest studies first; series and instances by number."""
    if level is Level.PATIENT:
        return stmt.order_by(Patient.id)
    if level is Level.STUDY:
        return stmt.order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id)
    if level is Level.SERIES:
        return stmt.order_by(Series.series_number, Series.id)
    return stmt.order_by(Instance.instance_number, Instance.id)


def row_values(level: Level, row: Any) -> dict[str, Any]:
    """Every attribute the index holds for one result row of :func:`build_select` at
    ``level``, by keyword (what QIDO-RS and C-FIND answer with)."""
    patient: Patient = row.Patient
    result: dict[str, Any] = {
        "PatientName": patient.patient_name,
        "PatientID": patient.patient_id,
        "IssuerOfPatientID": patient.issuer_of_patient_id,
        "PatientSex": patient.patient_sex,
        "PatientBirthDate": patient.patient_birth_date,
        "InstanceAvailability": "ONLINE",
    }
    if level is Level.PATIENT:
        return result
    study: Study = row.Study
    result.update(
        StudyInstanceUID=study.study_instance_uid,
        StudyDate=study.study_date,
        StudyTime=study.study_time,
        AccessionNumber=study.accession_number,
        StudyID=study.study_id,
        StudyDescription=study.study_description,
        ReferringPhysicianName=study.referring_physician_name,
        InstitutionName=study.institution_name,
        ModalitiesInStudy=[m for m in study.modalities_in_study.split("\\") if m],
        NumberOfStudyRelatedSeries=study.number_of_series,
        NumberOfStudyRelatedInstances=study.number_of_instances,
    )
    if level is Level.STUDY:
        return result
    series: Series = row.Series
    result.update(
        SeriesInstanceUID=series.series_instance_uid,
        Modality=series.modality,
        SeriesNumber=series.series_number,
        SeriesDescription=series.series_description,
        SeriesDate=series.series_date,
        SeriesTime=series.series_time,
        BodyPartExamined=series.body_part_examined,
        StationName=series.station_name,
        InstitutionName=series.institution_name or study.institution_name,
        Manufacturer=series.manufacturer,
        PerformedProcedureStepStartDate=series.performed_procedure_step_start_date,
        NumberOfSeriesRelatedInstances=series.number_of_instances,
    )
    if level is Level.SERIES:
        return result
    instance: Instance = row.Instance
    result.update(
        SOPInstanceUID=instance.sop_instance_uid,
        SOPClassUID=instance.sop_class_uid,
        InstanceNumber=instance.instance_number,
        Rows=instance.rows,
        Columns=instance.columns,
        NumberOfFrames=instance.number_of_frames,
        BitsAllocated=instance.bits_allocated,
        BitsStored=instance.bits_stored,
        SamplesPerPixel=instance.samples_per_pixel,
        PhotometricInterpretation=instance.photometric_interpretation,
        ContentDate=instance.content_date,
        ContentTime=instance.content_time,
        AvailableTransferSyntaxUID=instance.transfer_syntax_uid,
    )
    return result
