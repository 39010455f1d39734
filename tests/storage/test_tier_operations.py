"""Tier operations (issue 5 item 2): the audit trail of pins and jobs; the last access of
a study in the tier policies; C-MOVE / C-GET of a study on an offline tier."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select, update

from cloudfilm.archive.access import AccessLog
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Series, StorageJob, Study
from cloudfilm.archive.tiering import TierRunner
from cloudfilm.audit.enums import AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import DimseSettings, Settings, TierPolicy
from cloudfilm.dimse.server import DIMSEServer
from cloudfilm.storage.tiers import TieredStorage

from conftest import DATA, LiveServer, _truncate_postgres, free_port

ACTOR = Actor.cli("pytest")


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The shared ``archive`` fixture with a nearline and an offline tier (filesystems)."""
    options: dict[str, object] = {
        "data_dir": tmp_path / "var",
        "compression": {"at_ingest": False},
        "tiers": {
            "backends": {
                "nearline": {"url": (tmp_path / "nas").as_uri()},
                "offline": {"url": (tmp_path / "tape").as_uri(), "online_reads": False},
            },
            "job_lease_seconds": 5,
            "max_attempts": 1,
        },
    }
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
        options["database"] = {"url": url}
    return Settings(**options)  # type: ignore[arg-type]


def _ingest(archive: Archive, name: str = "ct_small.dcm") -> str:
    result = archive.ingest((DATA / name).read_bytes(), actor=ACTOR)
    assert result.ok and result.study_instance_uid, result.reason
    return result.study_instance_uid


def _events(archive: Archive, study: str) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(
                AuditEvent.study_instance_uid == study,
                AuditEvent.event_type.in_(
                    [
                        AuditEventType.STUDY_PINNED,
                        AuditEventType.STUDY_UNPINNED,
                        AuditEventType.STORAGE_JOB_QUEUED,
                        AuditEventType.STORAGE_JOB_DONE,
                        AuditEventType.STORAGE_JOB_FAILED,
                    ]
                ),
            )
            .order_by(AuditEvent.seq)
        ).all()
        session.expunge_all()
        return list(rows)


def test_tier_audit__pin_unpin_jobs_done_and_failed(archive: Archive) -> None:
    study = _ingest(archive)
    tiering = archive.tiering
    tiering.set_pinned(study, True, "alice", actor=Actor.cli("storage pin"))
    tiering.set_pinned(study, False, "cli")
    tiering.migrate(study, "online", "offline", "cli")
    assert tiering.run_due() == 1
    # A pin of an offline study queues its recall: a pin record and a job record.
    tiering.set_pinned(study, True, "cli")
    assert tiering.run_due() == 1
    events = _events(archive, study)
    assert [(e.event_type, (e.detail or {}).get("kind")) for e in events] == [
        ("study-pinned", None),
        ("study-unpinned", None),
        ("storage-job-queued", "migrate"),
        ("storage-job-done", "migrate"),
        ("storage-job-queued", "recall"),
        ("study-pinned", None),
        ("storage-job-done", "recall"),
    ]
    assert events[0].actor_id == "storage pin" and events[0].patient_id
    assert events[1].actor_type == "cli"
    assert events[3].actor_type == "system" and events[3].object_type == "storage-job"
    assert events[3].detail is not None and events[3].detail["target"] == "offline"
    assert all(e.outcome == AuditOutcome.SUCCESS for e in events)

    # A job whose source object is gone fails (max_attempts = 1): one failure record.
    tiering.set_pinned(study, False, "cli")
    with archive.db.read_session() as session:
        key = session.scalar(
            select(Instance.storage_key)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid == study)
        )
    assert key is not None
    archive.storage.delete(key)
    tiering.migrate(study, "online", "nearline", "cli")
    assert tiering.run_due() == 0
    [failed] = [e for e in _events(archive, study) if e.event_type == "storage-job-failed"]
    assert failed.outcome == AuditOutcome.SERIOUS_FAILURE
    assert failed.detail is not None and failed.detail["state"] == "failed"
    assert "NotFound" in (failed.message or "")


# -- last access


def _last_accessed(archive: Archive, study: str) -> datetime | None:
    with archive.db.read_session() as session:
        value = session.scalar(
            select(Study.last_accessed_at).where(Study.study_instance_uid == study)
        )
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _set_times(archive: Archive, study: str, **values: datetime | None) -> None:
    with archive.db.session() as session:
        session.execute(update(Study).where(Study.study_instance_uid == study).values(**values))


def test_last_access__written_once_an_hour_and_used_by_the_planner(archive: Archive) -> None:
    study = _ingest(archive)
    other = _ingest(archive, "mr_small.dcm")
    log = archive.tiering.access
    assert _last_accessed(archive, study) is None
    log.note([study])
    log.note([study])  # noted already: nothing more to write
    assert log.flush() in (0, 1)  # written by the writer thread or here, once
    assert log.flush() == 0
    first = _last_accessed(archive, study)
    assert first is not None and abs(datetime.now(UTC) - first) < timedelta(minutes=1)
    assert _last_accessed(archive, other) is None
    # Another process (its own log) reading within the hour: the row is not written again.
    second = AccessLog(archive.db)
    second.note([study])
    assert second.flush() == 0 and _last_accessed(archive, study) == first
    # Older than an hour: written again.
    _set_times(archive, study, last_accessed_at=datetime.now(UTC) - timedelta(hours=2))
    third = AccessLog(archive.db)
    third.note([study, other])
    assert third.flush() == 2

    # The planner: not accessed for 30 days, whatever the Study Date.
    archive.settings.tiers.policies = [
        TierPolicy(target="nearline", older_than_days=0, not_accessed_days=30)
    ]
    assert archive.tiering.plan(apply=False) == []  # both read just now
    month = datetime.now(UTC) - timedelta(days=40)
    _set_times(archive, study, last_accessed_at=month)
    assert [p.study_instance_uid for p in archive.tiering.plan(apply=False)] == [study]
    # Never read: counted from its arrival.
    _set_times(archive, other, last_accessed_at=None, created_at=datetime.now(UTC))
    assert [p.study_instance_uid for p in archive.tiering.plan(apply=False)] == [study]
    _set_times(archive, other, created_at=month)
    assert {p.study_instance_uid for p in archive.tiering.plan(apply=False)} == {study, other}


def test_last_access__wado_uri_notes_the_study(live_server: LiveServer) -> None:
    archive = live_server.archive
    study = _ingest(archive)
    ds = pydicom.dcmread(DATA / "ct_small.dcm", stop_before_pixels=True)
    response = httpx.get(
        f"{live_server.url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": study,
            "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID,
            "contentType": "application/dicom",
        },
        headers=live_server.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    archive.tiering.access.flush()
    assert _last_accessed(archive, study) is not None


# -- C-MOVE / C-GET of a study on an offline tier


@pytest.fixture
def scp(archive: Archive) -> Iterator[DIMSEServer]:
    server = DIMSEServer(archive, DimseSettings(port=free_port(), nodes=_nodes()))
    server.start()
    yield server
    server.stop()


_DEST_PORT: dict[str, int] = {}


def _nodes() -> dict[str, Any]:
    _DEST_PORT["port"] = free_port()
    return {
        "PYNETDICOM": {"host": "*", "allow_move": True, "allow_get": True},
        "DEST": {"host": "127.0.0.1", "port": _DEST_PORT["port"]},
    }


def _offline_study(archive: Archive) -> tuple[str, Dataset]:
    study = _ingest(archive)
    archive.tiering.migrate(study, "online", "offline", "pytest")
    assert archive.tiering.run_due() == 1
    return study, pydicom.dcmread(DATA / "ct_small.dcm")


def _get(scp: DIMSEServer, sent: Dataset, study: str) -> tuple[list[Dataset], list[Dataset]]:
    """C-GET the study: (responses, received objects)."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        scp.port,
        ae_title="CLOUDFILM",
        ext_neg=[build_role(sent.SOPClassUID, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    responses = [s for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    return responses, received


def test_c_get__offline_study_starts_recall_and_says_retry_later(
    archive: Archive, scp: DIMSEServer
) -> None:
    archive.settings.tiers.retrieve_wait_seconds = 0
    study, sent = _offline_study(archive)
    responses, received = _get(scp, sent, study)
    assert received == []
    assert responses[-1].Status == 0xA702
    assert responses[-1].ErrorComment == "recall started, retry later"
    with archive.db.read_session() as session:
        [job] = session.scalars(select(StorageJob).where(StorageJob.kind == "recall")).all()
        assert job.state == "queued" and job.requested_by == "retrieve"
    with archive.db.read_session() as session:
        [retrieve] = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "retrieve")
        ).all()
        assert retrieve.outcome == AuditOutcome.SERIOUS_FAILURE
        assert "recall started" in (retrieve.message or "")
    archive.tiering.access.flush()
    assert _last_accessed(archive, study) is not None  # an access, even if deferred
    # Once recalled, the same request succeeds.
    assert archive.tiering.run_due() == 1
    responses, received = _get(scp, sent, study)
    assert responses[-1].Status == 0x0000
    assert [r.SOPInstanceUID for r in received] == [sent.SOPInstanceUID]
    assert received[0].PixelData == sent.PixelData


def test_c_move__offline_study_waits_for_the_recall_then_sends(
    archive: Archive, scp: DIMSEServer
) -> None:
    archive.settings.tiers.retrieve_wait_seconds = 20
    archive.settings.tiers.job_interval_seconds = 0.2
    study, sent = _offline_study(archive)
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    destination = AE(ae_title="DEST")
    destination.add_supported_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    server = destination.start_server(
        ("127.0.0.1", _DEST_PORT["port"]),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    runner = TierRunner(archive.tiering)  # the recall runs while the C-MOVE waits
    runner.start()
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        responses = [
            s
            for s, _ in assoc.send_c_move(query, "DEST", StudyRootQueryRetrieveInformationModelMove)
        ]
        assoc.release()
    finally:
        runner.stop()
        server.shutdown()
    assert responses[-1].Status == 0x0000, responses[-1]
    assert [r.SOPInstanceUID for r in received] == [sent.SOPInstanceUID]
    with archive.db.read_session() as session:
        [job] = session.scalars(select(StorageJob).where(StorageJob.kind == "recall")).all()
        assert job.state == "done"


# -- compression at migration


def test_compression_at_migration__lower_tier_gets_the_verified_compressed_form(
    archive: Archive,
) -> None:
    archive.settings.compression.at_migration = True  # at_ingest stays false
    archive.settings.compression.deferred_grace_seconds = 0
    compressor = archive.tiering.compressor
    compressor._executor = ThreadPoolExecutor(1)  # no worker process in a test
    sent = pydicom.dcmread(DATA / "ct_small.dcm")
    study = _ingest(archive)
    other = _ingest(archive, "mr_small.dcm")  # not migrated: stays as received

    def rows(uid: str) -> list[tuple[str, str, str, int, int, str]]:
        with archive.db.read_session() as session:
            return [
                (r[0], r[1], r[2], r[3], r[4], r[5])
                for r in session.execute(
                    select(
                        Instance.storage_key,
                        Instance.storage_name,
                        Instance.transfer_syntax_uid,
                        Instance.byte_size,
                        Instance.original_bytes,
                        Instance.original_transfer_syntax_uid,
                    )
                    .join(Series, Instance.series_pk == Series.id)
                    .join(Study, Series.study_pk == Study.id)
                    .where(Study.study_instance_uid == uid)
                ).all()
            ]

    [(received_key, _, syntax, size, _, _)] = rows(study)
    assert syntax == sent.file_meta.TransferSyntaxUID  # stored as received
    [mr_before] = rows(other)
    archive.tiering.migrate(study, "online", "nearline", "pytest")
    assert archive.tiering.run_due() == 1
    [(key, name, syntax, stored, original, original_syntax)] = rows(study)
    assert (name, syntax) == ("nearline", JPEGLSLossless)
    assert key != received_key and stored < size // 2
    assert (original, original_syntax) == (size, sent.file_meta.TransferSyntaxUID)
    storage = archive.storage
    assert isinstance(storage, TieredStorage)
    moved = pydicom.dcmread(BytesIO(storage.backend("nearline").read(key)))
    assert np.array_equal(moved.pixel_array, sent.pixel_array)
    assert rows(other) == [mr_before]
    with archive.db.read_session() as session:
        compressed = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "instances-compressed")
        ).all()
        assert len(compressed) == 1
    # The received object goes once its grace is over (the tier runner's pass).
    assert compressor.run_once().cleaned == 1
    assert [o.key for o in storage.backend("online").iter_objects()] == [mr_before[0]]
    archive.tiering.close()
