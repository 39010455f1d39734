"""/api/mpi refuses what it should: anonymous callers, missing permissions, malformed
and hostile parameters (a clear 400 in Chinese first, and an audit record each)."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from cloudfilm.audit.models import AuditEvent
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.service import Demographics, identifier

from auth_helpers import make_user, signed_in
from conftest import LiveServer


def _seed(server: LiveServer) -> None:
    with server.archive.db.session() as session:
        for pid, name in (("A1", "欧阳娜娜"), ("A2", "王芳")):
            mpi.register(
                session=session, identifiers=[identifier("PI", "HIS", pid)],
                demographics=Demographics(name=name, sex="F"), source="test",
            )  # fmt: skip


def _audited(server: LiveServer, request_id: str) -> AuditEvent:
    with server.archive.db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)).one()


HOSTILE = [
    ("GET", "/api/mpi/pdq", {}, None, "请至少提供"),
    ("GET", "/api/mpi/pdq", {"birth_date": "1949-13-45"}, None, "出生日期"),
    ("GET", "/api/mpi/pdq", {"sex": "Q", "name": "王"}, None, "性别"),
    ("GET", "/api/mpi/pdq", {"pinyin": "wang%' OR 1=1--"}, None, "拼音"),
    ("GET", "/api/mpi/pdq", {"name": "王", "limit": "100000"}, None, "请求无效"),
    ("GET", "/api/mpi/pdq", {"name": "王" * 500}, None, "请求无效"),
    ("GET", "/api/mpi/pix", {"value": "A1\x00"}, None, "控制字符"),
    ("GET", "/api/mpi/pix", {"value": "A1", "type": "PI' OR '1'='1"}, None, "标识类型"),
    ("GET", "/api/mpi/pix", {"value": "11010519491231002X", "type": "NNCHN"}, None, "POST"),
    ("POST", "/api/mpi/pix", {}, {"type": "NNCHN", "value": "110105194912310021"}, "校验位"),
    ("POST", "/api/mpi/pdq", {}, {"id_card": "12345"}, "18位"),
    ("POST", "/api/mpi/pdq", {}, {"name": "王", "extra": "x"}, "请求无效"),
    ("POST", "/api/mpi/merge", {}, {"survivor": {"value": "A1"}}, "请求无效"),
]


def test_mpi_api__hostile_parameters_get_400_and_an_audit_record(
    live_server: LiveServer,
) -> None:
    _seed(live_server)
    for n, (method, path, params, body, reason) in enumerate(HOSTILE):
        request_id = f"hostile-{n}"
        response = httpx.request(
            method, f"{live_server.url}{path}", params=params, json=body,
            headers={**live_server.headers, "X-Request-ID": request_id},
        )  # fmt: skip
        assert response.status_code == 400, (path, params, response.text)
        assert reason in response.json()["message"], (path, params, response.text)
        event = _audited(live_server, request_id)
        assert event.outcome == 4 and event.detail["status"] == 400
    # Well-formed but hostile-looking values are just values: nothing found, nothing broken.
    found = httpx.get(
        f"{live_server.url}/api/mpi/pdq", params={"name": "%"}, headers=live_server.headers
    )
    assert found.status_code == 200 and found.json()["persons"] == []
    missing = httpx.get(
        f"{live_server.url}/api/mpi/pix", params={"value": "'; DROP TABLE mpi_person; --"},
        headers=live_server.headers,
    )  # fmt: skip
    assert missing.status_code == 404 and "没有" in missing.json()["message"]
    unknown = httpx.post(
        f"{live_server.url}/api/mpi/merge", headers=live_server.headers,
        json={"survivor": {"authority": "HIS", "value": "A1"},
              "prior": {"authority": "HIS", "value": "NOBODY"}},
    )  # fmt: skip
    assert unknown.status_code == 404 and "合并失败" in unknown.json()["message"]
    not_merged = httpx.post(
        f"{live_server.url}/api/mpi/persons/1/unmerge", headers=live_server.headers
    )
    assert not_merged.status_code == 404 and "未被合并" in not_merged.json()["message"]
    same = httpx.post(
        f"{live_server.url}/api/mpi/merge", headers=live_server.headers,
        json={"survivor": {"authority": "HIS", "value": "A1"},
              "prior": {"authority": "HIS", "value": "A1"}},
    )  # fmt: skip
    assert same.status_code == 409 and "同一人" in same.json()["message"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # guard logic, not SQL
def test_mpi_api__permissions(live_server: LiveServer) -> None:
    _seed(live_server)
    url = live_server.url
    body = {"survivor": {"authority": "HIS", "value": "A1"},
            "prior": {"authority": "HIS", "value": "A2"}}  # fmt: skip
    assert httpx.get(f"{url}/api/mpi/pix", params={"value": "A1"}).status_code == 401
    assert httpx.post(f"{url}/api/mpi/merge", json=body).status_code == 401
    make_user(live_server, "doctor", ["clinician"], department="心内科")
    make_user(live_server, "keeper", ["archivist"])
    doctor = signed_in(live_server, "doctor")
    read = httpx.get(
        f"{url}/api/mpi/pix", params={"value": "A1", "authority": "HIS"}, headers=doctor
    )
    assert read.status_code == 200 and read.json()["person"]["name"] == "欧阳娜娜"
    # The studies listed are those the caller's data scope reaches (own department here).
    from cloudfilm.archive.models import Patient, Study

    with live_server.archive.db.session() as session:
        now = live_server.clock.now()
        patient = Patient(patient_id="A1", issuer_of_patient_id="HIS", created_at=now,
                          updated_at=now)  # fmt: skip
        session.add(patient)
        session.flush()
        for uid, department in (("1.2.9.1", "放射科"), ("1.2.9.2", "心内科")):
            session.add(Study(patient_pk=patient.id, study_instance_uid=uid,
                              department=department, created_at=now, updated_at=now))  # fmt: skip
    client_view = httpx.get(
        f"{url}/api/mpi/pix", params={"value": "A1", "authority": "HIS"},
        headers=live_server.headers,
    ).json()  # fmt: skip
    assert len(client_view["person"]["studies"]) == 2
    doctor_view = httpx.get(
        f"{url}/api/mpi/pix", params={"value": "A1", "authority": "HIS"}, headers=doctor
    ).json()
    assert [s["study_instance_uid"] for s in doctor_view["person"]["studies"]] == ["1.2.9.2"]
    refused = httpx.post(f"{url}/api/mpi/merge", json=body, headers=doctor)
    assert refused.status_code == 403 and "patient:merge" in refused.json()["message"]
    keeper = signed_in(live_server, "keeper")
    done = httpx.post(f"{url}/api/mpi/merge", json=body, headers=keeper)
    assert done.status_code == 200, done.text
    with live_server.archive.db.read_session() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "patient-merged")
        ).one()
        assert (event.actor_type, event.actor_id) == ("user", "keeper")
        assert event.detail["prior"] == done.json()["prior"]
