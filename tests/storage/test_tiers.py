"""Storage tiers (issue 5 item 2): online (filesystem) → nearline (SeaweedFS S3) → offline
(a filesystem that is never read on request) → recall; WADO-RS during a recall; the
planner and pins; kill -9 of the job runner in the middle of migrations."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Series, StorageJob, Study
from cloudfilm.archive.tiering import JobState
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings, TierPolicy
from cloudfilm.db import Database
from cloudfilm.errors import NotFound, RecallNeeded
from cloudfilm.storage import open_storage
from cloudfilm.storage.tiers import TieredStorage

from conftest import CT_134, DATA, LiveServer, SeaweedS3, _truncate_postgres

ACTOR = Actor.cli("pytest")
SMALL = ["ct_small.dcm", "mr_small.dcm"]


def _tier_settings(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, *, s3: bool = True
) -> Settings:
    tiers: dict[str, object] = {
        "offline": {"url": (tmp_path / "tape").as_uri(), "online_reads": False}
    }
    if s3:
        server: SeaweedS3 = request.getfixturevalue("seaweedfs")
        tiers["nearline"] = {
            "url": server.url(f"nearline-{os.urandom(6).hex()}"),
            "s3_access_key_id": server.access_key_id,
            "s3_secret_access_key": server.secret_access_key,
        }
    else:
        tiers["nearline"] = {"url": (tmp_path / "nas").as_uri()}
    options: dict[str, object] = {
        "data_dir": tmp_path / "var",
        "compression": {"at_ingest": False},
        "tiers": {"backends": tiers, "job_lease_seconds": 1, "job_interval_seconds": 0.2},
    }
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
        options["database"] = {"url": url}
    return Settings(**options)  # type: ignore[arg-type]


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The shared ``archive`` and ``live_server`` fixtures, with three tiers."""
    return _tier_settings(tmp_path, backend, request)


def _open(settings: Settings) -> Archive:
    db = Database(settings)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    return Archive(settings, db=db, storage=open_storage(settings))


def _load(archive: Archive, files: list[Path]) -> set[str]:
    studies = set()
    for path in files:
        result = archive.ingest(path.read_bytes(), actor=ACTOR)
        assert result.ok, result.reason
        assert result.study_instance_uid
        studies.add(result.study_instance_uid)
    return studies


def _files() -> list[Path]:
    files = [DATA / name for name in SMALL]
    if CT_134.exists():
        files += sorted(CT_134.glob("*.dcm"))
    return files


def _objects(archive: Archive, study: str) -> dict[str, tuple[str, str, str]]:
    """storage key → (storage_name, checksum, sop uid) of the study's instances."""
    with archive.db.read_session() as session:
        rows = session.execute(
            select(
                Instance.storage_key,
                Instance.storage_name,
                Instance.checksum,
                Instance.sop_instance_uid,
            )
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid == study)
        ).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _assert_on(archive: Archive, study: str, tier: str, digests: dict[str, str]) -> None:
    """Every object of ``study`` is indexed on ``tier``, held there byte-identical, and
    on no other tier."""
    storage = archive.storage
    assert isinstance(storage, TieredStorage)
    objects = _objects(archive, study)
    name = "primary" if tier == "online" else tier
    assert {v[0] for v in objects.values()} == {name}
    for key, (_, checksum, _) in objects.items():
        data = storage.backend(tier).read(key)
        assert _sha(data) == digests[key] == checksum
        for other in storage.tiers:
            if other != tier:
                with pytest.raises(NotFound):
                    storage.backend(other).stat(key)


def _move(archive: Archive, study: str, source: str, target: str) -> None:
    archive.tiering.migrate(study, source, target, "pytest")
    assert archive.tiering.run_due() == 1
    [job] = archive.tiering.jobs(limit=1)
    assert job["state"] == "done", job


def test_tiers__online_nearline_offline_recall_bytes_identical(archive: Archive) -> None:
    files = _files()
    studies = _load(archive, files)
    storage = archive.storage
    assert isinstance(storage, TieredStorage)
    digests = {}
    for study in studies:
        for key in _objects(archive, study):
            digests[key] = _sha(storage.read(key))
        _assert_on(archive, study, "online", digests)

    for study in studies:
        _move(archive, study, "online", "nearline")
        _assert_on(archive, study, "nearline", digests)
        for key in _objects(archive, study):  # nearline is read on request
            assert _sha(storage.read(key)) == digests[key]
        _move(archive, study, "nearline", "offline")
        _assert_on(archive, study, "offline", digests)

    # Offline: a read starts a recall and says so; the bytes are not read on request.
    study = sorted(studies)[0]
    key = next(iter(_objects(archive, study)))
    with pytest.raises(RecallNeeded) as caught:
        storage.read(key)
    assert caught.value.study_instance_uid == study and caught.value.job_id is not None
    with pytest.raises(RecallNeeded) as again:  # the same job, not a second one
        storage.open(key)
    assert again.value.job_id == caught.value.job_id
    location = archive.tiering.location(study)
    assert location["status"] == "recalling" and location["job"]["state"] == "queued"
    assert archive.tiering.run_due() == 1
    _assert_on(archive, study, "online", digests)
    assert archive.tiering.location(study)["status"] == "available"
    for key in _objects(archive, study):
        assert _sha(storage.read(key)) == digests[key]
    others = [s for s in studies if s != study]
    for other in others:  # an explicit recall (administrator, pin) works the same way
        assert archive.tiering.request_recall(other, "pytest") is not None
    archive.tiering.run_due()
    for other in others:
        _assert_on(archive, other, "online", digests)


def test_wado_rs__offline_study_answers_503_recalling_then_200(live_server: LiveServer) -> None:
    archive = live_server.archive
    [study] = _load(archive, [DATA / "ct_small.dcm"])
    [(key, (_, _, sop))] = _objects(archive, study).items()
    original = archive.storage.read(key)
    _move(archive, study, "online", "offline")
    url = f"{live_server.url}/dicom-web/studies/{study}"
    with httpx.Client(headers=live_server.headers, timeout=30) as client:
        for path in ("", f"/series/{_series(archive, study)}/instances/{sop}"):
            response = client.get(
                url + path,
                headers={
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
                },
            )
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            body = response.json()
            assert body["error"] == "recalling" and "调取" in body["message"]
            assert isinstance(body["job"], int)
        location = client.get(f"{live_server.url}/api/storage/studies/{study}/location").json()
        assert location["status"] == "recalling" and location["tiers"] == {"offline": 1}
        assert archive.tiering.run_due() == 1
        response = client.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert response.status_code == 200
        assert original in response.content
        assert (
            client.get(f"{live_server.url}/api/storage/jobs").json()["jobs"][0]["state"] == "done"
        )


def _series(archive: Archive, study: str) -> str:
    with archive.db.read_session() as session:
        return str(
            session.scalar(
                select(Series.series_instance_uid)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == study)
            )
        )


def test_planner__policy_moves_old_studies_and_skips_pinned(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    settings = _tier_settings(tmp_path, backend, request, s3=False)
    settings.tiers.policies = [
        TierPolicy(source="online", target="nearline", older_than_days=30, modalities=["CT"])
    ]
    archive = _open(settings)
    try:
        ct, mr = _load(archive, [DATA / "ct_small.dcm"]), _load(archive, [DATA / "mr_small.dcm"])
        [ct_uid], [mr_uid] = ct, mr
        assert [p.study_instance_uid for p in archive.tiering.plan(apply=False)] == [ct_uid]
        archive.tiering.set_pinned(ct_uid, True, "pytest")
        assert archive.tiering.plan(apply=False) == []
        archive.tiering.set_pinned(ct_uid, False, "pytest")
        [planned] = archive.tiering.plan(apply=True)
        assert planned.job_id is not None
        assert archive.tiering.plan(apply=True) == []  # already has an active job
        archive.tiering.run_due()
        assert {v[0] for v in _objects(archive, ct_uid).values()} == {"nearline"}
        assert {v[0] for v in _objects(archive, mr_uid).values()} == {"primary"}
        # Pinning a study on a lower tier recalls it.
        pinned = archive.tiering.set_pinned(ct_uid, True, "pytest")
        assert pinned["job"]["kind"] == "recall"
        archive.tiering.run_due()
        assert {v[0] for v in _objects(archive, ct_uid).values()} == {"primary"}
        assert archive.tiering.plan(apply=False) == []
    finally:
        archive.close()


# ----------------------------------------------------------------------- kill -9


def _synthetic_study(count: int) -> list[bytes]:
    """``count`` instances of one study (copies of ct_small with fresh UIDs)."""
    ds = pydicom.dcmread(DATA / "ct_small.dcm")
    study, series = generate_uid(), generate_uid()
    blobs = []
    for number in range(1, count + 1):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        blobs.append(out.getvalue())
    return blobs


def _runner(settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["CLOUDFILM_TIERS__BACKENDS"] = json.dumps(
        {
            name: {"url": t.url, "online_reads": t.online_reads}
            for name, t in settings.tiers.backends.items()
        }
    )
    env["CLOUDFILM_TIERS__JOB_LEASE_SECONDS"] = "1"
    env["CLOUDFILM_COMPRESSION__AT_INGEST"] = "false"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudfilm",
            "storage",
            "jobs",
            "run",
            "--data-dir",
            str(settings.data_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(settings.data_dir.parent / "runner.log", "ab"),  # noqa: SIM115
    )


def _check_invariants(archive: Archive, study: str, digests: dict[str, str]) -> None:
    """Every index row points at a byte-identical object on its tier."""
    storage = archive.storage
    assert isinstance(storage, TieredStorage)
    objects = _objects(archive, study)
    assert set(objects) == set(digests)
    for key, (name, checksum, _) in objects.items():
        tier = "online" if name == "primary" else name
        assert _sha(storage.backend(tier).read(key)) == digests[key] == checksum


def test_kill9_during_migrations__resumes_without_loss(tmp_path: Path) -> None:
    settings = _kill_settings(tmp_path)
    archive = _open(settings)
    rng = random.Random(5)
    try:
        for blob in _synthetic_study(60):
            assert archive.ingest(blob, actor=ACTOR).ok
        with archive.db.read_session() as session:
            study = str(session.scalar(select(Study.study_instance_uid)))
        storage = archive.storage
        assert isinstance(storage, TieredStorage)
        digests = {k: _sha(storage.read(k)) for k in _objects(archive, study)}
        route = ["nearline", "offline", "online", "nearline", "online"]
        here = "online"
        kills = 0
        started = time.monotonic()
        for target in route:
            archive.tiering.migrate(study, here, target, "pytest")
            # Kill the runner at a random point of the job, at least once per job.
            for _ in range(1):
                stop_at = rng.choice(["copying", "switching", "cleaning"])
                done_at = rng.randint(0, 59)
                process = _runner(settings)
                deadline = time.monotonic() + 20
                while process.poll() is None and time.monotonic() < deadline:
                    with archive.db.read_session() as session:
                        job = session.scalars(
                            select(StorageJob).order_by(StorageJob.id.desc())
                        ).first()
                    assert job is not None
                    if job.state == stop_at and (
                        stop_at != "copying" or job.objects_done >= done_at
                    ):
                        break
                    time.sleep(0.005)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    kills += 1
                process.wait()
                _check_invariants(archive, study, digests)
            # Restart: the job completes (after the dead runner's lease ran out).
            finish = _runner(settings)
            assert finish.wait(timeout=60) == 0
            with archive.db.read_session() as session:
                job = session.scalars(select(StorageJob).order_by(StorageJob.id.desc())).first()
            assert job is not None and job.state == JobState.DONE, (job.state, job.last_error)
            _assert_on(archive, study, target, digests)
            here = target
        assert kills >= 5
        assert time.monotonic() - started < 90
    finally:
        archive.close()


def _kill_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        compression={"at_ingest": False},  # type: ignore[arg-type]
        tiers={  # type: ignore[arg-type]
            "backends": {
                "nearline": {"url": (tmp_path / "nas").as_uri()},
                "offline": {"url": (tmp_path / "tape").as_uri(), "online_reads": False},
            },
            "job_lease_seconds": 1,
        },
    )


def test_failed_step__retried_with_backoff_then_failed_and_retry(
    tmp_path: Path,
) -> None:
    settings = _kill_settings(tmp_path)
    settings.tiers.max_attempts = 2
    archive = _open(settings)
    try:
        [study] = _load(archive, [DATA / "ct_small.dcm"])
        [key] = _objects(archive, study)
        good = archive.storage.read(key)
        storage = archive.storage
        assert isinstance(storage, TieredStorage)
        storage.online.put(key, b"corrupt" + good[7:])  # the source copy fails its checksum
        archive.tiering.migrate(study, "online", "nearline", "pytest")
        for _ in range(2):
            archive.tiering.run_due()
            with archive.db.session() as session:
                session.execute(update(StorageJob).values(next_attempt_at=StorageJob.created_at))
        [job] = archive.tiering.jobs()
        assert job["state"] == "failed" and "checksum" in job["last_error"]
        assert {v[0] for v in _objects(archive, study).values()} == {"primary"}  # not switched
        storage.online.put(key, good)
        assert archive.tiering.retry() == 1
        archive.tiering.run_due()
        assert archive.tiering.jobs()[0]["state"] == "done"
        assert _sha(storage.backend("nearline").read(key)) == _sha(good)
    finally:
        archive.close()


def test_scrub_checks_the_online_tier_only(archive: Archive) -> None:
    """The scrub reads online copies directly: a study on the offline tier is neither read
    (no recall) nor counted; the online ones are verified."""
    from cloudfilm.archive.integrity import scrub

    studies = sorted(_load(archive, _files()))
    _move(archive, studies[0], "online", "offline")
    jobs_before = len(archive.tiering.jobs(limit=100))
    result = scrub(archive)
    assert result.damaged == 0 and result.unreachable == 0
    offline = len(_objects(archive, studies[0]))
    with archive.db.read_session() as session:
        from sqlalchemy import func, select

        from cloudfilm.archive.models import Instance

        total = session.scalar(select(func.count()).select_from(Instance))
    assert result.checked == total - offline
    assert len(archive.tiering.jobs(limit=100)) == jobs_before  # nothing recalled
