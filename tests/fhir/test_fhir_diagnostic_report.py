"""FHIR DiagnosticReport (create, update → versions, read, search, Binary) over the
reports: plain HTTP and fhirclient; every response validates with fhir.resources and
fhirclient's R4 models; bad resources get an OperationOutcome."""

from __future__ import annotations

import base64
from typing import Any

import httpx
from fhir_checks import valid
from sqlalchemy import select

from cloudfilm.archive.models import Patient
from cloudfilm.reports.models import ReportVersion
from cloudfilm.reports.worker import ReportWorker

from conftest import DATA, LiveServer

FHIR = "application/fhir+json"
ACCESSION = "urn:cloudfilm:accession"


def call(server: LiveServer, method: str, path: str, status: int = 200, **kw: Any) -> Any:
    response = httpx.request(
        method, f"{server.url}/fhir/R4/{path}",
        headers={"Accept": FHIR, "Content-Type": FHIR, **server.headers}, **kw,
    )  # fmt: skip
    assert response.status_code == status, response.text
    return valid(response.json())


def ingest(server: LiveServer, accession: str) -> tuple[str, int]:
    """A CT study with ``accession``: its UID and the Patient id."""
    import io

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from cloudfilm.audit.service import Actor

    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber, ds.PatientID = accession, "FP1"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert server.archive.ingest(out.getvalue(), actor=Actor.cli("pytest")).ok
    with server.archive.db.read_session() as session:
        pk = session.scalars(select(Patient.id).where(Patient.patient_id == "FP1")).one()
    return str(ds.StudyInstanceUID), pk


def body(study: str, patient: int, status: str = "final", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "identifier": [{"system": ACCESSION, "value": "FA1"}],
        "code": {"text": "胸部CT平扫"},
        "subject": {"reference": f"Patient/{patient}"},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
        "effectiveDateTime": "2026-11-28T09:00:00+08:00",
        "issued": "2026-11-28T14:30:00+08:00",
        "performer": [{"display": "李医生"}],
        "resultsInterpreter": [{"display": "张主任"}],
        "contained": [
            {
                "resourceType": "Observation",
                "id": "f",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "59776-5"}]},
                "valueString": "双肺纹理清晰，未见实变影。",
            }
        ],  # fmt: skip
        "result": [{"reference": "#f"}],
        "conclusion": "胸部CT平扫未见异常。",
        **extra,
    }


def test_diagnostic_report__create_version_read_search_binary(live_server: LiveServer) -> None:
    server = live_server
    study, patient = ingest(server, "FA1")
    created = call(server, "POST", "DiagnosticReport", 201, json=body(study, patient))
    assert created["status"] == "final" and created["conclusion"] == "胸部CT平扫未见异常。"
    assert created["contained"][0]["valueString"] == "双肺纹理清晰，未见实变影。"
    assert created["subject"] == {"reference": f"Patient/{patient}"}
    assert created["imagingStudy"] == [{"reference": f"ImagingStudy/{study}"}]
    assert created["resultsInterpreter"] == [{"display": "张主任"}]
    assert "presentedForm" not in created  # not rendered yet
    ReportWorker(server.archive).run_once()

    read = call(server, "GET", f"DiagnosticReport/{created['id']}")
    assert read["meta"]["versionId"] == "1"
    [form] = read["presentedForm"]
    assert form["contentType"] == "application/pdf" and "/Binary/" in form["url"]
    pdf = httpx.get(form["url"], headers=server.headers)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    binary = call(server, "GET", form["url"].split("/fhir/R4/")[1])
    assert base64.b64decode(binary["data"]) == pdf.content

    amended = body(study, patient, "amended", id=created["id"], conclusion="更正：右肺小结节。")
    updated = call(server, "PUT", f"DiagnosticReport/{created['id']}", json=amended)
    assert updated["status"] == "corrected" and updated["meta"]["versionId"] == "2"
    with server.archive.db.read_session() as session:
        kept = [
            v.impression for v in session.scalars(select(ReportVersion).order_by(ReportVersion.id))
        ]
    assert kept == ["胸部CT平扫未见异常。", "更正：右肺小结节。"]

    # The document registry: both PDFs, the corrected one replacing the first.
    ReportWorker(server.archive).run_once()
    docs = call(
        server, "GET", "DocumentReference", params={"related": f"DiagnosticReport/{created['id']}"}
    )
    assert docs["total"] == 2
    new, old = (e["resource"] for e in docs["entry"])
    assert (new["status"], old["status"]) == ("current", "superseded")
    assert new["relatesTo"] == [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{old['id']}"}}
    ]
    assert new["subject"] == {"reference": f"Patient/{patient}"}
    assert {"reference": f"ImagingStudy/{study}"} in new["context"]["related"]
    attachment = new["content"][0]["attachment"]
    assert httpx.get(attachment["url"], headers=server.headers).content[:5] == b"%PDF-"
    assert call(server, "GET", f"DocumentReference/{old['id']}")["status"] == "superseded"
    by_patient = call(
        server,
        "GET",
        "DocumentReference",
        params={"patient": f"Patient/{patient}", "status": "current"},
    )
    assert [e["resource"]["id"] for e in by_patient["entry"]] == [new["id"]]

    for params in (
        {"identifier": f"{ACCESSION}|FA1"},
        {"patient": f"Patient/{patient}"},
        {"status": "corrected"},
        {"issued": "ge2026-11-28"},
    ):
        found = call(server, "GET", "DiagnosticReport", params=params)
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [created["id"]], params
    none = call(server, "GET", "DiagnosticReport", params={"status": "preliminary"})
    assert none["total"] == 0
    capability = httpx.get(f"{server.url}/fhir/R4/metadata", headers={"Accept": FHIR}).json()
    kinds = {r["type"]: r for r in capability["rest"][0]["resource"]}
    assert {"code": "create"} in kinds["DiagnosticReport"]["interaction"]


def test_diagnostic_report__bad_resources_get_an_operation_outcome(
    live_server: LiveServer,
) -> None:
    server = live_server
    study, patient = ingest(server, "FA1")
    bad_status = call(
        server, "POST", "DiagnosticReport", 422, json=body(study, patient, "registered")
    )
    assert bad_status["resourceType"] == "OperationOutcome"
    no_exam = body(study, patient)
    del no_exam["identifier"], no_exam["imagingStudy"]
    assert "names no exam" in str(call(server, "POST", "DiagnosticReport", 422, json=no_exam))
    wrong = call(server, "POST", "DiagnosticReport", 400, json={"resourceType": "DiagnosticReport"})
    assert wrong["issue"][0]["code"] == "structure"
    assert call(server, "POST", "DiagnosticReport", 422,
                json=body(study, 999999))["issue"][0]["code"] == "not-found"  # fmt: skip
    call(server, "POST", "DiagnosticReport", 201, json=body(study, patient))
    late = call(server, "POST", "DiagnosticReport", 422, json=body(study, patient, "preliminary"))
    assert "preliminary" in str(late)
    anonymous = httpx.get(f"{server.url}/fhir/R4/DiagnosticReport", headers={"Accept": FHIR})
    assert anonymous.status_code == 401


def test_fhirclient__reads_and_searches_reports(live_server: LiveServer) -> None:
    from fhirclient import client
    from fhirclient.models.diagnosticreport import DiagnosticReport as ClientReport

    server = live_server
    study, patient = ingest(server, "FA1")
    created = call(server, "POST", "DiagnosticReport", 201, json=body(study, patient))
    smart = client.FHIRClient(settings={"app_id": "pytest", "api_base": f"{server.url}/fhir/R4"})
    smart.server.session.headers.update(server.headers)
    read = ClientReport.read(created["id"], smart.server)
    assert read.conclusion == "胸部CT平扫未见异常。" and read.status == "final"
    found = list(
        ClientReport.where(struct={"identifier": "FA1"}).perform_resources_iter(smart.server)
    )
    assert [r.id for r in found] == [created["id"]]
