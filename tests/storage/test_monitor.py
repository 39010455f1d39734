"""Storage monitor: the ingest guard, alarms raised once and cleared, growth and projection,
the HTTP API and the Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import func, insert, select

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.auth.models import Role
from cloudfilm.config import Settings
from cloudfilm.db import Database
from cloudfilm.errors import StorageFull
from cloudfilm.storage.models import Alarm, StorageSample

from auth_helpers import make_user, signed_in
from conftest import DATA, LiveServer

GIB = 1024**3
ACTOR = Actor.cli("test")


def _usage(archive: Archive, free: int, total: int = 100 * GIB) -> None:
    """Pretend the storage device has ``free`` of ``total`` bytes (no cache in between)."""
    archive.storage.usage = lambda: (free, total)  # type: ignore[attr-defined]
    archive.monitor.invalidate()


def _alarms(archive: Archive) -> list[Alarm]:
    with archive.db.read_session() as session:
        return list(session.scalars(select(Alarm).order_by(Alarm.id)))


def _audit_count(archive: Archive, event_type: str) -> int:
    with archive.db.read_session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.event_type == event_type)
            )
            or 0
        )


def test_check_space__refuses_inside_the_reserve(archive: Archive) -> None:
    data = (DATA / "mr_small.dcm").read_bytes()
    # reserve: max(2 GiB, 2 % of 100 GiB) = 2 GiB
    _usage(archive, free=2 * GIB + 1000)
    with pytest.raises(StorageFull, match="out of space"):
        archive.ingest(data, actor=ACTOR)
    assert list(archive.storage.iter_objects()) == []
    assert _audit_count(archive, "instance-refused") == 1
    _usage(archive, free=3 * GIB)
    assert archive.ingest(data, actor=ACTOR).ok


def test_check_space__measures_at_most_once_a_second(archive: Archive) -> None:
    calls = []

    def usage() -> tuple[int, int]:
        calls.append(1)
        return (50 * GIB, 100 * GIB)

    archive.storage.usage = usage  # type: ignore[attr-defined]
    for _ in range(100):
        archive.monitor.check_space("primary", 1000)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_run_once__raises_once_escalates_and_clears(archive: Archive) -> None:
    _usage(archive, free=10 * GIB)  # 90 % used: warning
    archive.monitor.run_once()
    archive.monitor.run_once()
    [warning] = _alarms(archive)
    assert (warning.kind, warning.severity, warning.cleared_at) == ("disk_usage", "warning", None)
    assert "90.0%" in warning.message and "存储" in warning.message

    _usage(archive, free=4 * GIB)  # 96 %: critical replaces the warning
    result = archive.monitor.run_once()
    assert [a.severity for a in result.raised] == ["critical"]
    assert [a.severity for a in result.cleared] == ["warning"]

    _usage(archive, free=int(15.5 * GIB))  # 84.5 %: within the 1-point margin of 85 %
    archive.monitor.run_once()  # critical → warning (below 94 %)
    _usage(archive, free=int(14.5 * GIB))  # 85.5 %: warning holds, nothing new
    assert archive.monitor.run_once().raised == []
    _usage(archive, free=int(16.5 * GIB))  # 83.5 %: clears
    result = archive.monitor.run_once()
    assert [a.severity for a in result.cleared] == ["warning"]
    assert archive.monitor.active_alarms() == []
    assert [(a.severity, a.cleared_at is not None) for a in _alarms(archive)] == [
        ("warning", True),
        ("critical", True),
        ("warning", True),
    ]
    assert _audit_count(archive, "alarm-raised") == 3
    assert _audit_count(archive, "alarm-cleared") == 3


def test_run_once__unreadable_device_is_a_critical_alarm(archive: Archive) -> None:
    def broken() -> tuple[int, int]:
        raise OSError(5, "Input/output error")

    archive.storage.usage = broken  # type: ignore[attr-defined]
    archive.monitor.invalidate()
    [alarm] = archive.monitor.run_once().raised
    assert (alarm.kind, alarm.severity) == ("storage_unreachable", "critical")
    # the ingest guard does not refuse on a measurement failure: the write itself tells
    archive.monitor.check_space("primary", 10)


def test_growth__from_samples_and_days_until_full(sqlite_settings: Settings) -> None:
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    db = Database(sqlite_settings)
    migrations.upgrade(db.engine)
    archive = Archive(sqlite_settings, db=db)
    archive.monitor.now = lambda: now
    _usage(archive, free=52 * GIB)  # used 48 GiB now
    with db.session() as session:
        session.execute(
            insert(StorageSample),
            [
                {
                    "backend": "primary",
                    "sampled_at": now - timedelta(days=days),
                    "capacity_bytes": 100 * GIB,
                    "free_bytes": 52 * GIB + days * GIB,
                    "archive_bytes": 0,
                    "instances": 0,
                }
                for days in (10, 4, 1)  # 10 days ago is outside the 7-day window
            ],
        )
    [status] = archive.monitor.status()
    assert status.growth_bytes_per_day == pytest.approx(GIB)
    # (52 GiB free - 2 GiB reserve) / 1 GiB per day
    assert status.days_until_full == pytest.approx(50.0)
    assert status.accepting
    archive.close()


def test_growth__falls_back_to_what_was_ingested(archive: Archive) -> None:
    archive.ingest((DATA / "mr_small.dcm").read_bytes(), actor=ACTOR)
    [status] = archive.monitor.status()
    size = (DATA / "mr_small.dcm").stat().st_size
    assert status.instances == 1 and status.archive_bytes > 0
    assert status.growth_bytes_per_day == pytest.approx(status.archive_bytes / 7)
    assert status.archive_bytes <= size * 2


def test_sysadmin_role_gets_storage_manage_in_migration(sqlite_settings: Settings) -> None:
    db = Database(sqlite_settings)
    migrations.upgrade(db.engine, "1132a829ba0a")
    with db.engine.begin() as conn:
        conn.execute(
            insert(Role.__table__).values(  # type: ignore[arg-type]
                code="sysadmin",
                name="系统管理员",
                name_en="",
                description="",
                builtin=True,
                permissions=["user:manage"],
                data_scope={},
                access={},
                updated_at=datetime.now(UTC),
            )
        )
    migrations.upgrade(db.engine)
    with db.read_session() as session:
        role = session.scalars(select(Role)).one()
    # Later revisions grant more (notify:read, d5b1e8c4f7a2); this one adds storage:manage once.
    assert role.permissions[:2] == ["user:manage", "storage:manage"]
    assert role.permissions.count("storage:manage") == 1 and "notify:read" in role.permissions
    db.dispose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_api__status_acknowledge_and_metrics(live_server: LiveServer) -> None:
    archive = live_server.archive
    archive.ingest((DATA / "mr_small.dcm").read_bytes(), actor=ACTOR)
    _usage(archive, free=3 * GIB)  # 97 %
    [alarm] = archive.monitor.run_once().raised
    make_user(live_server, "ops", ["operator"])
    make_user(live_server, "admin", ["sysadmin"])

    status = httpx.get(
        f"{live_server.url}/api/storage/status", headers=signed_in(live_server, "ops")
    )
    assert status.status_code == 200
    body = status.json()
    [backend] = body["backends"]
    assert backend["name"] == "primary" and backend["capacity_bytes"] == 100 * GIB
    assert backend["instances"] == 1 and backend["percent_used"] == 97.0
    assert [a["severity"] for a in body["alarms"]] == ["critical"]

    path = f"{live_server.url}/api/storage/alarms/{alarm.id}/acknowledge"
    denied = httpx.post(path, headers=signed_in(live_server, "ops"))
    assert denied.status_code == 403
    admin = signed_in(live_server, "admin")
    acknowledged = httpx.post(path, headers=admin)
    assert acknowledged.status_code == 200, acknowledged.text
    assert acknowledged.json()["acknowledged_by"] == "admin"
    assert _audit_count(archive, "alarm-acknowledged") == 1
    missing = httpx.post(f"{live_server.url}/api/storage/alarms/999/acknowledge", headers=admin)
    assert missing.status_code == 404

    # Prometheus scrapes with an integration client's bearer token (archive:stats).
    metrics = httpx.get(f"{live_server.url}/metrics", headers=live_server.headers)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    primary = (("backend", "primary"), ("tier", "online"))
    assert samples[("cloudfilm_storage_capacity_bytes", primary)] == 100 * GIB
    assert samples[("cloudfilm_storage_free_bytes", primary)] == 3 * GIB
    assert samples[("cloudfilm_storage_used_bytes", primary)] == 97 * GIB
    assert samples[("cloudfilm_storage_accepting", primary)] == 1
    assert samples[("cloudfilm_archive_instances", primary)] == 1
    assert samples[("cloudfilm_storage_growth_bytes_per_day", primary)] > 0
    assert ("cloudfilm_storage_days_until_full", primary) in samples
    assert samples[("cloudfilm_archive_studies", ())] == 1
    assert samples[("cloudfilm_alarms_active", (("severity", "critical"),))] == 1
    assert samples[("cloudfilm_alarms_active", (("severity", "warning"),))] == 0
    assert samples[("cloudfilm_ingest_total", (("outcome", "stored"),))] == 1
    assert samples[("cloudfilm_ingest_total", (("outcome", "refused_out_of_space"),))] == 0
    assert httpx.get(f"{live_server.url}/metrics").status_code == 401


def test_ingest_refusal_keeps_the_dataset_retrievable_elsewhere(archive: Archive) -> None:
    """A refused object leaves no trace in storage or index; an earlier one stays intact."""
    first = (DATA / "mr_small.dcm").read_bytes()
    archive.ingest(first, actor=ACTOR)
    [before] = list(archive.storage.iter_objects())
    _usage(archive, free=GIB)
    ct = dcmread(DATA / "ct_small.dcm")
    with pytest.raises(StorageFull):
        archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR)
    assert [o.key for o in archive.storage.iter_objects()] == [before.key]
    with archive.db.read_session() as session:
        from cloudfilm.archive.models import Instance

        uids = list(session.scalars(select(Instance.sop_instance_uid)))
    assert ct.SOPInstanceUID not in uids and len(uids) == 1
