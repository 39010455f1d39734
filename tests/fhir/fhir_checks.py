"""What every FHIR test asks of a response: it validates with fhir.resources (R4B models)
and with fhirclient's R4 4.0.1 models."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

MODELS: dict[str, Any] = {
    "Binary": Binary,
    "Bundle": Bundle,
    "DiagnosticReport": DiagnosticReport,
    "DocumentReference": DocumentReference,
    "Encounter": Encounter,
    "ImagingStudy": ImagingStudy,
    "OperationOutcome": OperationOutcome,
    "Patient": Patient,
    "ServiceRequest": ServiceRequest,
}


def valid(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` validates with fhir.resources and with fhirclient's R4 4.0.1 models."""
    from fhirclient.models import fhirelementfactory

    MODELS[body["resourceType"]].model_validate(body)
    for entry in body.get("entry", []):
        MODELS[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    fhirelementfactory.FHIRElementFactory.instantiate(body["resourceType"], body)
    return body
