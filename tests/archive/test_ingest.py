"""The ingest pipeline on SQLite and PostgreSQL: index, storage, audit, duplicates, races."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import orjson
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from cloudfilm.archive import service
from cloudfilm.archive.ingest import Archive, IngestStatus
from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import DuplicatePolicy, Settings

from conftest import DATA


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


ACTOR = Actor.cli("pytest")


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _count(archive: Archive, model: type) -> int:
    with archive.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _audit(archive: Archive) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_ingest__indexes_stores_and_audits(archive: Archive) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()
    result = archive.ingest(data, actor=ACTOR)
    assert result.status is IngestStatus.STORED
    ds = dcmread(DATA / "ct_small.dcm")
    with archive.db.read_session() as session:
        instance = service.get_instance(session=session, sop_instance_uid=ds.SOPInstanceUID)
        assert instance is not None
        series = session.get(Series, instance.series_pk)
        assert series is not None
        study = session.get(Study, series.study_pk)
        assert study is not None
        patient = session.get(Patient, study.patient_pk)
        assert patient is not None
        metadata = session.get(InstanceMetadata, instance.id)
        assert metadata is not None
        blob = archive.storage.read(instance.storage_key)
        assert instance.checksum == "sha256:" + hashlib.sha256(blob).hexdigest()
        assert instance.byte_size == len(blob)
        assert (instance.rows, instance.columns, instance.number_of_frames) == (512, 512, 1)
        assert (instance.bits_allocated, instance.bits_stored) == (16, 12)
        assert instance.transfer_syntax_uid == "1.2.840.10008.1.2"
        assert instance.sop_class_uid == ds.SOPClassUID
        assert series.modality == "CT" and series.number_of_instances == 1
        assert study.modalities_in_study == "CT"
        assert (study.number_of_series, study.number_of_instances) == (1, 1)
        assert study.total_bytes == len(blob)
        assert patient.patient_id == ds.PatientID
        # The stored JSON is PS3.18 F.2 with pixel data as a bulk data reference.
        as_json = orjson.loads(metadata.dicom_json)
        assert as_json["00080018"] == {"vr": "UI", "Value": [ds.SOPInstanceUID]}
        assert as_json["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"
        assert "InlineBinary" not in as_json["7FE00010"]
        # The data set is stored byte for byte; only the file meta is ours.
        stored = dcmread(io.BytesIO(blob))
        assert stored.PixelData == ds.PixelData
        assert blob.endswith(data[-len(ds.PixelData) :])
    events = _audit(archive)
    assert [(e.event_type, e.action, e.outcome) for e in events] == [("instance-stored", "C", 0)]
    assert events[0].object_id == ds.SOPInstanceUID
    assert events[0].actor_id == "pytest" and events[0].actor_type == "cli"


def test_ingest__identical_duplicate_is_a_noop(archive: Archive) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()
    assert archive.ingest(data, actor=ACTOR).status is IngestStatus.STORED
    objects_before = sorted(o.key for o in archive.storage.iter_objects())
    result = archive.ingest(data, actor=ACTOR)
    assert result.status is IngestStatus.DUPLICATE
    assert sorted(o.key for o in archive.storage.iter_objects()) == objects_before
    assert _count(archive, Instance) == 1
    with archive.db.read_session() as session:
        assert session.scalars(select(Study.number_of_instances)).one() == 1
    assert [e.event_type for e in _audit(archive)] == ["instance-stored", "instance-duplicate"]


def test_ingest__same_data_set_from_another_sender_is_identical(archive: Archive) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()
    first = archive.ingest(data, actor=Actor.ae("CT01", "10.0.0.1:1234"))
    again = archive.ingest(data, actor=Actor.ae("PACS", "10.0.0.9:4321"))
    assert (first.status, again.status) == (IngestStatus.STORED, IngestStatus.DUPLICATE)
    assert again.reason == "identical object already stored"
    assert [(e.actor_id, e.event_type) for e in _audit(archive)] == [
        ("CT01", "instance-stored"),
        ("PACS", "instance-duplicate"),
    ]


def test_ingest__different_bytes_keep_first(archive: Archive) -> None:
    ds = dcmread(DATA / "ct_small.dcm")
    archive.ingest(_encode(ds), actor=ACTOR)
    ds.SeriesDescription = "changed"
    result = archive.ingest(_encode(ds), actor=ACTOR)
    assert result.status is IngestStatus.DUPLICATE
    assert "kept" in (result.reason or "")
    with archive.db.read_session() as session:
        instance = session.scalars(select(Instance)).one()
        stored = dcmread(io.BytesIO(archive.storage.read(instance.storage_key)))
    assert stored.SeriesDescription != "changed"
    assert len(list(archive.storage.iter_objects())) == 1
    last = _audit(archive)[-1]
    assert (last.event_type, last.outcome) == ("instance-duplicate", 4)


def test_ingest__different_bytes_replace(settings: Settings, archive: Archive) -> None:
    archive.settings = settings.model_copy(
        update={
            "ingest": settings.ingest.model_copy(
                update={"duplicate_policy": DuplicatePolicy.REPLACE}
            )
        }
    )
    ds = dcmread(DATA / "ct_small.dcm")
    archive.ingest(_encode(ds), actor=ACTOR)
    ds.SeriesDescription = "corrected"
    result = archive.ingest(_encode(ds), actor=ACTOR)
    assert result.status is IngestStatus.REPLACED
    with archive.db.read_session() as session:
        instance = session.scalars(select(Instance)).one()
        stored = dcmread(io.BytesIO(archive.storage.read(instance.storage_key)))
        study = session.scalars(select(Study)).one()
        assert study.number_of_instances == 1 and study.total_bytes == instance.byte_size
    assert stored.SeriesDescription == "corrected"
    assert [o.key for o in archive.storage.iter_objects()] == [instance.storage_key]
    assert _audit(archive)[-1].event_type == "instance-replaced"


def test_ingest__rejection_is_audited_and_touches_nothing(archive: Archive) -> None:
    archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR)
    before = sorted(o.key for o in archive.storage.iter_objects())
    truncated = (DATA / "ct_small.dcm").read_bytes()[:300_000]
    result = archive.ingest(truncated, actor=ACTOR)
    assert result.status is IngestStatus.REJECTED
    assert "truncated" in (result.reason or "")
    assert sorted(o.key for o in archive.storage.iter_objects()) == before
    assert _count(archive, Instance) == 1
    last = _audit(archive)[-1]
    assert (last.event_type, last.outcome) == ("instance-rejected", 8)
    assert last.message == result.reason


@pytest.mark.parametrize(
    ("name", "alphabetic", "ideographic", "pinyin"),
    [
        ("chr_gb18030.dcm", "Wang^XiaoDong", "王^小东", "wang^xiaodong"),
        ("chr_iso_ir_192.dcm", "Wang^XiaoDong", "王^小東", "wang^xiaodong"),
    ],
)
def test_ingest__chinese_names_as_unicode(
    archive: Archive, name: str, alphabetic: str, ideographic: str, pinyin: str
) -> None:
    assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    with archive.db.read_session() as session:
        patient = session.scalars(select(Patient)).one()
        metadata = session.scalars(select(InstanceMetadata)).one()
    assert patient.patient_name == f"{alphabetic}={ideographic}"
    assert (patient.patient_name_alphabetic, patient.patient_name_ideographic) == (
        alphabetic,
        ideographic,
    )
    assert patient.patient_name_pinyin == pinyin
    assert patient.patient_name_initials == "wxd"
    name_json = orjson.loads(metadata.dicom_json)["00100010"]["Value"][0]
    assert name_json == {"Alphabetic": alphabetic, "Ideographic": ideographic}


def _slice(index: int, study_uid: str, series_uid: str) -> bytes:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = f"{series_uid}.{index}"
    ds.InstanceNumber = index
    return _encode(ds)


def test_ingest__concurrent_senders_of_one_study(archive: Archive) -> None:
    """Two senders push the same 12 objects (and the series across two series UIDs) at once:
    one row per SOP Instance UID, counters exact, no error."""
    study = "1.2.826.0.1.3680043.8.498.1"
    objects = [_slice(i, study, f"{study}.{1 + i % 2}") for i in range(1, 13)]
    errors: list[BaseException] = []
    results: list[IngestStatus] = []
    barrier = threading.Barrier(2)

    def sender(order: list[bytes]) -> None:
        try:
            barrier.wait()
            for data in order:
                results.append(archive.ingest(data, actor=ACTOR).status)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [
        threading.Thread(target=sender, args=(objects,)),
        threading.Thread(target=sender, args=(list(reversed(objects)),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results).count(IngestStatus.STORED) == 12
    assert sorted(results).count(IngestStatus.DUPLICATE) == 12
    assert _count(archive, Instance) == 12
    with archive.db.read_session() as session:
        row = session.scalars(select(Study)).one()
        assert (row.number_of_series, row.number_of_instances) == (2, 12)
        assert [s.number_of_instances for s in session.scalars(select(Series))] == [6, 6]
    assert len(list(archive.storage.iter_objects())) == 12


def test_ingest__new_series_updates_study_summary(archive: Archive) -> None:
    archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR)
    ct = dcmread(DATA / "ct_small.dcm")
    mr = dcmread(DATA / "mr_small.dcm")
    mr.StudyInstanceUID = ct.StudyInstanceUID
    mr.PatientID = ct.PatientID
    archive.ingest(_encode(mr), actor=ACTOR)
    with archive.db.read_session() as session:
        study = session.scalars(select(Study)).one()
    assert study.modalities_in_study == "CT\\MR"
    assert (study.number_of_series, study.number_of_instances) == (2, 2)


def test_sweep__removes_orphans_and_keeps_indexed(archive: Archive, tmp_path: Path) -> None:
    from datetime import timedelta

    archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR)
    archive.storage.put("20200101/aa/bb/orphan.dcm", b"left by a crash")
    temporary, orphans = archive.sweep(orphan_age=timedelta(seconds=0))
    assert orphans == 1
    assert len(list(archive.storage.iter_objects())) == 1
    assert _count(archive, Instance) == 1
