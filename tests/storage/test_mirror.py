"""Mirrored storage: both copies written before the ack (sync), a durable copy queue
(async) that survives a crash, reads that fall back to the mirror, the copier's repairs.

Each test runs with a filesystem mirror and with a SeaweedFS S3 mirror, on SQLite and on
PostgreSQL (the copy journal and the alarms live in the index)."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from pydicom import dcmread
from sqlalchemy import select

from cloudfilm import migrations
from cloudfilm.archive import integrity
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.audit.service import Actor
from cloudfilm.config import MirrorMode, Settings
from cloudfilm.db import Database
from cloudfilm.errors import StorageUnavailable
from cloudfilm.storage.alarms import IntegrityAlarm
from cloudfilm.storage.mirror import MirroredBackend, digest_matches
from cloudfilm.storage.models import Alarm, MirrorPending

from conftest import DATA, LiveServer, SeaweedS3

ACTOR = Actor.cli("pytest")
CT = DATA / "ct_small.dcm"


@pytest.fixture(params=["file", "s3"])
def mirror_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    settings: Settings, mirror_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Settings:
    """The conftest settings plus a mirror: a second folder, or a fresh S3 prefix."""
    storage = settings.storage
    if mirror_kind == "s3":
        server: SeaweedS3 = request.getfixturevalue("seaweedfs")
        storage.mirror_url = server.url(f"mirror-{secrets.token_hex(6)}")
        storage.mirror_s3_access_key_id = server.access_key_id
        storage.mirror_s3_secret_access_key = SecretStr(server.secret_access_key)
    else:
        storage.mirror_url = (tmp_path / "mirror").as_uri()
    settings.compression.at_ingest = False  # retrieved bytes compared with those sent
    return settings


def _open(settings: Settings) -> Archive:
    db = Database(settings)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    return Archive(settings, db=db)


@pytest.fixture
def mirrored(archive: Archive) -> MirroredBackend:
    assert isinstance(archive.storage, MirroredBackend)
    return archive.storage


def _key(archive: Archive) -> str:
    with archive.db.read_session() as session:
        return session.scalars(select(Instance.storage_key)).one()


def _pending(archive: Archive) -> list[tuple[str, str]]:
    with archive.db.read_session() as session:
        return [(r.key, r.target) for r in session.scalars(select(MirrorPending))]


def _active_alarms(archive: Archive) -> dict[tuple[str, str], str]:
    with archive.db.read_session() as session:
        rows = session.scalars(select(Alarm).where(Alarm.cleared_at.is_(None)))
        return {(a.kind, a.subject): a.severity for a in rows}


def test_sync_ingest__both_copies_identical(archive: Archive, mirrored: MirroredBackend) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    key = _key(archive)
    stored = mirrored.primary.read(key)
    assert mirrored.mirror.read(key) == stored
    with archive.db.read_session() as session:
        recorded = session.scalars(select(Instance.checksum)).one()
    assert digest_matches(stored, recorded)
    assert _pending(archive) == []


def test_sync_ingest__mirror_down_is_no_ack(
    archive: Archive, mirrored: MirroredBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(key: str, data: object) -> None:
        raise StorageUnavailable("connection refused")

    monkeypatch.setattr(mirrored.mirror, "put", refuse)
    with pytest.raises(StorageUnavailable, match="mirror copy could not be written"):
        archive.ingest(CT.read_bytes(), actor=ACTOR)
    with archive.db.read_session() as session:
        assert session.scalars(select(Instance)).first() is None  # no row, no false ack
    monkeypatch.undo()
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok  # the sender's retry works


def test_async__copy_queued_then_done_after_restart(archive: Archive, settings: Settings) -> None:
    """Ack with the primary's copy and a committed queue row; the process "crashes" before
    the copier runs (it never runs here); a new process copies it."""
    settings.storage.mirror_mode = MirrorMode.ASYNC
    first = _open(settings)
    try:
        assert first.ingest(CT.read_bytes(), actor=ACTOR).ok
        key = _key(first)
        assert _pending(first) == [(key, "mirror")]
        assert isinstance(first.storage, MirroredBackend)
        assert not any(i.key == key for i in first.storage.mirror.iter_objects())
        stored = first.storage.primary.read(key)
    finally:
        first.close()  # no copier ran: as after a crash

    second = _open(settings)
    try:
        sync = integrity.mirror_sync(second)
        assert sync is not None
        result = sync.run_until_empty()
        assert result.copied == 1 and result.failed == 0
        assert isinstance(second.storage, MirroredBackend)
        assert second.storage.mirror.read(key) == stored
        assert _pending(second) == []
    finally:
        second.close()


def test_async__queued_object_never_written_is_dropped(
    archive: Archive, settings: Settings
) -> None:
    """A crash after the queue row and before the primary write: nothing to copy."""
    settings.storage.mirror_mode = MirrorMode.ASYNC
    second = _open(settings)
    try:
        assert isinstance(second.storage, MirroredBackend)
        assert second.storage.journal is not None
        second.storage.journal.enqueue("20260101/aa/bb/" + "ab" * 16 + ".dcm", "mirror")
        sync = integrity.mirror_sync(second)
        assert sync is not None
        assert sync.run_until_empty().dropped == 1
        assert _pending(second) == []
    finally:
        second.close()


def _retrieve_raw(server: LiveServer, study: str, series: str, sop: str) -> bytes:
    """The stored object as WADO-RS sends it (no transcoding: transfer-syntax=*)."""
    response = httpx.get(
        f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        headers={
            **server.headers,
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = response.content.split(b"--" + boundary.encode())
    [part] = [p for p in parts if b"\r\n\r\n" in p]
    body = part.split(b"\r\n\r\n", 1)[1]
    return body.removesuffix(b"\r\n")


def test_fallback__primary_copy_deleted_retrieve_still_works(
    live_server: LiveServer, mirrored: MirroredBackend
) -> None:
    archive = live_server.archive
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    ds = dcmread(CT)
    key = _key(archive)
    stored = mirrored.primary.read(key)
    mirrored.primary.delete(key)

    body = _retrieve_raw(live_server, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert body == stored
    assert mirrored.fallbacks["primary"] >= 1
    assert _active_alarms(archive).get((IntegrityAlarm.COPY_DAMAGED.value, "copy:primary")) == (
        "warning"
    )
    assert (key, "primary") in _pending(archive)

    # The repair job puts the primary's copy back; the alarm clears with nothing owed.
    sync = integrity.mirror_sync(archive)
    assert sync is not None
    assert sync.run_until_empty().copied == 1
    assert mirrored.primary.read(key) == stored
    assert _pending(archive) == []
    assert (IntegrityAlarm.COPY_DAMAGED.value, "copy:primary") not in _active_alarms(archive)


def test_copier__corrupt_source_is_not_spread(archive: Archive, mirrored: MirroredBackend) -> None:
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    key = _key(archive)
    mirrored.primary.delete(key)
    mirrored.mirror.put(key, b"garbage")
    assert mirrored.journal is not None
    mirrored.journal.enqueue(key, "primary")
    sync = integrity.mirror_sync(archive)
    assert sync is not None
    result = sync.run_once()
    assert result.failed == 1 and "does not match its checksum" in result.errors[0]
    assert mirrored.mirror.read(key) == b"garbage"  # kept: never delete a copy
    assert _pending(archive) == [(key, "primary")]


def test_integrity_api__pending_copies_and_fallbacks(
    live_server: LiveServer, settings: Settings, mirrored: MirroredBackend
) -> None:
    archive = live_server.archive
    assert archive.ingest(CT.read_bytes(), actor=ACTOR).ok
    mirrored.primary.delete(_key(archive))
    assert mirrored.read(_key(archive))  # served by the mirror
    response = httpx.get(
        f"{live_server.url}/api/storage/integrity", headers=live_server.headers, timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mirror"]["mode"] == "sync"
    assert body["mirror"]["pending"]["primary"]["pending"] == 1
    assert body["mirror"]["fallback_reads"]["primary"] == 1
    assert "?" not in body["mirror"]["url"]  # no endpoint options (or secrets) echoed
    assert body["damaged"] == [] and body["last_scrub"] is None
    anonymous = httpx.get(f"{live_server.url}/api/storage/integrity", timeout=30)
    assert anonymous.status_code == 401
