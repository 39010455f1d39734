"""Tier operations (issue 5 item 2): the audit trail of pins and jobs; the last access of
a study in the tier policies; C-MOVE / C-GET of a study on an offline tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Series, Study
from cloudfilm.audit.enums import AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings

from conftest import DATA, _truncate_postgres

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
