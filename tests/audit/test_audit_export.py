"""Search, CSV, FHIR AuditEvent and DICOM audit messages (PS3.15 A.5) of audit records."""

from __future__ import annotations

import base64
import csv
import io
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from audit_records import append
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from sqlalchemy import Row

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.export import (
    CSV_HEADERS,
    EVENT_CODES,
    csv_chunks,
    dicom_audit_message,
    fhir_audit_event,
)
from cloudfilm.audit.query import COLUMNS, AuditQuery, as_json, get_event, iter_matching, search
from cloudfilm.audit.service import Actor
from cloudfilm.errors import NotFound

from conftest import DATA

DOCTOR = Actor(ActorType.USER, "wang", source="10.1.2.3:50123", role="radiologist,clinician")
PACS = Actor.ae("PACS01", "192.168.7.9:104")
STUDY = "1.2.840.113619.2.55.3.1"


def _record(archive: Archive, actor: Actor, event: AuditEventType, **fields: Any) -> None:
    fields.setdefault("action", AuditAction.READ)
    with archive.db.session() as session:
        audit.record(session=session, actor=actor, event_type=event, **fields)


def _mixed_trail(archive: Archive) -> None:
    _record(
        archive,
        Actor(DOCTOR.type, DOCTOR.id, DOCTOR.source, DOCTOR.role, request_id="req-0001"),
        AuditEventType.QUERY,
        action=AuditAction.EXECUTE,
        object_type="http",
        object_id="/dicom-web/studies",
        patient_id="P0001",
        message="GET /dicom-web/studies -> 200",
        detail={"query": "PatientID=P0001&StudyDate=20260101-", "status": 200},
    )
    _record(
        archive,
        PACS,
        AuditEventType.INSTANCE_STORED,
        action=AuditAction.CREATE,
        object_type="instance",
        object_id="1.2.3.4.5",
        patient_id="P0001",
        study_instance_uid=STUDY,
    )
    _record(
        archive,
        Actor(ActorType.ANONYMOUS, "anonymous", source="203.0.113.5:4444"),
        AuditEventType.AUTHENTICATION_FAILED,
        outcome=AuditOutcome.SERIOUS_FAILURE,
        message='=HYPERLINK("http://evil") \x07 bell',
    )
    _record(
        archive,
        Actor.cli("cloudfilm import", source="/srv/inbox/ct/0001.dcm"),
        AuditEventType.INSTANCE_STORED,
        action=AuditAction.CREATE,
        object_type="instance",
        object_id="1.2.3.4.6",
        study_instance_uid=STUDY,
    )


def _all(archive: Archive) -> list[Row[Any]]:
    with archive.db.read_connection() as conn:
        return list(iter_matching(conn, AuditQuery()))


def _search(archive: Archive, **filters: Any) -> list[str]:
    with archive.db.read_connection() as conn:
        page = search(conn, AuditQuery(**filters), limit=100)
    return [f"{row.seq}:{row.event_type}" for row in page.events]


def test_search__each_filter(archive: Archive) -> None:
    _mixed_trail(archive)
    assert _search(archive) == [
        "4:instance-stored",
        "3:authentication-failed",
        "2:instance-stored",
        "1:query",
    ]
    assert _search(archive, actor_id="wang") == ["1:query"]
    assert _search(archive, actor_type="dicom-ae") == ["2:instance-stored"]
    assert _search(archive, event_type="instance-stored") == [
        "4:instance-stored",
        "2:instance-stored",
    ]
    assert _search(archive, outcome=8) == ["3:authentication-failed"]
    assert _search(archive, outcome=0, patient_id="P0001") == ["2:instance-stored", "1:query"]
    assert _search(archive, study_instance_uid=STUDY) == [
        "4:instance-stored",
        "2:instance-stored",
    ]
    assert _search(archive, source="10.1.2.3") == ["1:query"]
    assert _search(archive, source="10.1.2.3_") == []  # LIKE wildcards are literal
    assert _search(archive, request_id="req-0001") == ["1:query"]


def test_search__time_range_in_any_zone(archive: Archive) -> None:
    _mixed_trail(archive)
    now = datetime.now(UTC)
    beijing = now.astimezone(UTC).replace(tzinfo=None) + timedelta(hours=8)
    assert len(_search(archive, since=now - timedelta(minutes=5))) == 4
    assert _search(archive, since=now + timedelta(seconds=5)) == []
    assert _search(archive, until=now - timedelta(minutes=5)) == []
    # A naive time is UTC: eight hours ahead of now finds everything before it.
    assert len(_search(archive, until=beijing)) == 4


def test_search__pages_newest_first(archive: Archive) -> None:
    append(archive, 7)
    with archive.db.read_connection() as conn:
        first = search(conn, AuditQuery(), limit=3)
        last = search(conn, AuditQuery(), limit=3, offset=6)
    assert [r.seq for r in first.events] == [7, 6, 5] and first.next_offset == 3
    assert [r.seq for r in last.events] == [1] and last.next_offset is None


def test_get_event__json_and_unknown_id(archive: Archive) -> None:
    _mixed_trail(archive)
    row = _all(archive)[0]
    with archive.db.read_connection() as conn:
        document = as_json(get_event(conn, row.id))
        with pytest.raises(NotFound):
            get_event(conn, row.id + 1000)
    assert list(document) == list(COLUMNS)
    assert document["occurred_at"].endswith("Z") and len(document["occurred_at"]) == 24
    assert document["detail"]["query"].startswith("PatientID=")


def test_csv__bom_chinese_header_and_every_row(archive: Archive) -> None:
    _mixed_trail(archive)
    append(archive, 450, start=10)  # several chunks
    chunks = list(csv_chunks(_all(archive)))
    assert len(chunks) > 3
    data = b"".join(chunks)
    assert data.startswith(b"\xef\xbb\xbf")
    table = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    assert table[0] == [CSV_HEADERS[name] for name in COLUMNS]
    assert table[0][:3] == ["记录号", "链序号", "时间(UTC)"]
    assert len(table) == 1 + 454
    by_seq = {int(line[1]): dict(zip(COLUMNS, line, strict=True)) for line in table[1:]}
    assert by_seq[1]["actor_role"] == "radiologist,clinician"
    assert by_seq[3]["message"].startswith("'=HYPERLINK")  # not a formula in Excel
    first = by_seq[5]
    assert first["detail"] == '{"i": 10, "list": [1, null, "x"], "ratio": 1.0, "姓名": "王小明"}'
    assert first["message"] == "查询患者 10"


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_fhir__valid_r4_audit_event(archive: Archive, index: int) -> None:
    _mixed_trail(archive)
    row = _all(archive)[index]
    resource = fhir_audit_event(row, observer="CLOUDFILM")
    parsed = FhirAuditEvent.model_validate(resource)
    assert parsed.id == str(row.id)
    assert parsed.action == row.action and parsed.outcome == str(row.outcome)
    assert resource["recorded"].endswith("Z")
    assert resource["source"]["observer"]["display"] == "Cloud Film CLOUDFILM"
    requestor = resource["agent"][0]
    assert requestor["requestor"] is True and requestor["who"]["display"] == row.actor_id


def test_fhir__codes_agent_and_entities(archive: Archive) -> None:
    _mixed_trail(archive)
    query, store, failed, imported = (
        fhir_audit_event(row, observer="CLOUDFILM") for row in _all(archive)
    )
    assert query["type"]["code"] == "110112" and query["action"] == "E"
    agent = query["agent"][0]
    assert agent["network"] == {"address": "10.1.2.3", "type": "2"}
    assert [r["coding"][0]["code"] for r in agent["role"]] == ["radiologist", "clinician"]
    entities = {e["type"]["code"]: e for e in query["entity"]}
    assert entities["1"]["what"]["identifier"]["value"] == "P0001"
    assert entities["1"]["role"]["display"] == "Patient"
    assert base64.b64decode(entities["2"]["query"]).decode() == (
        "PatientID=P0001&StudyDate=20260101-"
    )
    assert entities["XrequestId"]["what"]["identifier"]["value"] == "req-0001"

    assert store["type"]["display"] == "DICOM Instances Transferred"
    assert store["agent"][0]["type"]["coding"][0]["display"] == "Source Role ID"
    study = next(e for e in store["entity"] if e["role"]["code"] == "3")
    assert study["what"]["identifier"]["value"] == f"urn:oid:{STUDY}"

    assert (failed["type"]["code"], failed["subtype"][0]["code"]) == ("110114", "110122")
    assert failed["outcome"] == "8" and "\x07" not in failed["outcomeDesc"]
    assert imported["type"]["display"] == "Import"
    assert "network" not in imported["agent"][0]  # a file path is no network address


def test_fhir__event_types_without_dicom_code_are_rest(archive: Archive) -> None:
    _record(archive, DOCTOR, AuditEventType.HTTP_REQUEST, object_type="http", object_id="/api/x")
    resource = fhir_audit_event(_all(archive)[0], observer="CLOUDFILM")
    FhirAuditEvent.model_validate(resource)
    assert resource["type"]["code"] == "rest"


def test_dicom__audit_message_has_the_schema_elements_in_order(archive: Archive) -> None:
    _mixed_trail(archive)
    for row in _all(archive):
        root = ET.fromstring(dicom_audit_message(row, audit_source_id="CLOUDFILM"))
        assert root.tag == "AuditMessage"
        tags = [child.tag for child in root]
        assert tags[0] == "EventIdentification"
        participants = tags[1 : tags.index("AuditSourceIdentification")]
        assert participants and set(participants) == {"ActiveParticipant"}
        assert set(tags[tags.index("AuditSourceIdentification") + 1 :]) <= {
            "ParticipantObjectIdentification"
        }
        event = root.find("EventIdentification")
        assert event is not None
        assert event.get("EventActionCode") == row.action
        assert event.get("EventOutcomeIndicator") == str(row.outcome)
        assert datetime.fromisoformat(event.get("EventDateTime", ""))
        event_id = event.find("EventID")
        assert event_id is not None
        for coded in root.iter():
            if coded.get("csd-code") is not None and coded.tag != "AuditSourceTypeCode":
                assert coded.get("codeSystemName") and coded.get("originalText")
        for participant in root.iter("ActiveParticipant"):
            assert participant.get("UserID") and participant.get("UserIsRequestor") in (
                "true",
                "false",
            )
        for obj in root.iter("ParticipantObjectIdentification"):
            assert obj.get("ParticipantObjectID")
            assert obj[0].tag == "ParticipantObjectIDTypeCode"
        source = root.find("AuditSourceIdentification")
        assert source is not None and source.get("AuditSourceID") == "CLOUDFILM"


def test_dicom__query_patient_and_study(archive: Archive) -> None:
    _mixed_trail(archive)
    query, store, failed, _ = (
        ET.fromstring(dicom_audit_message(row, audit_source_id="CLOUDFILM"))
        for row in _all(archive)
    )
    event_id = query.find("EventIdentification/EventID")
    assert event_id is not None
    assert (event_id.get("csd-code"), event_id.get("codeSystemName")) == ("110112", "DCM")
    requestor = query.find("ActiveParticipant[@UserIsRequestor='true']")
    assert requestor is not None
    assert (requestor.get("UserID"), requestor.get("NetworkAccessPointID")) == ("wang", "10.1.2.3")
    sent = query.find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert sent is not None and base64.b64decode(sent.text or "").startswith(b"PatientID=P0001")

    objects = {
        o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
        for o in store.iter("ParticipantObjectIdentification")
    }
    assert objects["1"] == "P0001" and objects["3"] == STUDY
    roles = [r.get("originalText") for r in store.iter("RoleIDCode")]
    assert roles == ["Source Role ID", "Destination Role ID"]

    description = failed.find("EventIdentification/EventOutcomeDescription")
    assert description is not None and "\x07" not in (description.text or "")


def test_exports__an_ingested_object(archive: Archive) -> None:
    assert archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=PACS).ok
    row = _all(archive)[-1]
    FhirAuditEvent.model_validate(fhir_audit_event(row, observer="CLOUDFILM"))
    assert (
        ET.fromstring(dicom_audit_message(row, audit_source_id="CLOUDFILM")).find(
            "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']"
        )
        is not None
    )


def test_every_event_type_has_a_dicom_event_code() -> None:
    """Only a plain HTTP request falls back to FHIR's "rest"; every named event has its
    DICOM (DCM) event id, so ATNA exports never lose what happened."""
    missing = {e for e in AuditEventType if e not in EVENT_CODES} - {AuditEventType.HTTP_REQUEST}
    assert not missing
    assert all(code.system == "DCM" or code.code.isdigit() for code, _ in EVENT_CODES.values())
