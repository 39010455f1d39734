"""The audit trail for other eyes and systems: CSV for spreadsheets, FHIR R4 AuditEvent and
DICOM audit messages (PS3.15 A.5) for audit repositories.

Event types map to DICOM's audit codes (PS3.16 CID 400 Audit Event ID, CID 401 Audit
Event Type Code), which FHIR AuditEvent uses too. Types without a DICOM counterpart (a
plain HTTP request) fall back to FHIR's ``rest`` event type.
"""

from __future__ import annotations

import base64
import csv
import io
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row

from cloudfilm.audit.enums import ActorType, AuditEventType
from cloudfilm.audit.query import COLUMNS, iso_ms

DCM = "http://dicom.nema.org/resources/ontology/DCM"
_FHIR_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_ROLE_SYSTEM = "urn:cloudfilm:role"
_OBJECT_SYSTEM = "urn:cloudfilm:object"


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    display: str
    system: str = DCM

    @property
    def system_name(self) -> str:
        """The name DICOM audit messages use for the code system."""
        return "DCM" if self.system == DCM else self.system


_INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
_SECURITY_ALERT = Code("110113", "Security Alert")
_USER_AUTHENTICATION = Code("110114", "User Authentication")
_APPLICATION_ACTIVITY = Code("110100", "Application Activity")
_USER_SECURITY_CHANGED = Code("110137", "User Security Attributes Changed")
_STUDY_DELETED = Code("110105", "DICOM Study Deleted")
_PATIENT_RECORD = Code("110110", "Patient Record")
_REST = Code("rest", "RESTful Operation", _FHIR_EVENT_TYPE)

#: Event type → (event id, event type code).
EVENT_CODES: dict[str, tuple[Code, Code | None]] = {
    AuditEventType.INSTANCE_STORED: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.INSTANCE_REPLACED: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.INSTANCE_DUPLICATE: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.INSTANCE_REJECTED: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.INSTANCE_REFUSED: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.INSTANCES_DELETED: (_STUDY_DELETED, None),
    AuditEventType.INSTANCES_PURGED: (_STUDY_DELETED, None),
    AuditEventType.INSTANCES_RESTORED: (Code("110107", "Import"), None),
    AuditEventType.ALARM_RAISED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.ALARM_CLEARED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.ALARM_ACKNOWLEDGED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STORAGE_SCRUBBED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.OBJECT_REPAIRED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.INSTANCES_COMPRESSED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.OBJECT_DAMAGED: (_SECURITY_ALERT, None),
    AuditEventType.ORPHANS_REMOVED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STUDY_PINNED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STUDY_UNPINNED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STORAGE_JOB_QUEUED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STORAGE_JOB_DONE: (_APPLICATION_ACTIVITY, None),
    AuditEventType.STORAGE_JOB_FAILED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.CHARGE_RECORDED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.CHARGE_REVERSED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.CHARGE_DELIVERY_FAILED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.BILLING_IMPORTED: (Code("110107", "Import"), None),
    AuditEventType.BILLING_IMPORT_REFUSED: (Code("110107", "Import"), None),
    AuditEventType.BILLING_RECONCILED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.BILLING_EXPORTED: (Code("110106", "Export"), None),
    AuditEventType.HL7_MESSAGE_RECEIVED: (_PATIENT_RECORD, None),
    AuditEventType.HL7_MESSAGE_REPLAYED: (_PATIENT_RECORD, None),
    AuditEventType.HL7_MESSAGE_FAILED: (_PATIENT_RECORD, None),
    AuditEventType.PATIENT_MERGED: (_PATIENT_RECORD, None),
    AuditEventType.PATIENT_UNMERGED: (_PATIENT_RECORD, None),
    AuditEventType.NOTIFICATION_SENT: (_APPLICATION_ACTIVITY, None),
    AuditEventType.NOTIFICATION_FAILED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.NOTIFICATION_GIVEN_UP: (_APPLICATION_ACTIVITY, None),
    AuditEventType.NOTIFICATION_REFUSED: (_APPLICATION_ACTIVITY, None),
    AuditEventType.NOTIFICATION_RECEIPT: (_APPLICATION_ACTIVITY, None),
    # Reports are patient records (PS3.15 A.5.3.12); the report PDF's DICOM copy is
    # audited as an instance stored; a download by the patient is an Export.
    AuditEventType.REPORT_RECEIVED: (_PATIENT_RECORD, None),
    AuditEventType.REPORT_RENDERED: (_PATIENT_RECORD, None),
    AuditEventType.REPORT_RELEASED: (_PATIENT_RECORD, None),
    AuditEventType.REPORT_READ: (_PATIENT_RECORD, None),
    AuditEventType.LABEL_PRINTED: (Code("110106", "Export"), None),
    AuditEventType.ENTRY_VERIFIED: (_USER_AUTHENTICATION, Code("110122", "Login")),
    AuditEventType.ENTRY_REFUSED: (_USER_AUTHENTICATION, Code("110122", "Login")),
    AuditEventType.KIOSK_LOOKUP: (Code("110112", "Query"), None),
    # PS3.15 A.5.3.6: printing to paper is an Export of patient data.
    AuditEventType.KIOSK_PRINTED: (Code("110106", "Export"), None),
    AuditEventType.KIOSK_REFUSED: (_SECURITY_ALERT, Code("110132", "Use of Restricted Function")),
    AuditEventType.KIOSK_REPRINT_APPROVED: (_PATIENT_RECORD, None),
    AuditEventType.RETRIEVE: (_INSTANCES_TRANSFERRED, None),
    AuditEventType.QUERY: (Code("110112", "Query"), None),
    AuditEventType.ASSOCIATION_REJECTED: (_SECURITY_ALERT, Code("110126", "Node Authentication")),
    AuditEventType.ACCESS_DENIED: (_SECURITY_ALERT, Code("110132", "Use of Restricted Function")),
    AuditEventType.AUTHENTICATION_FAILED: (_USER_AUTHENTICATION, Code("110122", "Login")),
    AuditEventType.LOGIN: (_USER_AUTHENTICATION, Code("110122", "Login")),
    AuditEventType.LOGOUT: (_USER_AUTHENTICATION, Code("110123", "Logout")),
    AuditEventType.PASSWORD_CHANGED: (_SECURITY_ALERT, _USER_SECURITY_CHANGED),
    AuditEventType.MFA_ENROLLED: (_SECURITY_ALERT, _USER_SECURITY_CHANGED),
    AuditEventType.USER_CHANGED: (_SECURITY_ALERT, _USER_SECURITY_CHANGED),
    AuditEventType.CLIENT_CHANGED: (_SECURITY_ALERT, _USER_SECURITY_CHANGED),
    AuditEventType.ROLE_CHANGED: (_SECURITY_ALERT, Code("110136", "Security Roles Changed")),
    AuditEventType.POLICY_CHANGED: (_SECURITY_ALERT, Code("110129", "Security Configuration")),
    AuditEventType.APPLICATION_START: (_APPLICATION_ACTIVITY, Code("110120", "Application Start")),
    AuditEventType.APPLICATION_STOP: (_APPLICATION_ACTIVITY, Code("110121", "Application Stop")),
    AuditEventType.AUDIT_PURGED: (Code("110101", "Audit Log Used"), None),
    AuditEventType.AUDIT_LOG_USED: (Code("110101", "Audit Log Used"), None),
}

_TRANSFERS = frozenset(
    event for event, (code, _) in EVENT_CODES.items() if code is _INSTANCES_TRANSFERRED
)
_IMPORT = Code("110107", "Import")
_SOURCE_ROLE = Code("110153", "Source Role ID")
_DESTINATION_ROLE = Code("110152", "Destination Role ID")
_APPLICATION_ROLE = Code("110150", "Application")
_STUDY_UID = Code("110180", "Study Instance UID")
_PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
_REQUEST_ID = Code("XrequestId", "X-Request-ID", _BALP_ENTITY)


def event_codes(row: Row[Any]) -> tuple[Code, Code | None]:
    """The DICOM event id and type code of a record; objects stored from files are an
    Import (PS3.15 A.5.3.7), not a network transfer."""
    event, subtype = EVENT_CODES.get(row.event_type, (_REST, None))
    if event is _INSTANCES_TRANSFERRED and row.actor_type == ActorType.CLI:
        return _IMPORT, subtype
    return event, subtype


def _roles(row: Row[Any]) -> tuple[Code | None, Code]:
    """DICOM roles of (the requestor, the archive) in transfers; the archive is otherwise
    just the application."""
    if row.event_type == AuditEventType.RETRIEVE:
        return _DESTINATION_ROLE, _SOURCE_ROLE
    if row.event_type in _TRANSFERS:
        return _SOURCE_ROLE, _DESTINATION_ROLE
    return None, _APPLICATION_ROLE


# -- CSV ---------------------------------------------------------------------------------

#: Column headers of the CSV export, in :data:`cloudfilm.audit.query.COLUMNS` order.
CSV_HEADERS = {
    "id": "记录号",
    "seq": "链序号",
    "occurred_at": "时间(UTC)",
    "event_type": "事件类型",
    "action": "操作",
    "outcome": "结果",
    "actor_type": "操作者类型",
    "actor_id": "操作者",
    "actor_role": "角色",
    "source": "来源地址",
    "object_type": "对象类型",
    "object_id": "对象标识",
    "patient_id": "患者ID",
    "study_instance_uid": "检查UID",
    "request_id": "请求ID",
    "message": "说明",
    "detail": "详情",
    "prev_hash": "前一哈希",
    "hash": "哈希",
    "hash_algorithm": "哈希算法",
}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CSV_FLUSH_ROWS = 200


def csv_chunks(rows: Iterable[Row[Any]]) -> Iterator[bytes]:
    """The records as CSV in UTF-8 with a byte-order mark (so that Excel reads the Chinese
    header right), one chunk per few hundred rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_HEADERS[name] for name in COLUMNS)
    yield "\ufeff".encode() + buffer.getvalue().encode("utf-8")
    buffer.seek(0)
    buffer.truncate()
    for count, row in enumerate(rows, start=1):
        writer.writerow(_csv_cell(name, getattr(row, name)) for name in COLUMNS)
        if count % _CSV_FLUSH_ROWS == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")


def _csv_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name == "occurred_at":
        return iso_ms(value)
    if name == "detail":
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = str(value)
    # A cell a spreadsheet would run as a formula (CSV injection) is quoted as text: audit
    # records carry what callers sent, paths and AE titles included.
    return "'" + text if text.startswith(_FORMULA_START) else text


# -- FHIR R4 AuditEvent ------------------------------------------------------------------


def fhir_audit_event(row: Row[Any], *, observer: str) -> dict[str, Any]:
    """One record as a FHIR R4 AuditEvent (JSON); ``observer`` names this archive (its AE
    title)."""
    event, subtype = event_codes(row)
    requestor_role, archive_role = _roles(row)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "type": _coding(event),
        "action": row.action,
        "recorded": iso_ms(row.occurred_at),
        "outcome": str(row.outcome),
        "agent": [
            _fhir_requestor(row, requestor_role),
            {
                "type": {"coding": [_coding(archive_role)]},
                "who": {"display": observer},
                "requestor": False,
            },
        ],
        "source": {
            "site": observer,
            "observer": {"display": f"Cloud Film {observer}"},
            "type": [_coding(Code("4", "Application Server", _SOURCE_TYPE))],
        },
    }
    if subtype is not None:
        resource["subtype"] = [_coding(subtype)]
    if message := _clean(row.message, fhir=True):
        resource["outcomeDesc"] = message
    if entities := _fhir_entities(row):
        resource["entity"] = entities
    return resource


def _fhir_requestor(row: Row[Any], role: Code | None) -> dict[str, Any]:
    actor = _clean(row.actor_id, fhir=True) or "-"
    agent: dict[str, Any] = {
        "who": {
            "identifier": {"system": f"urn:cloudfilm:{row.actor_type}", "value": actor},
            "display": actor,
        },
        "requestor": True,
    }
    if role is not None:
        agent["type"] = {"coding": [_coding(role)]}
    if row.actor_role:
        agent["role"] = [
            {"coding": [_coding(Code(r, r, _ROLE_SYSTEM))]} for r in row.actor_role.split(",") if r
        ]
    if (host := _ip_address(row.source)) is not None:
        agent["network"] = {"address": host, "type": "2"}
    return agent


def _fhir_entities(row: Row[Any]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if row.patient_id:
        entities.append(
            {
                "what": {"identifier": {"value": _clean(row.patient_id, fhir=True)}},
                "type": _coding(Code("1", "Person", _ENTITY_TYPE)),
                "role": _coding(Code("1", "Patient", _OBJECT_ROLE)),
            }
        )
    if row.study_instance_uid:
        entities.append(
            {
                "what": {
                    "identifier": {
                        "type": {"coding": [_coding(_STUDY_UID)]},
                        "system": "urn:dicom:uid",
                        "value": f"urn:oid:{row.study_instance_uid}",
                    }
                },
                "type": _coding(Code("2", "System Object", _ENTITY_TYPE)),
                "role": _coding(Code("3", "Report", _OBJECT_ROLE)),
            }
        )
    if row.object_id and row.object_id != row.study_instance_uid:
        entity: dict[str, Any] = {
            "what": {
                "identifier": {
                    "system": f"{_OBJECT_SYSTEM}:{row.object_type or 'object'}",
                    "value": _clean(row.object_id, fhir=True),
                }
            },
            "type": _coding(Code("2", "System Object", _ENTITY_TYPE)),
        }
        if query := _query_text(row):
            entity["role"] = _coding(Code("24", "Query", _OBJECT_ROLE))
            entity["query"] = base64.b64encode(query.encode("utf-8")).decode("ascii")
        entities.append(entity)
    if row.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": _clean(row.request_id, fhir=True)}},
                "type": _coding(_REQUEST_ID),
            }
        )
    return entities


def _coding(code: Code) -> dict[str, str]:
    return {"system": code.system, "code": code.code, "display": code.display}


# -- DICOM audit message (PS3.15 A.5) ----------------------------------------------------


def dicom_audit_message(row: Row[Any], *, audit_source_id: str) -> bytes:
    """One record as a DICOM audit message (PS3.15 A.5.1 schema, UTF-8 XML);
    ``audit_source_id`` names this archive (its AE title)."""
    event, subtype = event_codes(row)
    requestor_role, archive_role = _roles(row)
    message = ET.Element("AuditMessage")
    identification = ET.SubElement(
        message,
        "EventIdentification",
        EventActionCode=row.action,
        EventDateTime=iso_ms(row.occurred_at),
        EventOutcomeIndicator=str(row.outcome),
    )
    _coded(identification, "EventID", event)
    if subtype is not None:
        _coded(identification, "EventTypeCode", subtype)
    if description := _clean(row.message):
        ET.SubElement(identification, "EventOutcomeDescription").text = description

    requestor = ET.SubElement(
        message, "ActiveParticipant", UserID=_clean(row.actor_id) or "-", UserIsRequestor="true"
    )
    if requestor_role is not None:
        _coded(requestor, "RoleIDCode", requestor_role)
    for role in (row.actor_role or "").split(","):
        if role:
            _coded(requestor, "RoleIDCode", Code(role, role, _ROLE_SYSTEM))
    if (host := _ip_address(row.source)) is not None:
        requestor.set("NetworkAccessPointID", host)
        requestor.set("NetworkAccessPointTypeCode", "2")
    archive = ET.SubElement(
        message, "ActiveParticipant", UserID=audit_source_id, UserIsRequestor="false"
    )
    _coded(archive, "RoleIDCode", archive_role)

    source = ET.SubElement(message, "AuditSourceIdentification", AuditSourceID=audit_source_id)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server

    for participant in _dicom_objects(row):
        message.append(participant)
    return bytes(ET.tostring(message, encoding="utf-8", xml_declaration=True))


def _dicom_objects(row: Row[Any]) -> list[ET.Element]:
    objects = []
    if row.patient_id:
        patient = _participant(row.patient_id, _PATIENT_NUMBER, type_code="1", role="1")
        objects.append(patient)
    if row.study_instance_uid:
        objects.append(_participant(row.study_instance_uid, _STUDY_UID, type_code="2", role="3"))
    if row.object_id and row.object_id != row.study_instance_uid:
        kind = row.object_type or "object"
        query = _query_text(row)
        participant = _participant(
            row.object_id,
            Code(kind, kind, _OBJECT_SYSTEM),
            type_code="2",
            role="24" if query else None,
        )
        if query:
            encoded = base64.b64encode(query.encode("utf-8")).decode("ascii")
            ET.SubElement(participant, "ParticipantObjectQuery").text = encoded
        objects.append(participant)
    if row.request_id:
        objects.append(_participant(row.request_id, _REQUEST_ID, type_code="2", role=None))
    return objects


def _participant(identifier: str, id_type: Code, *, type_code: str, role: str | None) -> ET.Element:
    participant = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=_clean(identifier) or "-",
        ParticipantObjectTypeCode=type_code,
    )
    if role is not None:
        participant.set("ParticipantObjectTypeCodeRole", role)
    _coded(participant, "ParticipantObjectIDTypeCode", id_type)
    return participant


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    """A CodedValueType element (PS3.15 A.5.1: csd-code, codeSystemName, originalText)."""
    ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _clean(code.code) or "-",
            "codeSystemName": code.system_name,
            "originalText": _clean(code.display) or "-",
        },
    )


# -- shared ------------------------------------------------------------------------------

# XML 1.0 cannot carry these at all; FHIR strings may not carry control characters.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_NOT_FHIR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(value: str | None, *, fhir: bool = False) -> str | None:
    """``value`` without the characters the target format cannot hold; ``None`` if empty."""
    if not value:
        return None
    cleaned = (_NOT_FHIR if fhir else _NOT_XML).sub("\ufffd", value).strip()
    return cleaned or None


def _ip_address(source: str | None) -> str | None:
    """The host of a ``host:port`` source when it is an IP address (a file path or a
    command is not a network access point)."""
    if not source:
        return None
    # Sources carry a port (``10.1.2.3:51234``, ``::1:51234``): try without it first.
    for candidate in (source.rsplit(":", 1)[0].strip("[]"), source):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return None


def _query_text(row: Row[Any]) -> str | None:
    """The query of a query event, as the caller sent it."""
    if row.event_type != AuditEventType.QUERY or not isinstance(row.detail, dict):
        return None
    query = row.detail.get("query")
    return query if isinstance(query, str) and query else None
