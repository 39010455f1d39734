"""Deleting studies, series and instances: out of the index at once, bytes kept in the
recycle bin until due, restorable until then, audited with the reason (issue 5 item 7)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from cloudfilm.archive.deletion import DeletedInstance, purge_due, retention_due
from cloudfilm.archive.models import Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import RetentionRule
from cloudfilm.errors import NotFound

from auth_helpers import make_user, signed_in
from conftest import DATA, LiveServer

ACTOR = Actor.cli("pytest")


def _put(server: LiveServer, name: str, study: str, **attributes: str) -> tuple[str, str]:
    ds = dcmread(DATA / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert server.archive.ingest(buffer.getvalue(), actor=ACTOR).ok
    return ds.SeriesInstanceUID, ds.SOPInstanceUID


def _study(server: LiveServer, study: str, headers: dict[str, str]) -> dict[str, object] | None:
    response = httpx.get(
        f"{server.url}/dicom-web/studies", params={"StudyInstanceUID": study}, headers=headers
    )
    return response.json()[0] if response.status_code == 200 else None


@pytest.fixture
def server(live_server: LiveServer) -> LiveServer:
    make_user(live_server, "keeper", ["archivist"])
    return live_server


def test_delete_study__gone_at_once_then_restored(server: LiveServer) -> None:
    study = generate_uid()
    series, sop = _put(server, "ct_small.dcm", study)
    original = server.archive.storage.read(_key(server, sop))
    keeper = signed_in(server, "keeper")
    url = f"{server.url}/api/archive/studies/{study}"
    assert httpx.request("DELETE", url, json={}, headers=keeper).status_code == 400  # no reason
    deleted = httpx.request(
        "DELETE", url, json={"reason": "患者身份错误 wrong patient"}, headers=keeper
    )
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["instances"] == 1 and deleted.json()["state"] == "pending"
    assert _study(server, study, server.headers) is None
    metadata = f"{server.url}/dicom-web/studies/{study}/metadata"
    assert httpx.get(metadata, headers=server.headers).status_code == 404
    with server.archive.db.read_session() as session:
        assert session.scalar(select(Study).where(Study.study_instance_uid == study)) is None
        [kept] = session.scalars(select(DeletedInstance)).all()
        [event] = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "instances-deleted")
        ).all()
    assert server.archive.storage.read(kept.storage_key) == original  # still in the bin
    assert (event.actor_id, event.message, event.study_instance_uid) == (
        "keeper",
        "患者身份错误 wrong patient",
        study,
    )
    [listed] = httpx.get(f"{server.url}/api/archive/deletions", headers=keeper).json()
    restore = f"{server.url}/api/archive/deletions/{listed['id']}/restore"
    restored = httpx.post(restore, headers=keeper)
    assert restored.status_code == 200 and restored.json()["state"] == "restored"
    assert _study(server, study, server.headers) is not None
    again = dcmread(io.BytesIO(server.archive.storage.read(_key(server, sop))))
    assert again.pixel_array.tobytes() == dcmread(io.BytesIO(original)).pixel_array.tobytes()
    with pytest.raises(NotFound):
        server.archive.storage.read(kept.storage_key)  # the binned copy was let go
    assert httpx.post(restore, headers=keeper).status_code == 409


def test_delete_series_recounts_the_study(server: LiveServer) -> None:
    study = generate_uid()
    ct_series, _ = _put(server, "ct_small.dcm", study)
    _put(server, "mr_small.dcm", study)
    before = _study(server, study, server.headers)
    assert before is not None and before["00080061"]["Value"] == ["CT", "MR"]  # type: ignore[index]
    response = httpx.request(
        "DELETE",
        f"{server.url}/api/archive/studies/{study}/series/{ct_series}",
        json={"reason": "重复上传 sent twice"},
        headers=signed_in(server, "keeper"),
    )
    assert response.status_code == 200, response.text
    after = _study(server, study, server.headers)
    assert after is not None
    assert after["00080061"]["Value"] == ["MR"]  # type: ignore[index]
    assert after["00201206"]["Value"] == [1] and after["00201208"]["Value"] == [1]  # type: ignore[index]


def test_purge_when_due_and_then_no_restore(server: LiveServer) -> None:
    study = generate_uid()
    _, sop = _put(server, "mr_small.dcm", study)
    key = _key(server, sop)
    keeper = signed_in(server, "keeper")
    deleted = httpx.request(
        "DELETE",
        f"{server.url}/api/archive/studies/{study}",
        json={"reason": "测试 test", "delay_days": 7},
        headers=keeper,
    ).json()
    actor = Actor.cli("pytest purge")
    assert purge_due(archive=server.archive, now=server.clock.now(), actor=actor) == 0
    server.clock.advance(days=7, minutes=1)
    assert purge_due(archive=server.archive, now=server.clock.now(), actor=actor) == 1
    with pytest.raises(NotFound):
        server.archive.storage.read(key)
    keeper = signed_in(server, "keeper")
    restore = f"{server.url}/api/archive/deletions/{deleted['id']}/restore"
    assert httpx.post(restore, headers=keeper).status_code == 409


def test_deletion_respects_the_data_scope(server: LiveServer) -> None:
    study = generate_uid()
    _put(server, "ct_small.dcm", study, RequestingService="cardiology")
    make_user(server, "sec", ["secadmin"])
    make_user(server, "ward", [])
    role = {
        "code": "ward-keeper",
        "name": "病区档案",
        "permissions": ["study:delete"],
        "data_scope": {"departments": ["neurology"]},
    }
    sec = signed_in(server, "sec")
    assert httpx.post(f"{server.url}/api/admin/roles", json=role, headers=sec).status_code == 200
    httpx.put(
        f"{server.url}/api/admin/users/ward/roles", json={"roles": ["ward-keeper"]}, headers=sec
    )
    response = httpx.request(
        "DELETE",
        f"{server.url}/api/archive/studies/{study}",
        json={"reason": "not mine"},
        headers=signed_in(server, "ward"),
    )
    assert response.status_code == 404
    assert _study(server, study, server.headers) is not None


def test_retention_rules_find_old_studies(server: LiveServer) -> None:
    old, new = generate_uid(), generate_uid()
    _put(server, "mr_small.dcm", old, StudyDate="19990101")
    _put(server, "ct_small.dcm", new, StudyDate="20250101")
    rules = [RetentionRule(modality="MR", years=15), RetentionRule(modality="*", years=30)]
    with server.archive.db.read_session() as session:
        due = retention_due(session, rules, datetime(2026, 11, 28, tzinfo=UTC))
    assert [d.study_instance_uid for d in due] == [old]
    assert due[0].rule == "MR 15y"


def _key(server: LiveServer, sop: str) -> str:
    from cloudfilm.archive.models import Instance

    with server.archive.db.read_session() as session:
        return str(
            session.scalar(select(Instance.storage_key).where(Instance.sop_instance_uid == sop))
        )


def test_orphan_sweep_keeps_the_recycle_bin(server: LiveServer) -> None:
    from datetime import timedelta

    study = generate_uid()
    _, sop = _put(server, "ct_small.dcm", study)
    key = _key(server, sop)
    response = httpx.request(
        "DELETE",
        f"{server.url}/api/archive/studies/{study}",
        json={"reason": "测试 test"},
        headers=signed_in(server, "keeper"),
    )
    assert response.status_code == 200
    temporary, orphans = server.archive.sweep(orphan_age=timedelta(seconds=-1))
    assert orphans == 0
    assert server.archive.storage.read(key)  # still restorable
