"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Responses are built from the index columns (the attributes of PS3.18 Table 10.6.3-3 and
the computed ones), plus, for ``includefield``, attributes taken from the stored DICOM
JSON of one instance of each result — never from a blob.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloudfilm.archive.matching import (
    KEYS,
    Level,
    Query,
    QueryError,
    build_select,
    ordered,
    row_values,
)
from cloudfilm.archive.models import Instance, InstanceMetadata, Series

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}

#: Attributes every result carries, per level (PS3.18 Table 10.6.3-3).
DEFAULTS = {
    Level.STUDY: [
        "SpecificCharacterSet",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "InstitutionName",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "RetrieveURL",
    ],
    Level.SERIES: [
        "SpecificCharacterSet",
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "StudyInstanceUID",
        "RetrieveURL",
    ],
    Level.IMAGE: [
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "RetrieveURL",
    ],
}


@dataclass(slots=True)
class SearchRequest:
    query: Query
    include: set[str]
    include_all: bool


def keyword_of(attribute: str) -> str:
    """``PatientName`` or ``00100010`` → ``PatientName``; 400 for anything else."""
    if _TAG.fullmatch(attribute):
        keyword = keyword_for_tag(int(attribute, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(attribute) is not None:
        return attribute
    raise QueryError(f"unknown attribute {attribute!r}: use a DICOM keyword or an 8-digit tag")


def parse_search(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    max_results: int,
    fixed: dict[str, str] | None = None,
) -> SearchRequest:
    """Turn QIDO query parameters into a :class:`Query` (400 on anything malformed)."""
    query = Query(level=level, matches=dict(fixed or {}), limit=max_results)
    include: set[str] = set()
    include_all = False
    for name, value in params:
        if name == "limit":
            query.limit = min(_non_negative(name, value), max_results)
        elif name == "offset":
            query.offset = _non_negative(name, value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            query.fuzzy = value == "true"
        elif name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif item:
                    include.add(keyword_of(item))
        else:
            if "." in name:
                raise QueryError(f"{name}: sequence matching is not supported")
            keyword = keyword_of(name)
            if keyword not in KEYS:
                raise QueryError(
                    f"{keyword} is not a search key; searchable: {', '.join(sorted(KEYS))}"
                )
            query.matches[keyword] = value
    return SearchRequest(query, include, include_all)


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise QueryError(f"{name} must be a non-negative integer, not {value[:20]!r}")
    return int(value)


def element(keyword: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON element; empty values become an element without ``Value``."""
    vr = dictionary_VR(keyword)
    if vr == "US or SS":
        vr = "US"
    if value in (None, "", []):
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [_pn(v) for v in values]
    return {"vr": vr, "Value": values}


def _pn(text: str) -> dict[str, str]:
    groups = text.split("=")
    names = ("Alphabetic", "Ideographic", "Phonetic")
    return {names[i]: g for i, g in enumerate(groups[:3]) if g or i == 0}


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return f"{tag:08X}"


def search(
    session: Session, request: SearchRequest, base_url: str
) -> tuple[list[dict[str, Any]], bool]:
    """Run the search; return (results, whether more matched than were returned)."""
    query = request.query
    stmt = ordered(build_select(query), query.level).offset(query.offset)
    limit = query.limit
    if limit is not None:
        stmt = stmt.limit(limit + 1)
    rows = list(session.execute(stmt).all())
    truncated = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    results = [_result(query.level, row, base_url) for row in rows]
    extra = request.include - set(DEFAULTS[query.level])
    if (extra or request.include_all) and rows:
        _add_included(session, query.level, rows, results, extra, request.include_all)
    return results, truncated


def _result(level: Level, row: Any, base_url: str) -> dict[str, Any]:
    values = row_values(level, row)
    url = f"{base_url}/studies/{values['StudyInstanceUID']}"
    if level is not Level.STUDY:
        url += f"/series/{values['SeriesInstanceUID']}"
    if level is Level.IMAGE:
        url += f"/instances/{values['SOPInstanceUID']}"
    values.update(SpecificCharacterSet="ISO_IR 192", RetrieveURL=url)
    wanted = DEFAULTS[level]
    return {_tag(k): element(k, values.get(k)) for k in sorted(wanted, key=_tag)}


def _add_included(
    session: Session,
    level: Level,
    rows: list[Any],
    results: list[dict[str, Any]],
    extra: set[str],
    include_all: bool,
) -> None:
    """Add ``includefield`` attributes from one instance's stored JSON per result."""
    if level is Level.STUDY:
        owner = Series.study_pk
        ids = [row.Study.id for row in rows]
    elif level is Level.SERIES:
        owner = Instance.series_pk
        ids = [row.Series.id for row in rows]
    else:
        owner = Instance.id
        ids = [row.Instance.id for row in rows]
    first = (
        select(owner.label("owner"), func.min(Instance.id).label("instance_pk"))
        .select_from(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .where(owner.in_(ids))
        .group_by(owner)
        .subquery()
    )
    documents = {
        owner_id: orjson.loads(text)
        for owner_id, text in session.execute(
            select(first.c.owner, InstanceMetadata.dicom_json).join(
                InstanceMetadata, InstanceMetadata.instance_pk == first.c.instance_pk
            )
        )
    }
    below = _BELOW[level]
    for owner_id, result in zip(ids, results, strict=True):
        document = documents.get(owner_id, {})
        if include_all:
            for tag, value in document.items():
                if (
                    tag not in result
                    and keyword_for_tag(int(tag, 16)) not in below
                    and "BulkDataURI" not in value
                    and "InlineBinary" not in value
                ):
                    result[tag] = value
        for keyword in extra:
            tag = _tag(keyword)
            if tag not in result:
                result[tag] = document.get(tag, element(keyword, None))


#: Attributes that belong to a lower level than the result: ``includefield=all`` on a study
#: search must not return one instance's values as if they held for the whole study.
_INSTANCE_LEVEL = {
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "SliceLocation",
    "ContentDate",
    "ContentTime",
    "AcquisitionNumber",
    "AcquisitionTime",
    "AcquisitionDate",
    "PixelData",
    "WindowCenter",
    "WindowWidth",
    "ImageOrientationPatient",
}
_SERIES_LEVEL = {
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
}
_BELOW = {
    Level.STUDY: _INSTANCE_LEVEL | _SERIES_LEVEL,
    Level.SERIES: _INSTANCE_LEVEL,
    Level.IMAGE: set(),
}


def dumps(results: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(results)
