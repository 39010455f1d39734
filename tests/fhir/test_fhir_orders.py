"""FHIR ServiceRequest (read, search, create, update) and Encounter (read, search) over
the orders and visits: plain HTTP and fhirclient; every response validates with
fhir.resources; data scopes and the audit trail apply."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest
from fhir_checks import valid
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.hl7 import service
from cloudfilm.hl7.listener import process

from auth_helpers import make_user, signed_in
from conftest import DATA, LiveServer

FHIR = "application/fhir+json"
PLAC = "urn:cloudfilm:placer-order"


def call(
    server: LiveServer,
    method: str,
    path: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    response = httpx.request(
        method,
        f"{server.url}/fhir/R4/{path}",
        headers={"Accept": FHIR, **(server.headers if headers is None else headers)},
        **kwargs,
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    return valid(response.json())


def get(server: LiveServer, path: str, expect: int = 200, **params: Any) -> dict[str, Any]:
    return call(server, "GET", path, expect, params=params)


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def ingest(server: LiveServer, accession: str, patient_id: str, department: str) -> str:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber, ds.PatientID = accession, patient_id
    ds.RequestingService = department
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert server.archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID)


def hl7_order(server: LiveServer, control_id: str, placer: str, accession: str, visit: str,
              klass: str = "I", patient: str = "P1") -> None:  # fmt: skip
    """An ORM^O01 NW taken in as the MLLP listener does (store, then apply)."""
    raw = (
        f"MSH|^~\\&|RIS|人民医院|CLOUDFILM|影像科|20261128083000||ORM^O01^ORM_O01|{control_id}"
        "|P|2.5|||AL|NE|CHN|UNICODE UTF-8\r"
        f"PID|1||{patient}^^^^PI||张三丰^^^^^^L||19800101|M\r"
        f"PV1|1|{klass}|心内科一病区^301^12|||||||心内科|||||||||{visit}"
        + "|"
        * 25
        + "20261127100000\r"
        f"ORC|NW|{placer}|F{placer}||||||20261128080000|||D01^李^医生\r"
        f"OBR|1|{placer}|F{placer}|CT001^胸部CT平扫||||||||||||D01^李^医生||{accession}"
        "||||||CT\r"
    ).encode()
    with server.archive.db.session() as session:
        row = service.store(session=session, raw=raw, verdict=service.examine(raw), source="t")
        message_id = row.id
    assert process(server.archive.db, message_id) == "processed"


def request_body(placer: str, patient: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "system": PLAC,
                "value": placer,
            },
            {"system": "urn:cloudfilm:accession", "value": f"A{placer}"},
        ],  # fmt: skip
        "category": [
            {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}]}
        ],  # fmt: skip
        "code": {"coding": [{"system": "urn:local", "code": "MR01", "display": "头颅MR平扫"}]},
        "subject": patient,
        "authoredOn": "2026-11-28T08:00:00+08:00",
        "occurrenceDateTime": "2026-11-29T09:30:00+08:00",
        "requester": {"display": "王主任"},
        **extra,
    }


def post(server: LiveServer, body: Any, status: int = 201, **kwargs: Any) -> dict[str, Any]:
    return call(server, "POST", "ServiceRequest", status, json=body, **kwargs)


def test_service_request__create_read_update_search(live_server: LiveServer) -> None:
    server = live_server
    uid = ingest(server, "AHIS9", "P9", "neurology")
    patient = get(server, "Patient", identifier="P9")["entry"][0]["resource"]["id"]
    response = httpx.post(
        f"{server.url}/fhir/R4/ServiceRequest",
        content=json.dumps(request_body("HIS9", {"reference": f"Patient/{patient}"})),
        headers={**server.headers, "Content-Type": FHIR, "Accept": FHIR},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    created = valid(response.json())
    order_id = created["id"]
    assert response.headers["location"].endswith(f"/fhir/R4/ServiceRequest/{order_id}")
    assert created["subject"] == {"reference": f"Patient/{patient}"}
    assert created["status"] == "active" and created["authoredOn"] == "2026-11-28T00:00:00Z"
    assert created["code"]["coding"][0] == {"system": "urn:local", "code": "MR01",
                                            "display": "头颅MR平扫"}  # fmt: skip
    read = get(server, f"ServiceRequest/{order_id}")
    assert read["identifier"][0]["value"] == "HIS9" and read["requester"]["display"] == "王主任"
    # The study with its accession number is based on it.
    study = get(server, f"ImagingStudy/{uid}")
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]

    # A second order for a patient the archive has no images of: by identifier.
    other = post(server, request_body("HIS10", {"identifier": {"system": "urn:x", "value": "Q1"}}))
    assert other["subject"] == {"identifier": {"system": "urn:cloudfilm:patient-id:urn%3Ax",
                                               "value": "Q1"}}  # fmt: skip

    # Update: revoke it; what the new version leaves out is gone.
    changed = {**read, "status": "revoked"}
    del changed["requester"], changed["occurrenceDateTime"]
    updated = call(server, "PUT", f"ServiceRequest/{order_id}", json=changed)
    assert updated["status"] == "revoked"
    assert "requester" not in updated and "occurrenceDateTime" not in updated
    assert updated["authoredOn"] == created["authoredOn"]
    assert get(server, f"ServiceRequest/{order_id}")["status"] == "revoked"

    def search(**params: Any) -> list[str]:
        return ids(get(server, "ServiceRequest", **params))

    assert search(identifier=f"{PLAC}|HIS9") == [order_id]
    assert search(identifier="AHIS10") == [other["id"]]
    assert search(patient=f"Patient/{patient}") == [order_id]
    assert search(subject=patient) == [order_id]
    assert search(status="revoked") == [order_id]
    assert search(status="active") == [other["id"]]
    assert search(authored="2026-11-28") == sorted([order_id, other["id"]], key=int, reverse=True)
    assert search(authored="lt2026-11-01") == []
    assert search(code="urn:local|MR01", status="active") == [other["id"]]
    assert search(code="urn:other|MR01") == []
    call(server, "GET", "ServiceRequest", 400, params={"status": "nonsense"})


def test_service_request__paging(live_server: LiveServer) -> None:
    server = live_server
    for n in range(5):
        post(server, request_body(f"PG{n}", {"identifier": {"value": "Q2"}}))
    first = get(server, "ServiceRequest", _count=2)
    assert first["total"] == 5 and len(first["entry"]) == 2
    seen = ids(first)
    link = next(x["url"] for x in first["link"] if x["relation"] == "next")
    while link:
        response = httpx.get(link, headers={**server.headers, "Accept": FHIR})
        page = valid(response.json())
        seen += ids(page)
        link = next((x["url"] for x in page["link"] if x["relation"] == "next"), "")
    assert len(seen) == len(set(seen)) == 5


def test_service_request__bad_input_operation_outcome(live_server: LiveServer) -> None:
    server = live_server
    someone = {"identifier": {"value": "Q3"}}

    def issue(body: dict[str, Any]) -> str:
        return str(body["issue"][0]["code"]) + " " + str(body["issue"][0]["diagnostics"])

    not_json = call(server, "POST", "ServiceRequest", 400, content=b"{not json",
                    headers={**server.headers, "Content-Type": FHIR})  # fmt: skip
    assert issue(not_json).startswith("structure")
    call(server, "POST", "ServiceRequest", 415, content=b"<xml/>",
         headers={**server.headers, "Content-Type": "application/xml"})  # fmt: skip
    no_subject = request_body("B1", someone)
    del no_subject["subject"]
    assert "subject" in issue(post(server, no_subject, 400))
    assert "structure" in issue(post(server, {"resourceType": "Patient"}, 400))
    assert "PLAC" in issue(post(server, {**request_body("B2", someone), "identifier": []}, 422))
    assert "intent" in issue(post(server, {**request_body("B3", someone), "intent": "plan"}, 422))
    assert "Encounter" in issue(
        post(server, request_body("B4", someone, encounter={"reference": "Encounter/999"}), 422)
    )
    first = post(server, request_body("B5", someone))
    assert "PUT" in issue(post(server, request_body("B5", someone), 409))
    by_filler = {**request_body("", someone), "identifier": [{"system": "urn:cloudfilm:"
                 "filler-order", "value": "FB6"}]}  # fmt: skip
    post(server, by_filler)
    assert "FB6" in issue(post(server, by_filler, 409))
    wrong_id = {**request_body("B5", someone), "id": "12345"}
    call(server, "PUT", f"ServiceRequest/{first['id']}", 400, json=wrong_id)
    call(server, "PUT", "ServiceRequest/99999", 404, json={**wrong_id, "id": "99999"})
    get(server, "ServiceRequest/abc", 404)
    get(server, "ServiceRequest", 400, colour="red")


def test_encounter__from_order_visits(live_server: LiveServer) -> None:
    server = live_server
    ingest(server, "ACC1", "P1", "cardiology")
    hl7_order(server, "E1", "HIS1", "ACC1", "V001", "I")
    hl7_order(server, "E2", "HIS2", "ACC2", "V002", "E")
    hl7_order(server, "E3", "HIS3", "ACC3", "V003", "T", patient="P7")
    patient = get(server, "Patient", identifier="P1")["entry"][0]["resource"]["id"]
    everyone = get(server, "Encounter")
    assert everyone["total"] == 3
    by_number = {e["resource"]["identifier"][0]["value"]: e["resource"] for e in everyone["entry"]}
    inpatient = by_number["V001"]
    assert inpatient["class"]["code"] == "IMP" and inpatient["status"] == "in-progress"
    assert inpatient["subject"] == {"reference": f"Patient/{patient}"}
    assert inpatient["location"][0]["location"]["display"] == "心内科一病区 301 12"
    assert inpatient["period"]["start"] == "2026-11-27T02:00:00Z"
    assert by_number["V003"]["class"]["code"] == "AMB"
    assert by_number["V003"]["subject"]["identifier"]["value"] == "P7"

    def search(**params: Any) -> list[str]:
        bundle = get(server, "Encounter", **params)
        return sorted(e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", []))

    assert search(patient=f"Patient/{patient}") == ["V001", "V002"]
    assert search(identifier="V002") == ["V002"]
    assert search(**{"class": "EMER"}) == ["V002"]
    assert search(**{"class": "AMB"}) == ["V003"]
    assert search(date="2026-11-27") == ["V001", "V002", "V003"]
    assert search(date="gt2026-11-27") == []
    get(server, "Encounter", 400, **{"class": "XYZ"})
    one = by_number["V001"]["id"]
    assert get(server, f"Encounter/{one}")["identifier"][0]["value"] == "V001"
    get(server, "Encounter/424242", 404)
    [order] = get(server, "ServiceRequest", identifier="HIS1")["entry"]
    assert order["resource"]["encounter"] == {"reference": f"Encounter/{one}"}


def test_scope__clinician_sees_orders_of_own_department_studies(
    live_server: LiveServer,
) -> None:
    server = live_server
    ingest(server, "ACC1", "P1", "cardiology")
    hl7_order(server, "S1", "HIS1", "ACC1", "V001")  # its study is cardiology's
    hl7_order(server, "S2", "HIS2", "ACC2", "V002")  # no study yet
    make_user(server, "heart", ["clinician"], department="cardiology")
    make_user(server, "eye", ["clinician"], department="ophthalmology")
    heart, eye = signed_in(server, "heart"), signed_in(server, "eye")
    seen = call(server, "GET", "ServiceRequest", headers=heart)
    assert [e["resource"]["identifier"][0]["value"] for e in seen["entry"]] == ["HIS1"]
    assert call(server, "GET", "ServiceRequest", headers=eye)["total"] == 0
    assert call(server, "GET", "Encounter", headers=heart)["total"] == 1
    assert call(server, "GET", "Encounter", headers=eye)["total"] == 0
    order_id = ids(seen)[0]
    call(server, "GET", f"ServiceRequest/{order_id}", 404, headers=eye)
    # A clinician cannot push orders (study:store).
    response = httpx.post(
        f"{server.url}/fhir/R4/ServiceRequest",
        json=request_body("X1", {"identifier": {"value": "Q"}}),
        headers={**heart, "Content-Type": FHIR, "Accept": FHIR},
    )
    assert response.status_code == 403
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the guard, not SQL
def test_anonymous__refused_and_reads_audited(live_server: LiveServer) -> None:
    server = live_server
    for method, path in [("GET", "ServiceRequest"), ("GET", "ServiceRequest/1"),
                         ("POST", "ServiceRequest"), ("PUT", "ServiceRequest/1"),
                         ("GET", "Encounter"), ("GET", "Encounter/1")]:  # fmt: skip
        response = httpx.request(method, f"{server.url}/fhir/R4/{path}",
                                 headers={"Accept": FHIR})  # fmt: skip
        assert response.status_code == 401, (method, path)
    with server.archive.db.read_session() as session:
        before = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
    created = post(server, request_body("AU1", {"identifier": {"value": "Q4"}}))
    get(server, f"ServiceRequest/{created['id']}")
    get(server, "ServiceRequest")
    get(server, "Encounter")
    with server.archive.db.read_session() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq).offset(before)))
    objects = [(r.event_type, r.action, r.object_id) for r in rows]
    assert ("http-request", "C", f"ServiceRequest/{created['id']}") in objects
    assert ("query", "R", f"ServiceRequest/{created['id']}") in objects
    assert ("query", "E", "ServiceRequest") in objects
    assert ("query", "E", "Encounter") in objects


def test_fhirclient__reads_and_searches_orders(live_server: LiveServer) -> None:
    from fhirclient import client
    from fhirclient.models.servicerequest import ServiceRequest as ClientRequest

    server = live_server
    created = post(server, request_body("FC1", {"identifier": {"value": "Q5"}}))
    smart = client.FHIRClient(settings={"app_id": "pytest", "api_base": f"{server.url}/fhir/R4"})
    smart.server.session.headers.update(server.headers)
    read = ClientRequest.read(created["id"], smart.server)
    assert read.identifier[0].value == "FC1" and read.code.coding[0].display == "头颅MR平扫"
    found = list(
        ClientRequest.where(struct={"identifier": "FC1"}).perform_resources_iter(smart.server)
    )
    assert [r.id for r in found] == [created["id"]]
