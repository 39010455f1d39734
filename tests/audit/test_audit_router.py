"""``/api/audit``: who may read and export the trail, and what they get."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import httpx
from audit_records import append, tamper
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from cloudfilm.auth.models import Role
from cloudfilm.auth.permissions import Duty, Permission
from cloudfilm.auth.roles import RoleSpec, apply_spec

from auth_helpers import make_user, signed_in
from conftest import LiveServer


def _auditor(server: LiveServer) -> dict[str, str]:
    make_user(server, "shenji", ["auditadmin"])
    return signed_in(server, "shenji")


def _reader(server: LiveServer) -> dict[str, str]:
    """A user who may read the trail but not take it away."""
    spec = RoleSpec(
        code="auditreader", name="审计查阅", duty=Duty.AUDIT, permissions=[Permission.AUDIT_READ]
    )
    with server.archive.db.session() as session:
        role = Role(builtin=False)
        apply_spec(role, spec, server.clock.now())
        session.add(role)
    make_user(server, "chayue", ["auditreader"])
    return signed_in(server, "chayue")


def test_events__search_pages_and_is_itself_audited(live_server: LiveServer) -> None:
    headers = _auditor(live_server)
    append(live_server.archive, 5)
    url = f"{live_server.url}/api/audit/events"
    response = httpx.get(url, params={"event_type": "query", "limit": 2}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert [e["seq"] for e in body["events"]] == [5, 4]
    assert body["next_offset"] == 2
    assert body["events"][0]["patient_id"] == "P0004"

    response = httpx.get(url, params={"actor_id": "shenji"}, headers=headers)
    used = response.json()["events"][0]
    assert (used["event_type"], used["object_type"], used["object_id"]) == (
        "audit-log-used",
        "audit",
        "events",
    )
    assert used["actor_role"] == "auditadmin" and used["request_id"]
    assert used["detail"]["query"] == "event_type=query&limit=2"


def test_events__refusals(live_server: LiveServer) -> None:
    append(live_server.archive, 1)
    url = f"{live_server.url}/api/audit"
    assert httpx.get(f"{url}/events").status_code == 401
    make_user(live_server, "doctor", ["clinician"])
    doctor = signed_in(live_server, "doctor")
    assert httpx.get(f"{url}/events", headers=doctor).status_code == 403
    assert httpx.get(f"{url}/verify", headers=live_server.headers).status_code == 403

    reader = _reader(live_server)
    assert httpx.get(f"{url}/events", headers=reader).status_code == 200
    assert httpx.get(f"{url}/events/1", headers=reader).json()["seq"] == 1
    assert httpx.get(f"{url}/events.csv", headers=reader).status_code == 403
    refused = httpx.get(f"{url}/events/1", params={"format": "fhir"}, headers=reader)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"


def test_events__csv_fhir_and_dicom_exports(live_server: LiveServer) -> None:
    headers = _auditor(live_server)
    append(live_server.archive, 3)
    url = f"{live_server.url}/api/audit/events"

    response = httpx.get(f"{url}.csv", params={"patient_id": "P0001"}, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith('attachment; filename="audit-')
    assert response.content.startswith(b"\xef\xbb\xbf")
    lines = response.content.decode("utf-8-sig").splitlines()
    assert lines[0].startswith("记录号,链序号,时间(UTC)") and len(lines) == 2

    fhir = httpx.get(f"{url}/2", params={"format": "fhir"}, headers=headers)
    assert fhir.headers["content-type"] == "application/fhir+json"
    assert FhirAuditEvent.model_validate(fhir.json()).id == "2"

    dicom = httpx.get(f"{url}/2", params={"format": "dicom"}, headers=headers)
    assert dicom.headers["content-type"] == "application/xml"
    root = ET.fromstring(dicom.content)
    assert root.tag == "AuditMessage"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "CLOUDFILM"

    assert httpx.get(f"{url}/999", headers=headers).status_code == 404
    assert httpx.get(f"{url}/2", params={"format": "pdf"}, headers=headers).status_code == 400


def test_verify__reports_intact_and_broken_chains(live_server: LiveServer) -> None:
    headers = _auditor(live_server)
    append(live_server.archive, 4)
    url = f"{live_server.url}/api/audit/verify"
    intact = httpx.get(url, headers=headers).json()
    assert intact["ok"] is True and intact["broken"] is None and intact["records"] >= 4
    head = intact["head"]
    assert httpx.get(url, params={"expect": head}, headers=headers).json()["ok"] is True
    assert httpx.get(url, params={"expect": "x"}, headers=headers).status_code == 400

    tamper(live_server.archive, "UPDATE audit_event SET actor_id = 'nobody' WHERE seq = 3")
    broken = httpx.get(url, headers=headers).json()
    assert broken["ok"] is False
    assert (broken["broken"]["kind"], broken["broken"]["seq"]) == ("modified", 3)
