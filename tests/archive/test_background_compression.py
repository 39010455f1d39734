"""Background lossless compression (compression.deferred, archive/recompress.py): the
sender's answer does not wait for the codec; the job replaces the object only with a
verified smaller copy, keeps the received one for a grace period, survives failures."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless
from sqlalchemy import func, select, update
from sqlalchemy.orm import undefer

from cloudfilm.archive import deletion, frames, service
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import CompressionJob, Instance, Series, Study
from cloudfilm.archive.recompress import CLEANUP, Compressor
from cloudfilm.audit.enums import AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.audit.verify import verify
from cloudfilm.config import CompressionSettings, Settings

from conftest import DATA

ACTOR = Actor.cli("pytest")
CT = DATA / "ct_small.dcm"


@pytest.fixture(autouse=True)
def _deferred(settings: Settings) -> None:
    settings.compression = CompressionSettings(
        deferred=True, deferred_grace_seconds=0, deferred_delay_seconds=0
    )


@pytest.fixture
def compressor(archive: Archive) -> Iterator[Compressor]:
    # The encoder in a thread: the same function the process pool runs, without the
    # start-up of a process per test (the CLI test below uses the process pool).
    compressor = Compressor(archive, ThreadPoolExecutor(1))
    yield compressor
    compressor.close()


def _instance(archive: Archive) -> Instance:
    with archive.db.read_session() as session:
        row = session.scalars(select(Instance).options(undefer(Instance.frame_index))).one()
        session.expunge(row)
    return row


def _jobs(archive: Archive) -> list[tuple[str, str | None]]:
    with archive.db.read_session() as session:
        return [(j.state, j.old_key) for j in session.scalars(select(CompressionJob))]


def test_ingest_answers_first_then_the_job_compresses(
    archive: Archive, compressor: Compressor
) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    received = _instance(archive)
    assert received.transfer_syntax_uid == ImplicitVRLittleEndian  # stored as sent
    assert _jobs(archive) == [("queued", None)]

    result = compressor.run_once()
    assert (result.compressed, result.kept, result.failed) == (1, 0, 0)
    stored = _instance(archive)
    assert stored.transfer_syntax_uid == JPEGLSLossless
    assert stored.byte_size < received.byte_size
    assert stored.original_checksum == received.original_checksum  # resent = duplicate
    assert stored.original_bytes == received.byte_size
    blob = archive.storage.read(stored.storage_key)
    assert stored.checksum == service.checksum(blob, stored.checksum.split(":")[0])
    original = dcmread(CT)
    ds = dcmread(io.BytesIO(blob))
    ds.pixel_array_options(raw=True)
    original.pixel_array_options(raw=True)
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert stored.frame_index is not None  # the frames of the new object are indexed
    [(start, end)] = frames.ranges(frames.parse(stored.frame_index), 1)
    assert blob[start:end][:2] == b"\xff\xd8"  # a JPEG-LS code stream
    # Byte totals follow the switch.
    with archive.db.read_session() as session:
        assert session.scalar(select(Series.total_bytes)) == stored.byte_size
        assert session.scalar(select(Study.total_bytes)) == stored.byte_size
    # The received object waits for the grace period, then goes.
    [(state, old_key)] = _jobs(archive)
    assert state == CLEANUP and old_key == received.storage_key
    assert archive.storage.read(received.storage_key)
    assert compressor.run_once().cleaned == 1
    assert _jobs(archive) == []
    with pytest.raises(Exception, match="missing|not found|NoSuchKey|404"):
        archive.storage.read(received.storage_key)
    # On record, and the chain holds.
    with archive.db.read_session() as session:
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.event_type == AuditEventType.INSTANCES_COMPRESSED.value
            )
        ).all()
        assert len(events) == 1 and events[0].detail["compressed"] == 1
    with archive.db.read_connection() as conn:
        assert verify(conn).ok
    # Sending the same object again is recognised after compression too.
    again = archive.ingest(CT.read_bytes(), actor=ACTOR)
    assert again.status.value == "duplicate"


def test_instance_gone_or_replaced_meanwhile__nothing_switched(
    archive: Archive, compressor: Compressor
) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    study = str(dcmread(CT).StudyInstanceUID)
    with archive.db.session() as session:
        deletion.request_deletion(
            session=session,
            target=deletion.Target(study),
            reason="test",
            actor=ACTOR,
            now=datetime.now(UTC),
            delay=timedelta(days=7),
        )
    keys_before = {o.key for o in archive.storage.iter_objects()}
    result = compressor.run_once()
    assert (result.compressed, result.kept) == (0, 1)
    assert _jobs(archive) == []
    assert {o.key for o in archive.storage.iter_objects()} == keys_before  # no stray copy


def test_damaged_object_is_not_recompressed(archive: Archive, compressor: Compressor) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    with archive.db.session() as session:
        session.execute(update(Instance).values(checksum="sha256:" + "0" * 64))
    result = compressor.run_once()
    assert (result.compressed, result.kept) == (0, 1)
    assert _instance(archive).transfer_syntax_uid == ImplicitVRLittleEndian


def test_storage_failure__retried_later(
    archive: Archive, settings: Settings, compressor: Compressor
) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    # The archive's own free-space guard refuses the write, as on a full disk (on S3 the
    # quota makes the online tier full).
    settings.monitoring.refuse_below_bytes = 10**15
    settings.monitoring.quota_bytes = {"online": 1024}
    archive.monitor.invalidate()  # measure afresh with the new limits
    result = compressor.run_once()
    assert result.failed == 1
    with archive.db.read_session() as session:
        job = session.scalars(select(CompressionJob)).one()
        assert job.attempts == 1 and "out of space" in (job.last_error or "")
    assert compressor.run_once().worked is False  # backing off: not due yet
    assert _instance(archive).transfer_syntax_uid == ImplicitVRLittleEndian


def test_burst_first__job_due_after_the_delay(
    archive: Archive, settings: Settings, compressor: Compressor
) -> None:
    settings.compression.deferred_delay_seconds = 600
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    assert _jobs(archive) == [("queued", None)]
    assert compressor.run_once().worked is False
    assert _instance(archive).transfer_syntax_uid == ImplicitVRLittleEndian


def test_not_deferred__compressed_before_the_answer(archive: Archive, settings: Settings) -> None:
    settings.compression = CompressionSettings(deferred=False)
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    assert _instance(archive).transfer_syntax_uid == JPEGLSLossless
    assert _jobs(archive) == []


def test_cli__storage_compress_with_the_process_pool(archive: Archive, settings: Settings) -> None:
    for name in ("ct_small.dcm", "mr_small.dcm"):
        assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    with archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(CompressionJob)) == 2
    storage = settings.storage
    same_storage = {  # the online tier the tests use (a folder, or SeaweedFS S3)
        "CLOUDFILM_STORAGE__URL": storage.url or "",
        "CLOUDFILM_STORAGE__S3_ACCESS_KEY_ID": storage.s3_access_key_id or "",
        "CLOUDFILM_STORAGE__S3_SECRET_ACCESS_KEY": (
            storage.s3_secret_access_key.get_secret_value() if storage.s3_secret_access_key else ""
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "cloudfilm", "storage", "compress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "CLOUDFILM_DATA_DIR": str(settings.data_dir),
            "CLOUDFILM_DATABASE__URL": settings.database_url,
            "CLOUDFILM_COMPRESSION__DEFERRED_GRACE_SECONDS": "0",
            **{k: v for k, v in same_storage.items() if v},
            "COLUMNS": "200",
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed 0" in done.stdout and "still queued 0" in done.stdout
    assert _instance_of(archive, "ct_small.dcm").transfer_syntax_uid == JPEGLSLossless
    assert _jobs(archive) == []


def _instance_of(archive: Archive, name: str) -> Instance:
    uid = str(dcmread(DATA / name).SOPInstanceUID)
    with archive.db.read_session() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        session.expunge(row)
    return row
