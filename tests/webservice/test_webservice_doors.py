"""The query WebService's two doors (HTTP/JSON and SOAP 1.1) over real ingested exams,
on SQLite and PostgreSQL: exam lists by hospital patient ID, by ID-card number (through
the master index's blind index) and by accession number; one exam's status; the WSDL."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.errors import NotFound
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.service import Demographics, identifier
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import ReportStatus
from cloudfilm.soap import service as webservice
from cloudfilm.soap.client import open_response, seal_request
from cloudfilm.soap.wsdl import NS, SOAP_NS

from conftest import DATA, LiveServer

ID_CARD = "11010519491231002X"


def ingest(server: LiveServer, name: str, patient_id: str, accession: str) -> str:
    ds = dcmread(DATA / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.AccessionNumber, ds.PatientName = patient_id, accession, "张^三丰"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert server.archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID)


def key_of(server: LiveServer, name: str = "pytest") -> webservice.ClientKey:
    with server.archive.db.read_session() as session:
        key = webservice.key_of(session=session, settings=server.archive.settings, name=name)
    assert key is not None
    return key


def call_json(server: LiveServer, path: str, params: dict[str, Any]) -> Any:
    key = key_of(server)
    request = seal_request(params, client_id=key.client_id, key=key.key, key_id=key.key_id)
    response = httpx.post(
        f"{server.url}/api/webservice/{path}", json=request, headers=server.headers, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"client_id", "key_id", "timestamp", "nonce", "ciphertext", "reply_to"}
    assert "张" not in response.text  # the result travels sealed
    return open_response(
        answer, client_id=key.client_id, key=key.key, request_nonce=request["nonce"]
    )


def soap_body(operation: str, envelope: dict[str, Any]) -> str:
    fields = "".join(f"<cf:{k}>{v}</cf:{k}>" for k, v in envelope.items())
    return (
        f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP_NS}" '
        f'xmlns:cf="{NS}"><soap:Body><cf:{operation}>{fields}</cf:{operation}></soap:Body>'
        "</soap:Envelope>"
    )


def call_soap(server: LiveServer, operation: str, params: dict[str, Any]) -> Any:
    key = key_of(server)
    request = seal_request(params, client_id=key.client_id, key=key.key, key_id=key.key_id)
    response = httpx.post(
        f"{server.url}/api/webservice/soap",
        timeout=60,  # a loaded CI machine: what is answered matters here, not how fast
        content=soap_body(operation, request).encode(),
        headers={**server.headers, "Content-Type": "text/xml; charset=utf-8",
                 "SOAPAction": f'"{NS}#{operation}"'},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.content)
    answer_element = root.find(f"{{{SOAP_NS}}}Body/{{{NS}}}{operation}Response")
    assert answer_element is not None, response.text
    answer: dict[str, Any] = {c.tag.split("}")[1]: c.text for c in answer_element}
    answer["timestamp"] = int(answer["timestamp"])
    return open_response(
        answer, client_id=key.client_id, key=key.key, request_nonce=request["nonce"]
    )


def test_webservice__json_and_soap_answer_the_same_queries(live_server: LiveServer) -> None:
    server = live_server
    with server.archive.db.session() as session:
        mpi.register(
            session=session,
            identifiers=[identifier("PI", "HIS", "WS100"), identifier("NNCHN", "", ID_CARD)],
            demographics=Demographics(name="张三丰", sex="M"), source="test",
        )  # fmt: skip
    ct = ingest(server, "ct_small.dcm", "WS100", "ACC-WS-1")
    mr = ingest(server, "mr_small.dcm", "WS100", "ACC-WS-2")
    with server.archive.db.session() as session:
        reports.submit(
            session,
            data=reports.ReportData(status=ReportStatus.FINAL, accession_number="ACC-WS-2",
                                    findings="颅内未见异常信号。", impression="头颅MR未见异常。"),
            source="test", actor=Actor.cli("pytest"), storage=server.archive.storage,
        )  # fmt: skip
    ingest(server, "ct_small.dcm", "OTHER", "ACC-WS-3")

    by_pid = call_json(server, "exams", {"patient": {"type": "PI", "value": "WS100"}})
    assert by_pid["operation"] == "QueryExams"
    assert {e["study_instance_uid"] for e in by_pid["result"]["exams"]} == {ct, mr}
    by_card = call_json(server, "exams", {"patient": {"type": "NNCHN", "value": ID_CARD}})
    assert {e["study_instance_uid"] for e in by_card["result"]["exams"]} == {ct, mr}
    by_acc = call_json(server, "exams", {"accession_number": "ACC-WS-2"})
    [exam] = by_acc["result"]["exams"]
    assert exam["study_instance_uid"] == mr and exam["modalities"] == ["MR"]
    assert exam["patient"]["name"] == "张^三丰" and exam["number_of_images"] == 1
    two = call_json(server, "exam", {"accession_number": "ACC-WS-2"})["result"]
    assert two["report"]["impression"] == "头颅MR未见异常。" and two["report"]["status"] == "final"
    assert two["report"]["released"] is False  # the report worker has not run
    assert call_soap(server, "GetExam", {"study_instance_uid": mr})["result"] == two

    one = call_json(server, "exam", {"accession_number": "ACC-WS-1"})["result"]
    assert one["study_instance_uid"] == ct and one["modalities"] == ["CT"]
    assert one["number_of_images"] == 1 and one["report"] is None
    assert one["dicomweb_url"] == f"{server.url}/dicom-web/studies/{ct}"
    assert one["viewer_url"].endswith(f"/ohif/viewer?StudyInstanceUIDs={ct}")
    viewed = httpx.get(one["dicomweb_url"] + "/metadata", headers=server.headers)
    assert viewed.status_code == 200

    soap_list = call_soap(server, "QueryExams", {"patient": {"type": "NNCHN", "value": ID_CARD}})
    assert soap_list["result"] == by_card["result"]
    soap_one = call_soap(server, "GetExam", {"study_instance_uid": ct})
    assert soap_one["result"] == one

    with server.archive.db.read_session() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.object_type == "webservice")
        ).all()
    assert len(events) == 8 and all(e.outcome == 0 for e in events)  # one per call
    assert {e.object_id for e in events} == {"QueryExams", "GetExam"}


def test_webservice__wsdl_names_operations_and_address(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/api/webservice/soap?wsdl", headers=live_server.headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.content)
    wsdl_ns = "http://schemas.xmlsoap.org/wsdl/"
    operations = root.findall(f"{{{wsdl_ns}}}portType/{{{wsdl_ns}}}operation")
    assert [o.get("name") for o in operations] == ["QueryExams", "GetExam"]
    address = root.find(
        f"{{{wsdl_ns}}}service/{{{wsdl_ns}}}port/{{http://schemas.xmlsoap.org/wsdl/soap/}}address"
    )
    assert address is not None
    assert address.get("location") == f"{live_server.url}/api/webservice/soap"
    assert httpx.get(f"{live_server.url}/api/webservice/soap?wsdl").status_code == 401


def test_find_exams__keeps_to_the_data_scope(live_server: LiveServer) -> None:
    """The queries take the caller's data scope (a condition on Study), as QIDO-RS does."""
    from cloudfilm.archive.models import Study

    ct = ingest(live_server, "ct_small.dcm", "WS200", "ACC-WS-9")
    mr = ingest(live_server, "mr_small.dcm", "WS200", "ACC-WS-10")
    links = webservice.Links("https://x/dicom-web", "https://x/ohif/viewer")
    query = webservice.ExamsQuery(patient=webservice.PatientIdentifier(value="WS200"))
    with live_server.archive.db.read_session() as session:
        everything = webservice.find_exams(session=session, query=query, scope=None, links=links)
        only_ct = webservice.find_exams(
            session=session, query=query, scope=Study.study_instance_uid == ct, links=links
        )
        assert {e["study_instance_uid"] for e in everything} == {ct, mr}
        assert [e["study_instance_uid"] for e in only_ct] == [ct]
        with pytest.raises(NotFound):
            webservice.find_exam(
                session=session, query=webservice.ExamQuery(study_instance_uid=mr),
                scope=Study.study_instance_uid == ct, links=links,
            )  # fmt: skip
