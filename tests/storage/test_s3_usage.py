"""Monitoring of object storage (issue 5 item 6) on a real SeaweedFS: used bytes from the
index, a configured quota as capacity, so alarms, the days-until-full projection, the
ingest reserve and the Prometheus metrics work for an S3 online tier and an S3 nearline
tier."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings
from cloudfilm.errors import StorageFull
from cloudfilm.storage.monitor import BackendStatus
from cloudfilm.storage.router import StorageCollector
from cloudfilm.storage.tiers import TieredStorage

from conftest import DATA, SeaweedS3, _truncate_postgres

ACTOR = Actor.cli("pytest")
ONLINE_QUOTA = 1_000_000
NEARLINE_QUOTA = 4_000_000


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Online and nearline tiers both on SeaweedFS (fresh prefixes), with quotas."""
    server: SeaweedS3 = request.getfixturevalue("seaweedfs")
    credentials = {
        "s3_access_key_id": server.access_key_id,
        "s3_secret_access_key": server.secret_access_key,
    }
    options: dict[str, object] = {
        "data_dir": tmp_path / "var",
        "compression": {"at_ingest": False},
        "storage": {"url": server.url(f"online-{os.urandom(6).hex()}"), **credentials},
        "tiers": {
            "backends": {
                "nearline": {"url": server.url(f"nearline-{os.urandom(6).hex()}"), **credentials}
            }
        },
        "monitoring": {
            "quota_bytes": {"online": ONLINE_QUOTA, "nearline": NEARLINE_QUOTA},
            "refuse_below_bytes": 0,
            "refuse_below_percent": 5.0,
            "warning_percent": 40.0,
            "critical_percent": 90.0,
        },
    }
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
        options["database"] = {"url": url}
    return Settings(**options)  # type: ignore[arg-type]


def _copy(name: str) -> bytes:
    """The sample under a new SOP Instance UID (a distinct object of the same size)."""
    ds = pydicom.dcmread(DATA / name)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _status(archive: Archive, tier: str) -> BackendStatus:
    [status] = [s for s in archive.monitor.status() if s.tier == tier]
    return status


def _listed_bytes(archive: Archive, tier: str) -> int:
    storage = archive.storage
    assert isinstance(storage, TieredStorage)
    return sum(o.size for o in storage.backend(tier).iter_objects())


def test_s3_usage__quota_alarms_projection_guard_and_metrics(archive: Archive) -> None:
    # Object storage without a quota would report no capacity; with one it is the capacity.
    before = _status(archive, "online")
    assert (before.scheme, before.capacity_bytes, before.used_bytes) == ("s3", ONLINE_QUOTA, 0)
    assert before.free_bytes == ONLINE_QUOTA and before.days_until_full is None

    first = archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR)
    assert first.ok and first.study_instance_uid
    status = _status(archive, "online")
    listed = _listed_bytes(archive, "online")
    assert status.used_bytes == status.archive_bytes == listed > ONLINE_QUOTA * 0.4
    assert status.free_bytes == ONLINE_QUOTA - listed
    assert status.reserve_bytes == ONLINE_QUOTA * 5 // 100
    assert status.growth_bytes_per_day and status.growth_bytes_per_day > 0
    assert status.days_until_full is not None and status.days_until_full > 0

    result = archive.monitor.run_once()
    assert {(a.kind, a.severity, a.subject) for a in result.raised} == {
        ("disk_usage", "warning", "primary"),
        ("disk_forecast", "warning", "primary"),  # ~6 days at this (fallback) growth
    }

    # The guard counts what this process wrote since the last pass (no query per write).
    small = archive.ingest(_copy("mr_small.dcm"), actor=ACTOR)
    assert small.ok
    with pytest.raises(StorageFull, match="out of space"):
        archive.ingest(_copy("ct_small.dcm"), actor=ACTOR)
    assert _listed_bytes(archive, "online") == _status(archive, "online").used_bytes
    result = archive.monitor.run_once()
    assert [(a.kind, a.severity) for a in result.raised] == [("disk_usage", "critical")]
    assert _status(archive, "online").accepting is False

    # A nearline S3 tier: usage follows the index as studies migrate there.
    archive.tiering.migrate(first.study_instance_uid, "online", "nearline", "pytest")
    assert archive.tiering.run_due() == 1
    nearline = _status(archive, "nearline")
    assert nearline.capacity_bytes == NEARLINE_QUOTA
    assert nearline.used_bytes == _listed_bytes(archive, "nearline") > 0
    online = _status(archive, "online")
    assert online.used_bytes == _listed_bytes(archive, "online") < ONLINE_QUOTA * 0.4
    result = archive.monitor.run_once()
    assert "disk_usage" in [a.kind for a in result.cleared]  # space freed online
    assert "disk_usage" not in [a.kind for a in result.raised]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StorageCollector(archive.monitor))
    metrics = {
        (sample.name, sample.labels.get("tier")): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert metrics[("cloudfilm_storage_quota_bytes", "nearline")] == NEARLINE_QUOTA
    assert metrics[("cloudfilm_storage_capacity_bytes", "online")] == ONLINE_QUOTA
    assert metrics[("cloudfilm_storage_used_bytes", "nearline")] == nearline.used_bytes
    assert ("cloudfilm_storage_days_until_full", "nearline") in metrics
