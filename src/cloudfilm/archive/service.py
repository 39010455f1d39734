"""Index use cases. Functions take the session keyword-only and flush, never commit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.archive.names import name_forms
from cloudfilm.archive.parsing import ParsedInstance
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import DuplicatePolicy

_Row = TypeVar("_Row", Patient, Study, Series)

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
    """Extract the index columns and the DICOM JSON of ``parsed``."""
    ds = parsed.ds
    return IndexRecord(
        patient=_patient_values(ds),
        study=_study_values(ds),
        series=_series_values(ds),
        instance=_instance_values(parsed),
        dicom_json=dicom_json(ds),
        notes=tuple(parsed.notes),
    )


def checksum(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _text(ds: Dataset, keyword: str, length: int) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - unreadable values index as empty; the blob keeps them
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:length]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    except Exception:  # noqa: BLE001
        return None


def dicom_json(ds: Dataset) -> str:
    """PS3.18 F.2 JSON of ``ds``; bulk data as relative ``BulkDataURI`` (``bulkdata/TTTTTTTT``)."""
    data = ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=lambda elem: f"bulkdata/{elem.tag:08X}",
        suppress_invalid_tags=True,
    )
    return orjson.dumps(data).decode()


def _insert_ignore(
    session: Session, model: type[Any], values: dict[str, Any], keys: list[str]
) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: safe when another transaction creates the same row."""
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(model).values(**values).on_conflict_do_nothing(index_elements=keys)
    session.execute(stmt)


def _get_or_create(
    session: Session,
    model: type[_Row],
    key: dict[str, Any],
    values: dict[str, Any],
    *,
    lock: bool = False,
) -> _Row:
    """The row matching ``key``, created from ``values`` when missing (race-safe)."""
    stmt = select(model).filter_by(**key)
    if lock:
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one_or_none()
    if row is None:
        _insert_ignore(session, model, values, list(key))
        row = session.scalars(stmt).one()
    return row


def _patient_values(ds: Dataset) -> dict[str, Any]:
    names = name_forms(_patient_name(ds))
    return {
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
        "patient_name": names.full[:400],
        "patient_name_alphabetic": names.alphabetic[:200],
        "patient_name_ideographic": names.ideographic[:200],
        "patient_name_phonetic": names.phonetic[:200],
        "patient_name_pinyin": names.pinyin[:400],
        "patient_name_initials": names.initials[:64],
        "patient_sex": _text(ds, "PatientSex", 16),
        "patient_birth_date": _text(ds, "PatientBirthDate", 8),
    }


def _patient_name(ds: Dataset) -> str:
    try:
        return str(ds.get("PatientName", "") or "")
    except Exception:  # noqa: BLE001
        return ""


def _study_values(ds: Dataset) -> dict[str, Any]:
    return {
        "study_instance_uid": str(ds.StudyInstanceUID),
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription", 64),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 400),
        "institution_name": _text(ds, "InstitutionName", 64),
    }


def _series_values(ds: Dataset) -> dict[str, Any]:
    return {
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription", 64),
        "series_date": _text(ds, "SeriesDate", 8),
        "series_time": _text(ds, "SeriesTime", 16),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
        "station_name": _text(ds, "StationName", 16),
        "institution_name": _text(ds, "InstitutionName", 64),
        "manufacturer": _text(ds, "Manufacturer", 64),
        "performed_procedure_step_start_date": _text(ds, "PerformedProcedureStepStartDate", 8),
    }


def _instance_values(parsed: ParsedInstance) -> dict[str, Any]:
    ds = parsed.ds
    has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "instance_number": _int(ds, "InstanceNumber"),
        "transfer_syntax_uid": parsed.transfer_syntax_uid,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": (_int(ds, "NumberOfFrames") or 1) if has_pixels else None,
        "bits_allocated": _int(ds, "BitsAllocated"),
        "bits_stored": _int(ds, "BitsStored"),
        "samples_per_pixel": _int(ds, "SamplesPerPixel"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation", 16),
        "content_date": _text(ds, "ContentDate", 8),
        "content_time": _text(ds, "ContentTime", 16),
    }


def _fill_blanks(row: Any, values: dict[str, Any]) -> None:
    """Complete attributes that earlier instances left empty; never overwrite."""
    for name, value in values.items():
        if value not in ("", None) and getattr(row, name) in ("", None):
            setattr(row, name, value)


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
    serialise from that point while other studies proceed.
    """
    now = _now()
    patient_values = record.patient
    patient_key = {k: patient_values[k] for k in ("patient_id", "issuer_of_patient_id")}
    patient = _get_or_create(
        session, Patient, patient_key, {**patient_values, "created_at": now, "updated_at": now}
    )
    study_values = record.study
    study = _get_or_create(
        session,
        Study,
        {"study_instance_uid": study_values["study_instance_uid"]},
        {**study_values, "patient_pk": patient.id, "created_at": now, "updated_at": now},
        lock=True,
    )
    series_values = record.series
    series = _get_or_create(
        session,
        Series,
        {"series_instance_uid": series_values["series_instance_uid"]},
        {**series_values, "study_pk": study.id, "created_at": now, "updated_at": now},
    )
    new_series = series.number_of_instances == 0

    instance_values = {
        **record.instance,
        "byte_size": stored.size,
        "checksum": stored.checksum,
        "storage_name": stored.storage_name,
        "storage_key": stored.key,
    }
    existing = session.scalars(
        select(Instance)
        .where(Instance.sop_instance_uid == instance_values["sop_instance_uid"])
        .with_for_update()
    ).one_or_none()

    audit_common: dict[str, Any] = {
        "session": session,
        "actor": actor,
        "object_type": "instance",
        "object_id": record.sop_instance_uid,
        "patient_id": patient.patient_id,
        "study_instance_uid": study.study_instance_uid,
    }
    if existing is not None and existing.checksum == stored.checksum:
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

    metadata_json = record.dicom_json
    replaced_key = None
    if existing is not None:
        old_series = session.get(Series, existing.series_pk)
        assert old_series is not None
        old_study = session.get(Study, old_series.study_pk)
        assert old_study is not None
        old_series.number_of_instances -= 1
        old_series.total_bytes -= existing.byte_size
        old_study.number_of_instances -= 1
        old_study.total_bytes -= existing.byte_size
        replaced_key = existing.storage_key
        for name, value in instance_values.items():
            setattr(existing, name, value)
        existing.series_pk = series.id
        existing.updated_at = now
        existing.metadata_row.dicom_json = metadata_json
        instance = existing
        outcome = StoreOutcome.REPLACED
    else:
        instance = Instance(**instance_values, series_pk=series.id, created_at=now, updated_at=now)
        instance.metadata_row = InstanceMetadata(dicom_json=metadata_json)
        session.add(instance)
        outcome = StoreOutcome.STORED

    series.number_of_instances += 1
    series.total_bytes += stored.size
    series.updated_at = now
    _fill_blanks(series, series_values)

    study.number_of_instances += 1
    study.total_bytes += stored.size
    study.updated_at = now
    _fill_blanks(study, study_values)
    if new_series or outcome is StoreOutcome.REPLACED:
        # Series counts changed: recompute the study's series-level summaries. The study
        # row is locked, so no other ingest into this study runs between flush and query.
        session.flush()
        modalities = session.scalars(
            select(Series.modality).where(Series.study_pk == study.id).distinct()
        ).all()
        study.modalities_in_study = "\\".join(sorted(m for m in modalities if m))[:160]
        study.number_of_series = (
            session.scalar(
                select(func.count())
                .select_from(Series)
                .where(Series.study_pk == study.id, Series.number_of_instances > 0)
            )
            or 0
        )

    changed = {k: v for k, v in patient_values.items() if v and getattr(patient, k) != v}
    if changed:
        for name, value in changed.items():
            setattr(patient, name, value)
        patient.updated_at = now

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
    session.flush()
    return StoreResult(outcome, instance.id, replaced_key)
