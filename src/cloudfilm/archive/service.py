"""Index use cases. Functions take the session keyword-only and flush, never commit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

import orjson
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import (
    Connection,
    RowMapping,
    Select,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cloudfilm.archive import frames
from cloudfilm.archive.dicom_json import dataset_json
from cloudfilm.archive.models import (
    CompressionJob,
    Instance,
    InstanceMetadata,
    Patient,
    Series,
    Study,
)
from cloudfilm.archive.names import name_forms
from cloudfilm.archive.parsing import ParsedInstance
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import DuplicatePolicy
from cloudfilm.db import Base

#: Binary values longer than this are left out of the stored JSON and referenced instead.
BULK_DATA_THRESHOLD = 1024


class StoreOutcome(StrEnum):
    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    """Same SOP Instance UID, same bytes: nothing to do."""
    DUPLICATE_KEPT_FIRST = "duplicate-kept-first"
    """Same SOP Instance UID, different bytes, policy ``keep_first``: the new one is dropped."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A blob already written to storage, waiting for its index rows."""

    key: str
    storage_name: str
    size: int
    checksum: str
    original_size: int | None = None
    """Size as received, when ingest stored a losslessly compressed form (else ``size``)."""
    original_checksum: str | None = None
    original_transfer_syntax_uid: str | None = None
    compress_after: float | None = None
    """Queue a background compression job with the index rows, due this many seconds
    later (``compression.deferred``); ``None``: no job."""

    def original_columns(self, transfer_syntax_uid: str) -> dict[str, Any]:
        return {
            "original_bytes": self.size if self.original_size is None else self.original_size,
            "original_checksum": self.original_checksum or self.checksum,
            "original_transfer_syntax_uid": self.original_transfer_syntax_uid
            or transfer_syntax_uid,
        }


@dataclass(frozen=True, slots=True)
class StoreResult:
    outcome: StoreOutcome
    instance_id: int
    replaced_key: str | None = None
    """Storage key of the object a replacement superseded; delete it after the commit."""


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """Everything the index needs from one object, computed before the transaction opens
    so that the write lock is held for SQL only."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    """Instance columns except the storage ones."""
    dicom_json: str
    notes: tuple[str, ...]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.instance["sop_instance_uid"])

    @property
    def study_instance_uid(self) -> str:
        return str(self.study["study_instance_uid"])


def describe(parsed: ParsedInstance) -> IndexRecord:
    """Extract the DICOM JSON of ``parsed`` and the index columns (from that JSON)."""
    data = dicom_json(parsed.ds)
    header = _Header(data)
    return IndexRecord(
        patient=_patient_values(header),
        study=_study_values(header),
        series=_series_values(header),
        instance={
            **_instance_values(header, parsed.transfer_syntax_uid),
            "frame_index": (
                frames.locate(parsed.blob, parsed.ds, parsed.read_shift)
                if "7FE00010" in data
                else None
            ),
        },
        dicom_json=orjson.dumps(data).decode(),
        notes=tuple(parsed.notes),
    )


def checksum(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _now() -> datetime:
    return datetime.now(UTC)


class _Header:
    """Index values read from the instance's DICOM JSON (already decoded, no pydicom calls)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def _values(self, keyword: str) -> list[Any]:
        element = self.data.get(_TAGS[keyword])
        return list(element.get("Value") or []) if element else []

    def text(self, keyword: str, length: int) -> str:
        values = self._values(keyword)
        if values and isinstance(values[0], dict):  # PN: groups joined as in DICOM
            values = [_person_name(v) for v in values]
        joined = "\\".join("" if v is None else str(v) for v in values)
        return joined.strip()[:length]

    def int(self, keyword: str) -> int | None:
        values = self._values(keyword)
        try:
            return int(values[0]) if values and values[0] is not None else None
        except (TypeError, ValueError, OverflowError):
            return None


def _person_name(value: dict[str, str]) -> str:
    groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
    return "=".join(groups).rstrip("=")


_TAGS = {
    keyword: f"{tag_for_keyword(keyword):08X}"
    for keyword in (
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientSex",
        "PatientBirthDate",
        "StudyInstanceUID",
        "RequestingService",
        "InstitutionalDepartmentName",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "InstitutionName",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "StationName",
        "Manufacturer",
        "PerformedProcedureStepStartDate",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "ContentDate",
        "ContentTime",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
    )
}


def dicom_json(ds: Dataset) -> dict[str, Any]:
    """PS3.18 F.2 JSON of ``ds``; bulk data as relative ``BulkDataURI`` (``bulkdata/TTTTTTTT``)."""
    return dataset_json(
        ds, threshold=BULK_DATA_THRESHOLD, bulk_uri=lambda tag: f"bulkdata/{tag:08X}"
    )


_PATIENT = cast(Table, Patient.__table__)
_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)
_METADATA = cast(Table, InstanceMetadata.__table__)
_JOB = cast(Table, CompressionJob.__table__)
_INSERT_JOB = insert(_JOB).values(
    instance_pk=bindparam("instance_pk"),
    state="queued",
    attempts=0,
    not_before=bindparam("due"),
    created_at=bindparam("now"),
)

# Statements built once: per-image work must not pay SQLAlchemy's statement construction.
_SELECT_PATIENT = select(_PATIENT).where(
    _PATIENT.c.patient_id == bindparam("patient_id"),
    _PATIENT.c.issuer_of_patient_id == bindparam("issuer_of_patient_id"),
)
_SELECT_STUDY = (
    select(_STUDY)
    .where(_STUDY.c.study_instance_uid == bindparam("study_instance_uid"))
    .with_for_update()
)
_SELECT_SERIES = select(_SERIES).where(
    _SERIES.c.series_instance_uid == bindparam("series_instance_uid")
)
_SELECT_INSTANCE = (
    select(
        _INSTANCE.c.id,
        _INSTANCE.c.checksum,
        _INSTANCE.c.series_pk,
        _INSTANCE.c.byte_size,
        _INSTANCE.c.storage_key,
        _INSTANCE.c.original_bytes,
        _INSTANCE.c.original_checksum,
    )
    .where(_INSTANCE.c.sop_instance_uid == bindparam("sop_instance_uid"))
    .with_for_update()
)
_INSERT_INSTANCE = insert(_INSTANCE).returning(_INSTANCE.c.id)
_INSERT_METADATA = insert(_METADATA)
_COUNT_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("pk"))
    .values(
        number_of_instances=_SERIES.c.number_of_instances + bindparam("delta"),
        total_bytes=_SERIES.c.total_bytes + bindparam("bytes"),
        original_total_bytes=_SERIES.c.original_total_bytes + bindparam("original"),
        updated_at=bindparam("now"),
    )
    .returning(_SERIES.c.study_pk)
)
_COUNT_STUDY = (
    update(_STUDY)
    .where(_STUDY.c.id == bindparam("pk"))
    .values(
        number_of_instances=_STUDY.c.number_of_instances + bindparam("delta"),
        total_bytes=_STUDY.c.total_bytes + bindparam("bytes"),
        original_total_bytes=_STUDY.c.original_total_bytes + bindparam("original"),
        updated_at=bindparam("now"),
    )
)


def _get_or_create(
    conn: Connection,
    model: type[Base],
    query: Select[Any],
    key: dict[str, Any],
    values: dict[str, Any],
) -> RowMapping:
    """The row matching ``key`` (as a mapping), created from ``values`` when missing.

    Race-safe: a concurrent transaction that creates the same row first makes our INSERT
    a no-op (ON CONFLICT DO NOTHING), and the second SELECT finds its row.
    """
    row = conn.execute(query, key).mappings().one_or_none()
    if row is None:
        dialect = conn.dialect.name
        insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
        conn.execute(
            insert_fn(cast(Table, model.__table__))
            .values(**values)
            .on_conflict_do_nothing(index_elements=list(key))
        )
        row = conn.execute(query, key).mappings().one()
    return row


def _blanks(row: RowMapping, values: dict[str, Any]) -> dict[str, Any]:
    """Attributes that earlier instances left empty and this one fills; never overwrite."""
    return {k: v for k, v in values.items() if v not in ("", None) and row[k] in ("", None)}


def _patient_values(h: _Header) -> dict[str, Any]:
    names = name_forms(h.text("PatientName", 400))
    return {
        "patient_id": h.text("PatientID", 64),
        "issuer_of_patient_id": h.text("IssuerOfPatientID", 64),
        "patient_name": names.full[:400],
        "patient_name_alphabetic": names.alphabetic[:200],
        "patient_name_ideographic": names.ideographic[:200],
        "patient_name_phonetic": names.phonetic[:200],
        "patient_name_pinyin": names.pinyin[:400],
        "patient_name_initials": names.initials[:64],
        "patient_sex": h.text("PatientSex", 16),
        "patient_birth_date": h.text("PatientBirthDate", 8),
    }


def _study_values(h: _Header) -> dict[str, Any]:
    return {
        "study_instance_uid": h.text("StudyInstanceUID", 64),
        "study_date": h.text("StudyDate", 8),
        "study_time": h.text("StudyTime", 16),
        "accession_number": h.text("AccessionNumber", 16),
        "study_id": h.text("StudyID", 16),
        "study_description": h.text("StudyDescription", 64),
        "referring_physician_name": h.text("ReferringPhysicianName", 400),
        "institution_name": h.text("InstitutionName", 64),
        "department": h.text("RequestingService", 64) or h.text("InstitutionalDepartmentName", 64),
    }


def _series_values(h: _Header) -> dict[str, Any]:
    return {
        "series_instance_uid": h.text("SeriesInstanceUID", 64),
        "modality": h.text("Modality", 16),
        "series_number": h.int("SeriesNumber"),
        "series_description": h.text("SeriesDescription", 64),
        "series_date": h.text("SeriesDate", 8),
        "series_time": h.text("SeriesTime", 16),
        "body_part_examined": h.text("BodyPartExamined", 16),
        "station_name": h.text("StationName", 16),
        "institution_name": h.text("InstitutionName", 64),
        "manufacturer": h.text("Manufacturer", 64),
        "performed_procedure_step_start_date": h.text("PerformedProcedureStepStartDate", 8),
    }


def _instance_values(h: _Header, transfer_syntax_uid: str) -> dict[str, Any]:
    has_pixels = any(
        _TAGS[k] in h.data for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    )
    return {
        "sop_instance_uid": h.text("SOPInstanceUID", 64),
        "sop_class_uid": h.text("SOPClassUID", 64),
        "instance_number": h.int("InstanceNumber"),
        "transfer_syntax_uid": transfer_syntax_uid,
        "rows": h.int("Rows"),
        "columns": h.int("Columns"),
        "number_of_frames": (h.int("NumberOfFrames") or 1) if has_pixels else None,
        "bits_allocated": h.int("BitsAllocated"),
        "bits_stored": h.int("BitsStored"),
        "samples_per_pixel": h.int("SamplesPerPixel"),
        "photometric_interpretation": h.text("PhotometricInterpretation", 16),
        "content_date": h.text("ContentDate", 8),
        "content_time": h.text("ContentTime", 16),
    }


def get_instance(*, session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()


def get_study(*, session: Session, study_instance_uid: str) -> Study | None:
    return session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()


def store_instance(
    *,
    session: Session,
    record: IndexRecord,
    stored: StoredObject,
    actor: Actor,
    policy: DuplicatePolicy,
) -> StoreResult:
    """Index ``record`` whose bytes are already durable at ``stored``; audit the outcome.

    Safe under concurrency: parents are created with INSERT ... ON CONFLICT DO NOTHING,
    and the study row is locked before counters change, so ingests into one study
    serialise from that point while other studies proceed. Core statements, not ORM
    units of work: this runs once per image.
    """
    now = _now()
    conn = session.connection()
    patient_key = {k: record.patient[k] for k in ("patient_id", "issuer_of_patient_id")}
    patient = _get_or_create(
        conn,
        Patient,
        _SELECT_PATIENT,
        patient_key,
        {**record.patient, "created_at": now, "updated_at": now},
    )
    study_key = {"study_instance_uid": record.study["study_instance_uid"]}
    study = _get_or_create(
        conn,
        Study,
        _SELECT_STUDY,
        study_key,
        {**record.study, "patient_pk": patient["id"], "created_at": now, "updated_at": now},
    )
    series_key = {"series_instance_uid": record.series["series_instance_uid"]}
    series = _get_or_create(
        conn,
        Series,
        _SELECT_SERIES,
        series_key,
        {**record.series, "study_pk": study["id"], "created_at": now, "updated_at": now},
    )
    existing = conn.execute(
        _SELECT_INSTANCE, {"sop_instance_uid": record.sop_instance_uid}
    ).one_or_none()

    audit_common: dict[str, Any] = {
        "session": session,
        "actor": actor,
        "object_type": "instance",
        "object_id": record.sop_instance_uid,
        "patient_id": patient["patient_id"],
        "study_instance_uid": study["study_instance_uid"],
    }
    original = stored.original_columns(record.instance["transfer_syntax_uid"])
    if existing is not None and existing.original_checksum == original["original_checksum"]:
        audit.record(
            event_type=AuditEventType.INSTANCE_DUPLICATE,
            action=AuditAction.CREATE,
            message="identical object already stored; nothing changed",
            **audit_common,
        )
        return StoreResult(StoreOutcome.DUPLICATE, existing.id)
    if existing is not None and policy is DuplicatePolicy.KEEP_FIRST:
        audit.record(
            event_type=AuditEventType.INSTANCE_DUPLICATE,
            action=AuditAction.CREATE,
            outcome=AuditOutcome.MINOR_FAILURE,
            message="a different object with this SOP Instance UID is stored; kept the stored "
            "one (setting ingest.duplicate_policy=keep_first)",
            detail={"stored_checksum": existing.checksum, "received_checksum": stored.checksum},
            **audit_common,
        )
        return StoreResult(StoreOutcome.DUPLICATE_KEPT_FIRST, existing.id)

    columns = {
        **record.instance,
        "byte_size": stored.size,
        "checksum": stored.checksum,
        "storage_name": stored.storage_name,
        "storage_key": stored.key,
        **original,
        "series_pk": series["id"],
        "updated_at": now,
    }
    replaced_key = None
    if existing is not None:
        old_study = conn.execute(
            _COUNT_SERIES,
            {
                "pk": existing.series_pk,
                "delta": -1,
                "bytes": -existing.byte_size,
                "original": -existing.original_bytes,
                "now": now,
            },
        ).scalar_one()
        conn.execute(
            _COUNT_STUDY,
            {
                "pk": old_study,
                "delta": -1,
                "bytes": -existing.byte_size,
                "original": -existing.original_bytes,
                "now": now,
            },
        )
        conn.execute(update(_INSTANCE).where(_INSTANCE.c.id == existing.id).values(**columns))
        conn.execute(
            update(_METADATA)
            .where(_METADATA.c.instance_pk == existing.id)
            .values(dicom_json=record.dicom_json)
        )
        instance_id = existing.id
        replaced_key = existing.storage_key
        outcome = StoreOutcome.REPLACED
    else:
        instance_id = conn.execute(_INSERT_INSTANCE, {**columns, "created_at": now}).scalar_one()
        conn.execute(
            _INSERT_METADATA, {"instance_pk": instance_id, "dicom_json": record.dicom_json}
        )
        outcome = StoreOutcome.STORED

    new_series = series["number_of_instances"] == 0
    counts = {"delta": 1, "bytes": stored.size, "original": original["original_bytes"], "now": now}
    conn.execute(_COUNT_SERIES, {"pk": series["id"], **counts})
    conn.execute(_COUNT_STUDY, {"pk": study["id"], **counts})
    if blanks := _blanks(series, record.series):
        conn.execute(update(_SERIES).where(_SERIES.c.id == series["id"]).values(**blanks))
    study_changes = _blanks(study, record.study)
    if new_series or outcome is StoreOutcome.REPLACED:
        # The series set changed: recompute the study's series-level summaries. The study
        # row is locked, so no other ingest into this study runs in between.
        modalities = (
            conn.execute(
                select(_SERIES.c.modality).where(_SERIES.c.study_pk == study["id"]).distinct()
            )
            .scalars()
            .all()
        )
        study_changes["modalities_in_study"] = "\\".join(sorted(m for m in modalities if m))[:160]
        study_changes["number_of_series"] = (
            select(func.count())
            .where(_SERIES.c.study_pk == study["id"], _SERIES.c.number_of_instances > 0)
            .scalar_subquery()
        )
    if study_changes:
        conn.execute(update(_STUDY).where(_STUDY.c.id == study["id"]).values(**study_changes))

    changed = {k: v for k, v in record.patient.items() if v and patient[k] != v}
    if changed:
        conn.execute(
            update(_PATIENT).where(_PATIENT.c.id == patient["id"]).values(**changed, updated_at=now)
        )

    if stored.compress_after is not None:
        due = now + timedelta(seconds=stored.compress_after)
        conn.execute(_INSERT_JOB, {"instance_pk": instance_id, "now": now, "due": due})
    audit.record(
        event_type=(
            AuditEventType.INSTANCE_REPLACED
            if outcome is StoreOutcome.REPLACED
            else AuditEventType.INSTANCE_STORED
        ),
        action=AuditAction.UPDATE if outcome is StoreOutcome.REPLACED else AuditAction.CREATE,
        detail={"notes": list(record.notes)} if record.notes else None,
        **audit_common,
    )
    return StoreResult(outcome, instance_id, replaced_key)
