"""Imaging orders and visits as FHIR R4 ServiceRequest and Encounter, and a pushed
ServiceRequest back into an order.

* ``ServiceRequest.id`` is the order's row id; its identifiers are the placer order number
  (type ``PLAC``), the filler order number (``FILL``) and the accession number (``ACSN``),
  HL7 table 0203 as R4 5.1 "Identifier" recommends for orders.
* ``Encounter.id`` is the visit's row id; its identifier the visit number (PV1-19).
* ``subject`` is the archive's Patient (the FHIR Patient of this server) when one with the
  order's PatientID is indexed, else a logical reference by identifier (R4 2.3.0.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cloudfilm.fhir import mapping
from cloudfilm.fhir.params import FHIRError
from cloudfilm.orders.models import Encounter, ImagingOrder, OrderStatus, VisitType
from cloudfilm.orders.service import LOCAL_ZONE, OrderData

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
PLACER_SYSTEM = "urn:cloudfilm:placer-order"
FILLER_SYSTEM = "urn:cloudfilm:filler-order"
VISIT_SYSTEM = "urn:cloudfilm:visit-number"
PROCEDURE_SYSTEM = "urn:cloudfilm:procedure"
"""The code system of a procedure code sent without one (OBR-4.3 empty)."""

#: Our status → ServiceRequest.status (R4 request-status).
FHIR_STATUS = {
    OrderStatus.NEW.value: "active",
    OrderStatus.SCHEDULED.value: "active",
    OrderStatus.IN_PROGRESS.value: "active",
    OrderStatus.COMPLETED.value: "completed",
    OrderStatus.CANCELLED.value: "revoked",
}
#: ServiceRequest.status → ours (what a pushed request sets).
ORDER_STATUS = {
    "draft": OrderStatus.NEW,
    "active": OrderStatus.NEW,
    "on-hold": OrderStatus.NEW,
    "completed": OrderStatus.COMPLETED,
    "revoked": OrderStatus.CANCELLED,
    "entered-in-error": OrderStatus.CANCELLED,
}
#: Our visit type → Encounter.class (v3 ActCode) and a Chinese-first display.
ENCOUNTER_CLASS = {
    VisitType.OUTPATIENT.value: ("AMB", "门诊 ambulatory"),
    VisitType.PHYSICAL_EXAM.value: ("AMB", "体检 physical examination"),
    VisitType.INPATIENT.value: ("IMP", "住院 inpatient encounter"),
    VisitType.EMERGENCY.value: ("EMER", "急诊 emergency"),
}
#: Encounter class code → our visit types (the ``class`` search).
CLASS_VISIT_TYPES = {
    "AMB": [VisitType.OUTPATIENT.value, VisitType.PHYSICAL_EXAM.value],
    "IMP": [VisitType.INPATIENT.value],
    "EMER": [VisitType.EMERGENCY.value],
}


def _identifier(code: str, system: str, value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": code}]}, "system": system,
            "value": value}  # fmt: skip


def _moment(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def subject(patient_pk: int | None, patient_id: str, authority: str) -> dict[str, Any]:
    """The Patient reference of an order or visit."""
    if patient_pk is not None:
        return {"reference": f"Patient/{patient_pk}"}
    return {"identifier": {"system": mapping.patient_system(authority), "value": patient_id}}


def service_request(order: ImagingOrder, patient: dict[str, Any] | None) -> dict[str, Any]:
    identifiers = []
    if order.placer_order_number:
        identifiers.append(_identifier("PLAC", PLACER_SYSTEM, order.placer_order_number))
    if order.filler_order_number:
        identifiers.append(_identifier("FILL", FILLER_SYSTEM, order.filler_order_number))
    if order.accession_number:
        identifiers.append(_identifier("ACSN", mapping.ACCESSION_SYSTEM, order.accession_number))
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": str(order.id),
        "meta": {"lastUpdated": mapping.instant(order.updated_at)},
        "status": FHIR_STATUS.get(order.status, "unknown"),
        "intent": "order",
        # A data-absent subject is not allowed (1..1): an order always has its patient.
        "subject": patient or {"display": "unknown"},
    }
    if identifiers:
        resource["identifier"] = identifiers
    if order.modality:
        resource["category"] = [{"coding": [{"system": mapping.DCM, "code": order.modality}]}]
    if order.procedure_code or order.procedure_text:
        code: dict[str, Any] = {}
        if order.procedure_code:
            coding = {"system": order.procedure_system or PROCEDURE_SYSTEM,
                      "code": order.procedure_code}  # fmt: skip
            if order.procedure_text:
                coding["display"] = order.procedure_text
            code["coding"] = [coding]
        if order.procedure_text:
            code["text"] = order.procedure_text
        resource["code"] = code
    if order.encounter_id is not None:
        resource["encounter"] = {"reference": f"Encounter/{order.encounter_id}"}
    if scheduled := _moment(order.scheduled_at):
        resource["occurrenceDateTime"] = scheduled
    if authored := _moment(order.authored_at):
        resource["authoredOn"] = authored
    if order.requesting_doctor:
        resource["requester"] = {"display": order.requesting_doctor}
    if order.department:
        resource["locationCode"] = [{"text": order.department}]
    return resource


def encounter(row: Encounter, patient: dict[str, Any] | None) -> dict[str, Any]:
    code, display = ENCOUNTER_CLASS.get(row.visit_type, ("UNK", "unknown"))
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": str(row.id),
        "meta": {"lastUpdated": mapping.instant(row.updated_at)},
        "identifier": [{"system": VISIT_SYSTEM, "value": row.visit_number}],
        "status": "finished" if row.discharged_at is not None else "in-progress",
        "class": {
            "system": NULL_FLAVOR if code == "UNK" else ACT_CODE,
            "code": code,
            "display": display,
        },
    }
    if row.visit_type == VisitType.PHYSICAL_EXAM.value:
        resource["type"] = [{"text": "体检 physical examination"}]
    if patient is not None:
        resource["subject"] = patient
    if row.department:
        resource["serviceType"] = {"text": row.department}
    period = {}
    if start := _moment(row.admitted_at):
        period["start"] = start
    if end := _moment(row.discharged_at):
        period["end"] = end
    if period:
        resource["period"] = period
    if place := " ".join(p for p in (row.ward, row.room, row.bed) if p):
        resource["location"] = [{"location": {"display": place}}]
    return resource


# ------------------------------------------------------------------ pushed requests


@dataclass(slots=True)
class Pushed:
    """What a ServiceRequest sent in asks for."""

    data: OrderData
    status: str
    """Its FHIR status."""
    patient_ref: str | None
    """``Patient/<id>`` of this server, or None when ``patient_identifier`` names it."""
    patient_identifier: tuple[str, str] | None
    """(assigning authority, value)."""
    encounter_ref: str | None


def _parse_instant(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        text = str(value)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise FHIRError(400, "invalid", f"{where}: {text[:40]!r} is not a dateTime") from exc
    if moment.tzinfo is None:  # a date without time: the start of the day, local time
        moment = moment.replace(tzinfo=LOCAL_ZONE)
    return moment.astimezone(UTC)


def read_service_request(body: Any) -> Pushed:
    """Validate a ServiceRequest (fhir.resources) and read what an order takes from it.

    Raises
    ------
    FHIRError
        400 ``structure`` when it is not a valid R4 ServiceRequest, 422 ``required`` when
        it lacks what an imaging order needs (a placer or filler number, the patient).
    """
    from fhir.resources.R4B.servicerequest import ServiceRequest

    if not isinstance(body, dict) or body.get("resourceType") != "ServiceRequest":
        raise FHIRError(400, "structure", "the body is not a ServiceRequest resource")
    try:
        ServiceRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'ServiceRequest'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise FHIRError(400, "structure", f"invalid ServiceRequest: {problems}") from exc
    if body.get("intent") not in ("order", "original-order", "instance-order", "filler-order"):
        raise FHIRError(422, "value", "intent: an imaging order is intent 'order'")
    # What the resource can say and leaves out is cleared (an update replaces the
    # resource, R4 3.1.0.4); the visit fields it cannot carry (ward, bed) are kept.
    data = OrderData(
        accession_number="",
        procedure_code="",
        procedure_text="",
        procedure_system="",
        modality="",
        department="",
        requesting_doctor="",
    )
    for ident in body.get("identifier", []):
        codes = {c.get("code") for c in ident.get("type", {}).get("coding", [])}
        system, value = ident.get("system", ""), ident.get("value", "")
        if not value:
            continue
        if "PLAC" in codes or system == PLACER_SYSTEM:
            data.placer_order_number = value
        elif "FILL" in codes or system == FILLER_SYSTEM:
            data.filler_order_number = value
        elif "ACSN" in codes or system == mapping.ACCESSION_SYSTEM:
            data.accession_number = value
    if not data.placer_order_number and not data.filler_order_number:
        raise FHIRError(
            422,
            "required",
            "identifier: 需要申请单号（PLAC）或执行单号（FILL） · a placer (type PLAC) or "
            "filler (type FILL) order number is required",
        )
    for name, limit in (("placer_order_number", 64), ("filler_order_number", 64),
                        ("accession_number", 64)):  # fmt: skip
        value = getattr(data, name)
        if value is not None and len(value) > limit:
            raise FHIRError(422, "value", f"identifier: {name} longer than {limit} characters")
    code = body.get("code") or {}
    codings = code.get("coding") or []
    if codings:
        data.procedure_code = codings[0].get("code") or ""
        system = codings[0].get("system") or ""
        data.procedure_system = "" if system == PROCEDURE_SYSTEM else system
        data.procedure_text = code.get("text") or codings[0].get("display") or ""
    elif code.get("text"):
        data.procedure_text = code["text"]
    for category in body.get("category", []):
        for coding in category.get("coding", []):
            if coding.get("system") == mapping.DCM and coding.get("code"):
                data.modality = coding["code"].upper()
    data.scheduled_at = _parse_instant(body.get("occurrenceDateTime"), "occurrenceDateTime")
    data.authored_at = _parse_instant(body.get("authoredOn"), "authoredOn")
    requester = body.get("requester") or {}
    if requester.get("display"):
        data.requesting_doctor = requester["display"]
    locations = body.get("locationCode") or []
    if locations and locations[0].get("text"):
        data.department = locations[0]["text"]
    subject_ = body.get("subject") or {}
    reference = subject_.get("reference")
    identifier = subject_.get("identifier") or {}
    patient: tuple[str, str] | None = None
    if reference:
        if not str(reference).startswith("Patient/"):
            raise FHIRError(422, "value", "subject: a reference to a Patient of this server")
    elif identifier.get("value"):
        system = identifier.get("system") or ""
        issuer = mapping.issuer_of(system)
        patient = (issuer if issuer is not None else system, identifier["value"])
    else:
        raise FHIRError(
            422, "required", "subject: 需要患者引用或标识 · Patient/<id> or an identifier"
        )
    encounter_ref = (body.get("encounter") or {}).get("reference")
    if encounter_ref and not str(encounter_ref).startswith("Encounter/"):
        raise FHIRError(422, "value", "encounter: a reference to an Encounter of this server")
    return Pushed(data, str(body.get("status")), reference, patient, encounter_ref)
