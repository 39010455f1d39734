"""Index rows as FHIR R4 resources (JSON dictionaries).

Identifiers and ids:

* ``Patient.id`` is the index's row id of the patient (``patient.id``): stable for as long
  as the row lives, opaque to callers, and found by primary key. A hash of PatientID and
  issuer would survive a re-index too, but needs a column to be searched by; the MPI work
  (issue 7 item 1) will add ``Patient.link`` for merged persons.
* ``ImagingStudy.id`` is the Study Instance UID: a UID fits FHIR's ``id`` type (digits and
  dots, at most 64 characters) and is what every DICOM peer already knows.
* ``AuditEvent.id`` is the audit row id, as the audit API uses.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

from cloudfilm.archive.models import Patient, Series, Study

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PATIENT_ID_SYSTEM = "urn:cloudfilm:patient-id"
"""Identifier system of a PatientID without issuer; with an issuer ``…:<issuer>``."""
ACCESSION_SYSTEM = "urn:cloudfilm:accession"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"

#: DICOM times are local wall-clock times without a zone (the index keeps no Timezone
#: Offset From UTC); FHIR wants a zone on every dateTime with a time. The hospitals this
#: archive serves keep China Standard Time.
LOCAL_OFFSET = "+08:00"

_GENDER = {"M": "male", "F": "female", "O": "other"}


def patient_system(issuer: str) -> str:
    return f"{PATIENT_ID_SYSTEM}:{quote(issuer, safe='')}" if issuer else PATIENT_ID_SYSTEM


def issuer_of(system: str) -> str | None:
    """The IssuerOfPatientID a ``Patient.identifier.system`` stands for (``None``: not ours)."""
    if system == PATIENT_ID_SYSTEM:
        return ""
    if system.startswith(PATIENT_ID_SYSTEM + ":"):
        return unquote(system[len(PATIENT_ID_SYSTEM) + 1 :])
    return None


def fhir_date(value: str) -> str | None:
    """DICOM DA ``YYYYMMDD`` → FHIR date ``YYYY-MM-DD`` (``None`` when not a full date)."""
    if len(value) != 8 or not value.isdigit():
        return None
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def fhir_datetime(date: str, time: str) -> str | None:
    """DA + TM → FHIR dateTime; the time only with hours and minutes present."""
    day = fhir_date(date)
    if day is None:
        return None
    digits = time.split(".")[0]
    if len(digits) < 4 or not digits.isdigit():
        return day
    seconds = digits[4:6] if len(digits) >= 6 else "00"
    return f"{day}T{digits[:2]}:{digits[2:4]}:{seconds}{LOCAL_OFFSET}"


def instant(value: Any) -> str:
    """A timezone-aware ``datetime`` as a FHIR instant, UTC."""
    from datetime import UTC

    moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return str(moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _human_name(group: str, *, text_form: bool) -> dict[str, Any] | None:
    components = [c.strip() for c in (group.split("^") + [""] * 5)[:5]]
    family, given, middle, prefix, suffix = components
    if not any(components):
        return None
    name: dict[str, Any] = {"use": "official"}
    if text_form:
        # 王^小东 → text "王小东": Chinese names are written family name first, no space.
        name["text"] = family + given + middle
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [g for g in (given, middle) if g]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def patient(row: Patient) -> dict[str, Any]:
    """The archive's patient as a FHIR Patient.

    PN groups (PS3.5 6.2.1.2): the Alphabetic group becomes the first HumanName (family,
    given, ...), the Ideographic group a second one with ``text`` (Chinese characters)."""
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": str(row.id),
        "meta": {"lastUpdated": instant(row.updated_at)},
    }
    if row.patient_id:
        resource["identifier"] = [
            {
                "use": "usual",
                "type": {"coding": [{"system": _V2_0203, "code": "MR"}]},
                "system": patient_system(row.issuer_of_patient_id),
                "value": row.patient_id,
            }
        ]
        if row.issuer_of_patient_id:
            resource["identifier"][0]["assigner"] = {"display": row.issuer_of_patient_id}
    names = [
        _human_name(row.patient_name_alphabetic, text_form=False),
        _human_name(row.patient_name_ideographic, text_form=True),
    ]
    if found := [n for n in names if n is not None]:
        resource["name"] = found
    resource["gender"] = _GENDER.get(row.patient_sex.strip().upper(), "unknown")
    if birth := fhir_date(row.patient_birth_date):
        resource["birthDate"] = birth
    return resource


def _uid_identifier(uid: str) -> dict[str, Any]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code}


def imaging_study(
    study: Study, series: list[Series], dicomweb: str, based_on: list[int] | None = None
) -> dict[str, Any]:
    """A study with its series as a FHIR ImagingStudy; ``dicomweb`` is the DICOMweb base
    (WADO-RS) the contained Endpoint points at, ``based_on`` the ids of the orders
    (ServiceRequest) it was made for."""
    identifiers = [_uid_identifier(study.study_instance_uid)]
    if study.accession_number:
        identifiers.append(
            {
                "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]},
                "system": ACCESSION_SYSTEM,
                "value": study.accession_number,
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.study_instance_uid,
        "meta": {"lastUpdated": instant(study.updated_at)},
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "dicomweb",
                "status": "active",
                "connectionType": {"system": _CONNECTION_TYPE, "code": "dicom-wado-rs"},
                "name": "Cloud Film DICOMweb",
                "payloadType": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
                                "code": "any",
                            }
                        ]
                    }
                ],
                "payloadMimeType": ["application/dicom"],
                "address": dicomweb,
            }
        ],
        "identifier": identifiers,
        "status": "available",
        "subject": {"reference": f"Patient/{study.patient_pk}"},
        **(
            {"basedOn": [{"reference": f"ServiceRequest/{n}"} for n in based_on]}
            if based_on
            else {}
        ),
        "endpoint": [{"reference": "#dicomweb"}],
        "numberOfSeries": study.number_of_series,
        "numberOfInstances": study.number_of_instances,
    }
    modalities = [m for m in study.modalities_in_study.split("\\") if m]
    if modalities:
        resource["modality"] = [_modality(m) for m in modalities]
    if started := fhir_datetime(study.study_date, study.study_time):
        resource["started"] = started
    if study.study_description:
        resource["description"] = study.study_description
    if study.referring_physician_name:
        resource["referrer"] = {"display": study.referring_physician_name}
    if series:
        resource["series"] = [_series(s) for s in series]
    return resource


def _series(row: Series) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uid": row.series_instance_uid,
        "modality": _modality(row.modality or "OT"),
        "numberOfInstances": row.number_of_instances,
    }
    if row.series_number is not None and row.series_number >= 0:
        entry["number"] = row.series_number
    if row.series_description:
        entry["description"] = row.series_description
    if row.body_part_examined:
        entry["bodySite"] = {"display": row.body_part_examined}
    if started := fhir_datetime(row.series_date, row.series_time):
        entry["started"] = started
    return entry


def operation_outcome(
    severity: str, code: str, diagnostics: str, *, expression: str | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
