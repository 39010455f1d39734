"""Integrity: the scrub finds corrupt or missing copies by their recorded checksum and
repairs them from the good copy; with no good copy it alarms and deletes nothing. The
orphan report finds bytes without rows and rows without bytes; the clean-up removes only
old unreferenced bytes.

Filesystem primary with a filesystem and with a SeaweedFS S3 mirror, on SQLite and
PostgreSQL."""

from __future__ import annotations

import os
import secrets
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from cloudfilm.archive import integrity
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.audit.enums import AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings
from cloudfilm.errors import NotFound
from cloudfilm.storage import new_key
from cloudfilm.storage.alarms import INTEGRITY_SUBJECT, IntegrityAlarm
from cloudfilm.storage.filesystem import FilesystemBackend
from cloudfilm.storage.mirror import MirroredBackend
from cloudfilm.storage.models import Alarm

from conftest import DATA, SeaweedS3

ACTOR = Actor.cli("pytest")
CT = DATA / "ct_small.dcm"


@pytest.fixture(params=["file", "s3"])
def mirror_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    settings: Settings, mirror_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Settings:
    storage = settings.storage
    if mirror_kind == "s3":
        server: SeaweedS3 = request.getfixturevalue("seaweedfs")
        storage.mirror_url = server.url(f"mirror-{secrets.token_hex(6)}")
        storage.mirror_s3_access_key_id = server.access_key_id
        storage.mirror_s3_secret_access_key = SecretStr(server.secret_access_key)
    else:
        storage.mirror_url = (tmp_path / "mirror").as_uri()
    return settings


@pytest.fixture
def mirrored(archive: Archive) -> MirroredBackend:
    assert isinstance(archive.storage, MirroredBackend)
    return archive.storage


def _ingest(archive: Archive, count: int = 1) -> list[str]:
    """``count`` copies of the CT with fresh UIDs; their storage keys."""
    keys = []
    for _ in range(count):
        ds = dcmread(CT)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = BytesIO()
        ds.save_as(buffer)
        assert archive.ingest(buffer.getvalue(), actor=ACTOR).ok
        with archive.db.read_session() as session:
            keys.append(
                session.scalars(
                    select(Instance.storage_key).where(
                        Instance.sop_instance_uid == ds.SOPInstanceUID
                    )
                ).one()
            )
    return keys


def _flip(data: bytes, at: int = 200) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _events(archive: Archive, event_type: AuditEventType) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type.value))
        )


def _active(archive: Archive) -> dict[tuple[str, str], str]:
    with archive.db.read_session() as session:
        rows = session.scalars(select(Alarm).where(Alarm.cleared_at.is_(None)))
        return {(a.kind, a.subject): a.severity for a in rows}


def test_scrub__corrupt_primary_repaired_from_mirror(
    archive: Archive, mirrored: MirroredBackend
) -> None:
    [key] = _ingest(archive)
    good = mirrored.mirror.read(key)
    mirrored.primary.put(key, _flip(good))

    result = integrity.scrub(archive, share=None)

    assert (result.checked, result.repaired, result.damaged) == (1, 1, 0)
    assert mirrored.primary.read(key) == mirrored.mirror.read(key) == good
    [repaired] = _events(archive, AuditEventType.OBJECT_REPAIRED)
    assert repaired.detail is not None and repaired.detail["state"] == "corrupt"
    [summary] = _events(archive, AuditEventType.STORAGE_SCRUBBED)
    assert summary.detail is not None and summary.detail["repaired"] == 1
    assert _active(archive)[(IntegrityAlarm.COPY_DAMAGED.value, "copy:primary")] == "warning"
    with archive.db.read_session() as session:
        row = session.scalars(select(Instance)).one()
        assert row.verified_at is not None and row.integrity_error is None
    # A second pass finds everything sound.
    again = integrity.scrub(archive, share=None)
    assert (again.sound, again.repaired) == (1, 0)


def test_scrub__missing_mirror_copy_rewritten(archive: Archive, mirrored: MirroredBackend) -> None:
    [key] = _ingest(archive)
    mirrored.mirror.delete(key)
    result = integrity.scrub(archive, share=None)
    assert result.repaired == 1
    assert mirrored.mirror.read(key) == mirrored.primary.read(key)


def test_scrub__both_copies_corrupt__alarm_nothing_deleted(
    archive: Archive, mirrored: MirroredBackend
) -> None:
    [key] = _ingest(archive)
    good = mirrored.primary.read(key)
    mirrored.primary.put(key, _flip(good, 150))
    mirrored.mirror.put(key, _flip(good, 300))

    result = integrity.scrub(archive, share=None)

    assert (result.damaged, result.repaired) == (1, 0)
    assert mirrored.primary.read(key) == _flip(good, 150)  # kept as found: never deleted
    assert mirrored.mirror.read(key) == _flip(good, 300)
    assert _active(archive)[(IntegrityAlarm.OBJECT_DAMAGED.value, INTEGRITY_SUBJECT)] == (
        "critical"
    )
    with archive.db.read_session() as session:
        row = session.scalars(select(Instance)).one()  # the index row stays
        assert row.integrity_error == "primary: corrupt; mirror: corrupt"
    assert len(_events(archive, AuditEventType.OBJECT_DAMAGED)) == 1
    status = integrity.integrity_status(archive)
    assert [d["key"] for d in status["damaged"]] == [key]
    assert status["last_scrub"]["damaged"] == 1

    # A good copy restored from a backup heals it: the next pass clears the alarm.
    mirrored.mirror.put(key, good)
    healed = integrity.scrub(archive, share=None)
    assert healed.repaired == 1 and mirrored.primary.read(key) == good
    assert (IntegrityAlarm.OBJECT_DAMAGED.value, INTEGRITY_SUBJECT) not in _active(archive)


def test_scrub__share_takes_least_recently_verified(archive: Archive) -> None:
    _ingest(archive, 3)
    seen: set[int] = set()
    for _ in range(3):
        assert integrity.scrub(archive, share=1 / 3).checked == 1
        with archive.db.read_session() as session:
            verified = set(
                session.scalars(select(Instance.id).where(Instance.verified_at.is_not(None)))
            )
        assert len(verified) == len(seen) + 1
        seen = verified


def _age(backend: object, key: str, seconds: float) -> None:
    if isinstance(backend, FilesystemBackend):
        path = backend.root / key
        past = time.time() - seconds
        os.utime(path, (past, past))


def test_orphans__report_then_safe_clean_up(
    archive: Archive, mirrored: MirroredBackend, mirror_kind: str
) -> None:
    kept, lost = _ingest(archive, 2)
    mirrored.primary.delete(lost)  # a row whose bytes are gone from both copies
    mirrored.mirror.delete(lost)
    old_primary, old_mirror, young = new_key(), new_key(), new_key()
    mirrored.primary.put(old_primary, b"left by a crashed ingest")
    mirrored.mirror.put(old_mirror, b"left on the mirror")
    _age(mirrored.primary, old_primary, 7200)
    _age(mirrored.mirror, old_mirror, 7200)
    grace = timedelta(hours=1)
    if mirror_kind == "s3":  # S3 cannot backdate an object: a short grace, then wait
        grace = timedelta(seconds=2)
        time.sleep(2.5)
    mirrored.primary.put(young, b"an ingest in flight")

    report = integrity.find_orphans(archive, older_than=grace)

    assert sorted((c, i.key) for c, i in report.unreferenced) == sorted(
        [("primary", old_primary), ("mirror", old_mirror)]
    )
    assert [m.key for m in report.missing] == [lost]
    assert _active(archive)[(IntegrityAlarm.OBJECT_DAMAGED.value, INTEGRITY_SUBJECT)] == (
        "critical"
    )

    assert integrity.remove_orphans(archive, report) == 2
    for backend, key in ((mirrored.primary, old_primary), (mirrored.mirror, old_mirror)):
        with pytest.raises(NotFound):
            backend.stat(key)
    assert mirrored.primary.read(young) == b"an ingest in flight"  # within the grace
    assert mirrored.primary.read(kept) == mirrored.mirror.read(kept)
    with archive.db.read_session() as session:
        rows = {r.storage_key: r for r in session.scalars(select(Instance))}
    assert set(rows) == {kept, lost}  # no index row is ever removed
    assert rows[lost].integrity_error == "missing on every copy"
    [removed] = _events(archive, AuditEventType.ORPHANS_REMOVED)
    assert removed.detail is not None and removed.detail["count"] == 2
