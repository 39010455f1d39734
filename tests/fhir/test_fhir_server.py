"""The FHIR R4 server over the archive: every response validates with fhir.resources
(R4B models, whose Patient, ImagingStudy, AuditEvent, Bundle, CapabilityStatement and
OperationOutcome are R4's), fhirclient reads and searches, data scopes apply."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from pydicom import dcmread
from pydicom.uid import generate_uid

from cloudfilm.audit.service import Actor

from auth_helpers import make_user, signed_in
from conftest import DATA, LiveServer

FHIR = "application/fhir+json"
MODELS: dict[str, Any] = {
    "Bundle": Bundle,
    "Patient": Patient,
    "ImagingStudy": ImagingStudy,
    "AuditEvent": AuditEvent,
    "CapabilityStatement": CapabilityStatement,
    "OperationOutcome": OperationOutcome,
}


def _exam(server: LiveServer, name: str, **attributes: Any) -> str:
    ds = dcmread(DATA / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert server.archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID)


def get(
    server: LiveServer,
    path: str,
    headers: dict[str, str] | None = None,
    status: int = 200,
    **params: Any,
) -> dict[str, Any]:
    """GET ``/fhir/R4/<path>``; check the status, the media type and that the body is a
    valid resource of its type."""
    response = httpx.get(
        f"{server.url}/fhir/R4/{path}",
        params=params,
        headers={"Accept": FHIR, **(server.headers if headers is None else headers)},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body: dict[str, Any] = response.json()
    MODELS[body["resourceType"]].model_validate(body)
    for entry in body.get("entry", []):
        MODELS[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    # fhirclient's models are R4 4.0.1 itself (fhir.resources has R4B and R5): strict too.
    from fhirclient.models import fhirelementfactory

    fhirelementfactory.FHIRElementFactory.instantiate(body["resourceType"], body)
    return body


@pytest.fixture
def hospital(live_server: LiveServer) -> dict[str, str]:
    """Three patients: a GB18030 Chinese name (cardiology CT), a UTF-8 Chinese name
    (neurology MR), an alphabetic name with two studies."""
    server = live_server
    return {
        "ct": _exam(
            server,
            "chr_gb18030.dcm",
            PatientID="P1",
            PatientBirthDate="19800115",
            PatientSex="M",
            StudyDate="20260101",
            StudyTime="083000",
            AccessionNumber="ACC1",
            Modality="CT",
            RequestingService="cardiology",
        ),
        "mr": _exam(
            server,
            "chr_iso_ir_192.dcm",
            PatientID="P2",
            PatientBirthDate="19920630",
            PatientSex="F",
            StudyDate="20260315",
            AccessionNumber="ACC2",
            Modality="MR",
            RequestingService="neurology",
        ),
        "old": _exam(
            server,
            "mr_small.dcm",
            PatientID="P3",
            IssuerOfPatientID="HOSP",
            StudyDate="20250620",
            AccessionNumber="ACC3",
            RequestingService="neurology",
        ),
        "new": _exam(
            server,
            "ct_small.dcm",
            PatientID="P3",
            IssuerOfPatientID="HOSP",
            PatientName=dcmread(DATA / "mr_small.dcm").PatientName,
            StudyDate="20260420",
            AccessionNumber="ACC4",
            RequestingService="neurology",
        ),
    }


def _ids(bundle: dict[str, Any], kind: str | None = None) -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if kind is None or e["resource"]["resourceType"] == kind
    ]


def _patient_id(server: LiveServer, value: str) -> str:
    bundle = get(server, "Patient", identifier=value)
    assert bundle["total"] == 1, bundle
    return _ids(bundle)[0]


def test_metadata__public_capability_statement(live_server: LiveServer) -> None:
    body = get(live_server, "metadata", headers={})
    assert body["fhirVersion"] == "4.0.1"
    kinds = {r["type"]: r for r in body["rest"][0]["resource"]}
    assert set(kinds) == {
        "Patient", "ImagingStudy", "AuditEvent", "ServiceRequest", "Encounter",
        "DiagnosticReport", "DocumentReference", "Binary",
    }  # fmt: skip
    assert {"identifier", "name", "birthdate", "_lastUpdated"} <= {
        p["name"] for p in kinds["Patient"]["searchParam"]
    }


def test_patient__read_and_names(live_server: LiveServer, hospital: dict[str, str]) -> None:
    server = live_server
    pid = _patient_id(server, "P2")
    patient = get(server, f"Patient/{pid}")
    assert patient["identifier"][0]["value"] == "P2"
    assert patient["gender"] == "female" and patient["birthDate"] == "1992-06-30"
    texts = [n.get("text") for n in patient["name"]]
    assert any(t and any("\u4e00" <= c <= "\u9fff" for c in t) for t in texts), patient["name"]
    issuer = get(server, f"Patient/{_patient_id(server, 'P3')}")
    assert issuer["identifier"][0]["system"] == "urn:cloudfilm:patient-id:HOSP"
    assert get(server, "Patient", identifier="urn:cloudfilm:patient-id:HOSP|P3")["total"] == 1
    assert get(server, "Patient", identifier="urn:cloudfilm:patient-id|P3")["total"] == 0


def test_patient__search_parameters(live_server: LiveServer, hospital: dict[str, str]) -> None:
    server = live_server
    assert get(server, "Patient")["total"] == 3
    p1 = get(server, f"Patient/{_patient_id(server, 'P1')}")
    ideographic = next(n for n in p1["name"] if "text" in n)
    chinese = ideographic["text"]
    assert _ids(get(server, "Patient", name=chinese[1:])) == [p1["id"]]
    from cloudfilm.archive.names import to_pinyin

    pinyin, initials = to_pinyin(ideographic["family"] + "^" + "".join(ideographic["given"]))
    assert p1["id"] in _ids(get(server, "Patient", name=pinyin.replace("^", "").upper()))
    assert p1["id"] in _ids(get(server, "Patient", name=initials))
    assert _ids(get(server, "Patient", birthdate="1980-01-15")) == [p1["id"]]
    assert _ids(get(server, "Patient", birthdate="1980")) == [p1["id"]]
    assert len(_ids(get(server, "Patient", birthdate="ge1990-01-01"))) == 1
    assert _ids(get(server, "Patient", birthdate="le1985")) == [p1["id"]]
    assert _ids(get(server, "Patient", _id=p1["id"])) == [p1["id"]]
    assert get(server, "Patient", _lastUpdated="ge2000-01-01")["total"] == 3
    assert get(server, "Patient", _lastUpdated="lt2000-01-01")["total"] == 0
    assert _ids(get(server, "Patient", gender="female")) == [_patient_id(server, "P2")]


def test_patient__paging(live_server: LiveServer, hospital: dict[str, str]) -> None:
    server = live_server
    first = get(server, "Patient", _count=2)
    assert first["total"] == 3 and len(first["entry"]) == 2
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "self" in links and "next" in links
    second = httpx.get(links["next"], headers={"Accept": FHIR, **server.headers}).json()
    Bundle.model_validate(second)
    assert len(second["entry"]) == 1 and "next" not in {x["relation"] for x in second["link"]}
    seen = _ids(first) + _ids(second)
    assert len(set(seen)) == 3


def test_imaging_study__read_and_search(live_server: LiveServer, hospital: dict[str, str]) -> None:
    server = live_server
    study = get(server, f"ImagingStudy/{hospital['ct']}")
    assert study["status"] == "available"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{hospital['ct']}"} in study["identifier"]
    assert study["started"] == "2026-01-01T08:30:00+08:00"
    assert study["numberOfSeries"] == 1 and study["numberOfInstances"] == 1
    assert study["series"][0]["modality"]["code"] == "CT"
    endpoint = study["contained"][0]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == f"{server.url}/dicom-web"
    subject = study["subject"]["reference"]
    assert get(server, subject)["identifier"][0]["value"] == "P1"

    p3 = _patient_id(server, "P3")
    by_patient = get(server, "ImagingStudy", patient=f"Patient/{p3}")
    assert _ids(by_patient) == [hospital["new"], hospital["old"]]  # newest first
    assert _ids(get(server, "ImagingStudy", subject=p3)) == _ids(by_patient)
    assert _ids(get(server, "ImagingStudy", identifier="ACC2")) == [hospital["mr"]]
    chained = get(
        server, "ImagingStudy", **{"patient.identifier": "urn:cloudfilm:patient-id:HOSP|P3"}
    )
    assert _ids(chained) == _ids(by_patient)
    assert _ids(
        get(server, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{hospital['mr']}")
    ) == [hospital["mr"]]
    assert _ids(get(server, "ImagingStudy", started="2026-01")) == [hospital["ct"]]
    assert set(_ids(get(server, "ImagingStudy", started="ge2026-03-15"))) == {
        hospital["mr"],
        hospital["new"],
    }
    assert _ids(get(server, "ImagingStudy", started="lt2026")) == [hospital["old"]]
    assert _ids(get(server, "ImagingStudy", modality="MR")) == [hospital["mr"], hospital["old"]]
    included = get(server, "ImagingStudy", patient=p3, _include="ImagingStudy:subject")
    assert _ids(included, "Patient") == [p3]
    assert [e["search"]["mode"] for e in included["entry"]] == ["match", "match", "include"]
    paged = get(server, "ImagingStudy", _count=3)
    assert paged["total"] == 4 and len(paged["entry"]) == 3


def test_errors__operation_outcome(live_server: LiveServer, hospital: dict[str, str]) -> None:
    server = live_server
    get(server, "Patient/999999", status=404)
    get(server, "Patient/not-a-number", status=404)
    get(server, "ImagingStudy/1.2.3.4", status=404)
    get(server, "Patient", status=400, birthdate="yesterday")
    get(server, "Patient", status=400, colour="blue")
    get(server, "ImagingStudy", status=400, _count="many")
    get(server, "ImagingStudy", status=400, _include="ImagingStudy:performer")
    outcome = get(server, "Patient", headers={}, status=401)
    assert outcome["issue"][0]["code"] == "login"
    # Without a FHIR Accept header the guard's own JSON stays.
    plain = httpx.get(f"{server.url}/fhir/R4/Patient")
    assert plain.status_code == 401 and plain.json()["error"] == "not_signed_in"


def test_scope__other_department_sees_nothing(
    live_server: LiveServer, hospital: dict[str, str]
) -> None:
    server = live_server
    make_user(server, "heart", ["clinician"], department="cardiology")
    make_user(server, "eye", ["clinician"], department="ophthalmology")
    heart, eye = signed_in(server, "heart"), signed_in(server, "eye")
    assert _ids(get(server, "ImagingStudy", headers=heart)) == [hospital["ct"]]
    p1 = _patient_id(server, "P1")
    assert _ids(get(server, "Patient", headers=heart)) == [p1]
    get(server, f"ImagingStudy/{hospital['mr']}", headers=heart, status=404)
    get(server, f"Patient/{_patient_id(server, 'P2')}", headers=heart, status=404)
    assert get(server, "ImagingStudy", headers=eye)["total"] == 0
    assert get(server, "Patient", headers=eye)["total"] == 0
    get(server, f"ImagingStudy/{hospital['ct']}", headers=eye, status=404)
    get(server, f"Patient/{p1}", headers=eye, status=404)
    get(server, "AuditEvent", headers=heart, status=403)


def test_audit_event__search_as_auditadmin(
    live_server: LiveServer, hospital: dict[str, str]
) -> None:
    server = live_server
    make_user(server, "auditor", ["auditadmin"])
    auditor = signed_in(server, "auditor")
    get(server, f"ImagingStudy/{hospital['ct']}")
    mine = get(server, "AuditEvent", headers=auditor, agent="pytest", _count=50)
    assert mine["total"] >= 1
    assert all(
        e["resource"]["agent"][0]["who"]["identifier"]["value"] == "pytest" for e in mine["entry"]
    )
    by_entity = get(server, "AuditEvent", headers=auditor, **{"entity-id": hospital["ct"]})
    assert by_entity["total"] >= 2  # the ingest and the read
    p1 = _patient_id(server, "P1")
    by_patient = get(server, "AuditEvent", headers=auditor, patient=f"Patient/{p1}")
    assert by_patient["total"] >= 1
    assert get(server, "AuditEvent", headers=auditor, date="lt2000")["total"] == 0
    assert get(server, "AuditEvent", headers=auditor, date="ge2000-01-01")["total"] >= 1
    one = _ids(mine)[0]
    assert get(server, f"AuditEvent/{one}", headers=auditor)["id"] == one
    get(server, "AuditEvent/999999999", headers=auditor, status=404)


def test_fhirclient__reads_patient_and_searches_studies(
    live_server: LiveServer, hospital: dict[str, str]
) -> None:
    from fhirclient import client
    from fhirclient.models.imagingstudy import ImagingStudy as ClientStudy
    from fhirclient.models.patient import Patient as ClientPatient

    server = live_server
    smart = client.FHIRClient(settings={"app_id": "pytest", "api_base": f"{server.url}/fhir/R4"})
    smart.server.session.headers.update(server.headers)
    pid = _patient_id(server, "P3")
    patient = ClientPatient.read(pid, smart.server)
    assert patient.identifier[0].value == "P3"
    studies = list(ClientStudy.where(struct={"patient": pid}).perform_resources_iter(smart.server))
    assert sorted(s.id for s in studies) == sorted([hospital["old"], hospital["new"]])
    assert all(s.endpoint[0].reference == "#dicomweb" for s in studies)


def test_unsupported_type__operation_outcome(live_server: LiveServer) -> None:
    body = get(live_server, "Appointment", status=404)
    assert body["issue"][0]["code"] == "not-supported"
    get(live_server, "Appointment/1", status=404)
    assert "entry" not in get(live_server, "Patient")  # FHIR JSON has no empty arrays
