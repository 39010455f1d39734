"""FHIR R4 REST routes under ``/fhir/R4`` (read and search; create and update of
ServiceRequest; R4 3.1.0 RESTful API).

Every route declares one :class:`Permit`. Study-bearing resources apply the caller's data
scope like DICOMweb (:func:`cloudfilm.dicomweb.router.scope_of`): a study outside it is
absent (404 on read, left out of searches), a patient is visible through a visible study,
an order (ServiceRequest) and its visit (Encounter) through a visible study of the order.
Errors are OperationOutcome resources; the guard's 401/403 become one too when the client
asks for ``application/fhir+json`` (FHIR clients do), and keep the guard's JSON otherwise.
The audit middleware records every request; routes only say what was read.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, cast
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.routing import APIRoute
from sqlalchemy import ColumnElement, Select, exists, false, func, or_, select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.matching import QueryError, condition, fold, study_has_modality
from cloudfilm.archive.models import Patient, Series, Study
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.export import fhir_audit_event
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.guard import AuthError, Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import NotFound
from cloudfilm.fhir import mapping, requests
from cloudfilm.fhir.params import (
    FHIRError,
    Paging,
    any_of,
    da_condition,
    instant_condition,
    invalid,
    paging,
    parse_date,
    parse_token,
    reference_id,
)
from cloudfilm.httpaudit import note
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.models import PersonIdentifier
from cloudfilm.orders import service as orders
from cloudfilm.orders.models import Encounter, ImagingOrder

DEFAULT_COUNT = 20
"""Entries per page when the client sends no ``_count``."""
MAX_COUNT = 200
"""The most entries one page holds, whatever ``_count`` asks for."""

_WIRE_ERRORS: dict[str, tuple[int, str]] = {
    "not_signed_in": (401, "login"),
    "invalid_token": (401, "login"),
    "invalid_session": (401, "login"),
    "session_expired": (401, "expired"),
}


def _respond(resource: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(resource), status_code=status, media_type=mapping.FHIR_JSON)


def _wants_fhir(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "fhir+json" in accept or "json+fhir" in accept


def _outcome(status: int, code: str, diagnostics: str) -> Response:
    severity = "error" if status < 500 else "fatal"
    return _respond(mapping.operation_outcome(severity, code, diagnostics), status)


class FHIRRoute(APIRoute):
    """Renders what goes wrong in a FHIR route (parameters, lookups, the guard) as an
    OperationOutcome, leaving the rest of the application's error bodies alone."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def fhir_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except FHIRError as exc:
                return _outcome(exc.status, exc.code, exc.diagnostics)
            except QueryError as exc:
                return _outcome(400, "invalid", str(exc))
            except NotFound as exc:
                return _outcome(404, "not-found", str(exc))
            except AuthError as exc:
                if not _wants_fhir(request):
                    raise  # the app's handler: {"error": ..., "message": ...}
                status, code = exc.status, "forbidden" if exc.status == 403 else "login"
                status, code = _WIRE_ERRORS.get(exc.code, (status, code))
                response = _outcome(status, code, exc.message)
                response.headers["Cache-Control"] = "no-store"
                if status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="cloudfilm"'
                return response

        return fhir_handler


router = APIRouter(prefix="/fhir/R4", tags=["FHIR R4"], route_class=FHIRRoute)
Searcher = Annotated[Principal, Depends(Permit(Permission.STUDY_SEARCH))]
Reader = Annotated[Principal, Depends(Permit(Permission.STUDY_READ))]
Auditor = Annotated[Principal, Depends(Permit(Permission.AUDIT_READ))]
SignedIn = Annotated[Principal, Depends(Permit.signed_in())]

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"content": {mapping.FHIR_JSON: {}}},
    400: {"description": "bad search parameter (OperationOutcome)"},
    401: {"description": "no or invalid credentials"},
    403: {"description": "not permitted"},
}
_READ_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"description": "no such resource (OperationOutcome)"},
}


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def fhir_base(request: Request) -> str:
    public = _archive(request).settings.http.public_url
    return (public or str(request.base_url)).rstrip("/") + "/fhir/R4"


def _dicomweb_base(request: Request) -> str:
    public = _archive(request).settings.http.public_url
    return (public or str(request.base_url)).rstrip("/") + "/dicom-web"


def _scope(principal: Principal) -> ColumnElement[bool] | None:
    if not principal.authenticated:  # the route's Permit let nobody through unauthorised
        raise RuntimeError("a study was addressed before the caller was authorised")
    return principal.study_scope


# ------------------------------------------------------------------ parameters

_RESULT_PARAMS = frozenset({"_count", "_offset", "_format", "_pretty"})


def _parameters(request: Request, allowed: set[str]) -> dict[str, list[str]]:
    """The query's parameters by name (``name:contains`` → ``name``); an unknown one is
    refused, so that a typo never widens a search silently."""
    found: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        name = key.removesuffix(":contains")
        if name not in allowed and name not in _RESULT_PARAMS:
            supported = ", ".join(sorted(allowed | {"_count"}))
            raise invalid(f"unknown search parameter {key!r}; supported: {supported}")
        if name == "_format" and value not in ("json", "application/fhir+json", "application/json"):
            raise FHIRError(406, "not-supported", "only JSON is offered (_format=json)")
        found.setdefault(name, []).append(value)
    return found


def _values(raw: str) -> list[str]:
    """A parameter's comma-separated alternatives (R4 3.1.1.5.1; ``\\,`` is a comma)."""
    parts = [p.replace("\\,", ",") for p in raw.replace("\\,", "\x00").split(",")]
    return [p.replace("\x00", ",") for p in parts if p]


def _each(
    values: dict[str, list[str]], name: str, build: Callable[[str], ColumnElement[bool]]
) -> list[ColumnElement[bool]]:
    """One condition per occurrence of ``name`` (AND), each an OR of its alternatives."""
    conditions = []
    for raw in values.get(name, []):
        alternatives: list[ColumnElement[bool]] = [build(v) for v in _values(raw)]
        if not alternatives:
            raise invalid(f"{name}: empty value")
        conditions.append(any_of(alternatives))
    return conditions


def _page_bundle(
    request: Request,
    resource_type: str,
    page: Paging,
    total: int,
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    base = fhir_base(request)
    kept = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_offset",)]

    def link(offset: int) -> str:
        params = [*kept, ("_offset", str(offset))] if offset else kept
        query = urlencode(params)
        return f"{base}/{resource_type}" + (f"?{query}" if query else "")

    links = [{"relation": "self", "url": link(page.offset)}]
    if page.offset + page.count < total and page.count > 0:
        links.append({"relation": "next", "url": link(page.offset + page.count)})
    if page.offset > 0:
        links.append({"relation": "previous", "url": link(max(0, page.offset - page.count))})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    }
    if entries:  # FHIR JSON has no empty arrays (R4 2.6.2)
        bundle["entry"] = entries
    return bundle


def _entry(base: str, resource: dict[str, Any], mode: str = "match") -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


def _run(
    request: Request, stmt: Select[Any], order: list[Any], page: Paging
) -> tuple[int, list[Any]]:
    with _archive(request).db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows: list[Any] = []
        if page.count:
            rows = list(
                session.scalars(stmt.order_by(*order).limit(page.count).offset(page.offset))
            )
            session.expunge_all()
    return total, rows


# ------------------------------------------------------------------ metadata

_SEARCH_PARAMS: dict[str, list[tuple[str, str, str]]] = {
    "Patient": [
        ("_id", "token", "Logical id"),
        ("_lastUpdated", "date", "When the index last changed the patient"),
        ("identifier", "token", "PatientID, optionally system|value"),
        ("name", "string", "Any part of a name: letters, Chinese characters, pinyin, initials"),
        ("birthdate", "date", "Birth date, with eq/ne/gt/lt/ge/le prefixes"),
        ("gender", "token", "male | female | other | unknown"),
    ],
    "ImagingStudy": [
        ("_id", "token", "Logical id (the Study Instance UID)"),
        ("_lastUpdated", "date", "When the index last changed the study"),
        ("identifier", "token", "Accession number or Study Instance UID (urn:dicom:uid)"),
        ("patient", "reference", "The patient (Patient/id)"),
        ("subject", "reference", "The patient (Patient/id)"),
        ("started", "date", "Study date, with prefixes"),
        ("modality", "token", "A modality of the study (DCM code)"),
        ("patient.identifier", "token", "The patient's PatientID (chained, system|value)"),
    ],
    "ServiceRequest": [
        ("_id", "token", "Logical id"),
        ("_lastUpdated", "date", "When the order last changed"),
        ("identifier", "token", "Placer, filler or accession number (system|value)"),
        ("patient", "reference", "The patient (Patient/id)"),
        ("subject", "reference", "The patient (Patient/id)"),
        ("status", "token", "active | completed | revoked"),
        ("authored", "date", "When the order was placed, with prefixes"),
        ("code", "token", "The requested procedure (system|code)"),
        ("encounter", "reference", "The visit (Encounter/id)"),
    ],
    "DiagnosticReport": [
        ("_id", "token", "Logical id"),
        ("identifier", "token", "Accession number (urn:cloudfilm:accession|value)"),
        ("patient", "reference", "The patient (Patient/id)"),
        ("subject", "reference", "The patient (Patient/id)"),
        ("status", "token", "preliminary | final | corrected | entered-in-error"),
        ("issued", "date", "When the report was approved, with prefixes"),
        ("based-on", "reference", "The order (ServiceRequest/id)"),
    ],
    "DocumentReference": [
        ("_id", "token", "Logical id"),
        ("identifier", "token", "The document's unique id (urn:oid:...)"),
        ("patient", "reference", "The patient (Patient/id)"),
        ("subject", "reference", "The patient (Patient/id)"),
        ("status", "token", "current | superseded"),
        ("date", "date", "When the document was registered, with prefixes"),
        ("related", "reference", "The report (DiagnosticReport/id)"),
    ],
    "Encounter": [
        ("_id", "token", "Logical id"),
        ("identifier", "token", "Visit number (PV1-19)"),
        ("patient", "reference", "The patient (Patient/id)"),
        ("subject", "reference", "The patient (Patient/id)"),
        ("date", "date", "Admission (visit start), with prefixes"),
        ("class", "token", "AMB (outpatient, physical exam) | IMP | EMER"),
    ],
    "AuditEvent": [
        ("_id", "token", "Logical id"),
        ("date", "date", "When the event was recorded, with prefixes"),
        ("agent", "reference", "Who acted (user name, client or AE title)"),
        ("patient", "reference", "The patient (Patient/id or the PatientID)"),
        ("entity-id", "token", "Object identifier: study UID, object id, request id"),
    ],
}


def capability_statement(request: Request) -> dict[str, Any]:
    from cloudfilm import __version__

    resources = []
    for kind, params in _SEARCH_PARAMS.items():
        entry: dict[str, Any] = {
            "type": kind,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": name, "type": kind_, "documentation": doc} for name, kind_, doc in params
            ],
        }
        if kind == "ImagingStudy":
            entry["searchInclude"] = ["ImagingStudy:subject", "ImagingStudy:patient"]
        if kind in ("ServiceRequest", "DiagnosticReport"):
            entry["interaction"] += [{"code": "create"}, {"code": "update"}]
            entry["updateCreate"] = False
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": mapping.instant(archive_clock_now(request)),
        "publisher": "Cloud Film 云胶片",
        "kind": "instance",
        "software": {"name": "Cloud Film", "version": __version__},
        "implementation": {"description": "Cloud Film 云胶片 FHIR R4", "url": fhir_base(request)},
        "fhirVersion": mapping.FHIR_VERSION,
        "format": ["json", mapping.FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": "读取与检索；检查申请与诊断报告可创建与更新。Read and "
                "search-type; ServiceRequest and DiagnosticReport also create and update.",
                "security": {
                    "description": "Bearer token of an integration client (POST /api/oauth/token)"
                    " or a signed-in session; data scopes of the caller's roles apply."
                },
                "resource": [*resources, {"type": "Binary", "interaction": [{"code": "read"}]}],
            }
        ],
    }


def archive_clock_now(request: Request) -> Any:
    return request.app.state.accounts.clock.now()


@router.get(
    "/metadata",
    summary="CapabilityStatement: what this FHIR server offers",
    responses={200: {"content": {mapping.FHIR_JSON: {}}}},
    dependencies=[Depends(Permit.public_route())],
)
def metadata(request: Request) -> Response:
    return _respond(capability_statement(request))


# ------------------------------------------------------------------ Patient


def _visible_patient(scope: ColumnElement[bool] | None) -> ColumnElement[bool] | None:
    if scope is None:
        return None
    return exists(select(Study.id).where(Study.patient_pk == Patient.id, scope))


def _row_id(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 18:
        raise FHIRError(404, "not-found", f"no {name} {value[:64]!r}")
    return int(value)


def _patient_identifier(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    match = Patient.patient_id == token.code
    if token.system is None or token.system == "":
        return match
    issuer = mapping.issuer_of(token.system)
    if issuer is None:  # a system we do not assign: the issuer itself may be named so
        return (match) & (Patient.issuer_of_patient_id == token.system)
    return match & (Patient.issuer_of_patient_id == issuer)


def _patient_name(raw: str) -> ColumnElement[bool]:
    """Case-insensitive contains over every name group and the pinyin, plus the archive's
    fuzzy name matching (pinyin initials ``wxd``, given name first)."""
    fuzzy = condition("PatientName", raw, fuzzy=True)
    needle = "%" + raw.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    folded = fold(raw)
    alternatives: list[ColumnElement[bool]] = [
        func.lower(Patient.patient_name).like(needle, escape="\\")
    ]
    if folded:
        pinyin = "%" + folded.replace("%", "\\%").replace("_", "\\_") + "%"
        alternatives.append(
            func.replace(Patient.patient_name_pinyin, "^", "").like(pinyin, escape="\\")
        )
    if fuzzy is not None:
        alternatives.append(fuzzy)
    return or_(*alternatives)


_SEX = {"male": "M", "female": "F", "other": "O"}


def _gender(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    if token.code == "unknown":
        return Patient.patient_sex.not_in(["M", "F", "O"])
    if token.code not in _SEX:
        raise invalid(f"gender: {raw!r} is not one of male, female, other, unknown")
    return Patient.patient_sex == _SEX[token.code]


def _patient_conditions(values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    conditions = _each(values, "_id", lambda v: Patient.id == _id_or_none(v))
    conditions += _each(
        values,
        "_lastUpdated",
        lambda v: instant_condition(Patient.updated_at, parse_date("_lastUpdated", v)),
    )
    conditions += _each(values, "identifier", _patient_identifier)
    conditions += _each(values, "name", _patient_name)
    conditions += _each(
        values,
        "birthdate",
        lambda v: da_condition(Patient.patient_birth_date, parse_date("birthdate", v)),
    )
    conditions += _each(values, "gender", _gender)
    return conditions


def _id_or_none(value: str) -> int:
    return int(value) if value.isdigit() and len(value) <= 18 else -1


@router.get("/Patient", summary="Search patients", responses=_ERRORS)
def search_patients(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["Patient"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(Patient).where(*_patient_conditions(values))
    if (visible := _visible_patient(_scope(caller))) is not None:
        stmt = stmt.where(visible)
    total, rows = _run(request, stmt, [Patient.id], page)
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "Patient")
    base = fhir_base(request)
    entries = [_entry(base, mapping.patient(row)) for row in rows]
    return _respond(_page_bundle(request, "Patient", page, total, entries))


@router.get("/Patient/{id}", summary="Read a patient", responses=_READ_ERRORS)
def read_patient(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    stmt = select(Patient).where(Patient.id == _row_id("Patient", id))
    if (visible := _visible_patient(_scope(caller))) is not None:
        stmt = stmt.where(visible)
    with _archive(request).db.read_session() as session:
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise FHIRError(404, "not-found", f"no Patient {id!r} in this archive")
        resource = mapping.patient(row)
        note(
            request,
            AuditEventType.QUERY,
            AuditAction.READ,
            "fhir",
            f"Patient/{id}",
            patient_id=row.patient_id or None,
        )
    return _respond(resource)


# ------------------------------------------------------------------ ImagingStudy


def _study_identifier(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    uid = token.code.removeprefix("urn:oid:")
    if token.system == mapping.DICOM_UID_SYSTEM:
        return Study.study_instance_uid == uid
    if token.system == mapping.ACCESSION_SYSTEM:
        return Study.accession_number == token.code
    if token.system:  # another system's accession numbers are not in the index
        return Study.accession_number == token.code
    return or_(Study.accession_number == token.code, Study.study_instance_uid == uid)


def _subject_of(name: str) -> Callable[[str], ColumnElement[bool]]:
    def build(raw: str) -> ColumnElement[bool]:
        return Study.patient_pk == _id_or_none(reference_id(name, raw, "Patient"))

    return build


def _modality(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    if token.system not in (None, "", mapping.DCM):
        raise invalid(f"modality: system {token.system!r} unknown; use {mapping.DCM}")
    return study_has_modality([token.code.upper()])


def _study_conditions(values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    conditions = _each(values, "_id", lambda v: Study.study_instance_uid == v)
    conditions += _each(
        values,
        "_lastUpdated",
        lambda v: instant_condition(Study.updated_at, parse_date("_lastUpdated", v)),
    )
    conditions += _each(values, "identifier", _study_identifier)
    for name in ("patient", "subject"):
        conditions += _each(values, name, _subject_of(name))
    conditions += _each(
        values, "started", lambda v: da_condition(Study.study_date, parse_date("started", v))
    )
    conditions += _each(values, "modality", _modality)
    conditions += _each(
        values,
        "patient.identifier",
        lambda v: Study.patient_pk.in_(select(Patient.id).where(_patient_identifier(v))),
    )
    return conditions


def _studies_as_fhir(request: Request, studies: list[Study]) -> list[dict[str, Any]]:
    if not studies:
        return []
    by_study: dict[int, list[Series]] = {s.id: [] for s in studies}
    with _archive(request).db.read_session() as session:
        for row in session.scalars(
            select(Series)
            .where(Series.study_pk.in_(list(by_study)))
            .order_by(Series.series_number, Series.id)
        ):
            by_study[row.study_pk].append(row)
        ordered = {
            study_pk: [o.id for o in found]
            for study_pk, found in orders.orders_by_study(
                session=session, study_ids=list(by_study)
            ).items()
        }
        session.expunge_all()
    dicomweb = _dicomweb_base(request)
    return [mapping.imaging_study(s, by_study[s.id], dicomweb, ordered.get(s.id)) for s in studies]


_INCLUDES = {"ImagingStudy:subject", "ImagingStudy:patient", "ImagingStudy:subject:Patient"}


@router.get("/ImagingStudy", summary="Search imaging studies", responses=_ERRORS)
def search_studies(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["ImagingStudy"]} | {"_include"})
    includes = values.get("_include", [])
    if unknown := [i for i in includes if i not in _INCLUDES]:
        raise invalid(f"_include: {unknown[0]!r} not supported; use ImagingStudy:subject")
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(Study).where(*_study_conditions(values))
    if (scope := _scope(caller)) is not None:
        stmt = stmt.where(scope)
    order = [Study.study_date.desc(), Study.study_time.desc(), Study.id]
    total, studies = _run(request, stmt, order, page)
    base = fhir_base(request)
    entries = [_entry(base, r) for r in _studies_as_fhir(request, studies)]
    if includes and studies:
        with _archive(request).db.read_session() as session:
            patients = session.scalars(
                select(Patient)
                .where(Patient.id.in_({s.patient_pk for s in studies}))
                .order_by(Patient.id)
            ).all()
            entries += [_entry(base, mapping.patient(p), "include") for p in patients]
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "ImagingStudy")
    return _respond(_page_bundle(request, "ImagingStudy", page, total, entries))


@router.get("/ImagingStudy/{id}", summary="Read an imaging study", responses=_READ_ERRORS)
def read_study(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    stmt = select(Study).where(Study.study_instance_uid == id)
    if (scope := _scope(caller)) is not None:
        stmt = stmt.where(scope)
    with _archive(request).db.read_session() as session:
        study = session.scalars(stmt).one_or_none()
        if study is None:
            raise FHIRError(404, "not-found", f"no ImagingStudy {id[:64]!r} in this archive")
        patient_id = study.patient.patient_id
        session.expunge_all()
    note(
        request,
        AuditEventType.QUERY,
        AuditAction.READ,
        "fhir",
        f"ImagingStudy/{id}",
        patient_id=patient_id or None,
        study_instance_uid=id,
    )
    return _respond(_studies_as_fhir(request, [study])[0])


# ------------------------------------------------------------------ AuditEvent

_AUDIT = AuditEvent.__table__.c


def _audit_patient(request: Request, raw: str) -> ColumnElement[bool]:
    value = reference_id("patient", raw, "Patient")
    candidates = [value]
    if raw.startswith("Patient/") or "/" in raw or value.isdigit():
        with _archive(request).db.read_session() as session:
            found = session.scalar(
                select(Patient.patient_id).where(Patient.id == _id_or_none(value))
            )
        if found:
            candidates.append(found)
        if "/" in raw:
            candidates = candidates[1:] or ["\x00"]
    return _AUDIT.patient_id.in_(candidates)


_AGENT_TYPES = ("Practitioner/", "PractitionerRole/", "Device/", "Organization/", "Patient/")


def _agent_id(raw: str) -> str:
    """``Practitioner/zhang`` or ``zhang`` → ``zhang`` (the audit trail's actor id)."""
    for prefix in _AGENT_TYPES:
        if raw.startswith(prefix):
            return raw[len(prefix) :]
    return raw


def _entity(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    uid = token.code.removeprefix("urn:oid:")
    return or_(
        _AUDIT.object_id == token.code,
        _AUDIT.study_instance_uid == uid,
        _AUDIT.request_id == token.code,
    )


@router.get("/AuditEvent", summary="Search the audit trail", responses=_ERRORS)
def search_audit(request: Request, _caller: Auditor) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["AuditEvent"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    conditions = _each(values, "_id", lambda v: _AUDIT.id == _id_or_none(v))
    conditions += _each(
        values, "date", lambda v: instant_condition(_AUDIT.occurred_at, parse_date("date", v))
    )
    conditions += _each(
        values,
        "agent",
        lambda v: _AUDIT.actor_id == _agent_id(v),
    )
    conditions += _each(values, "patient", lambda v: _audit_patient(request, v))
    conditions += _each(values, "entity-id", _entity)
    stmt = select(AuditEvent.__table__).where(*conditions)
    with _archive(request).db.read_connection() as conn:
        total = int(conn.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows = (
            list(
                conn.execute(stmt.order_by(_AUDIT.seq.desc()).limit(page.count).offset(page.offset))
            )
            if page.count
            else []
        )
    note(request, AuditEventType.AUDIT_LOG_USED, AuditAction.READ, "audit", "fhir")
    observer = _archive(request).settings.dimse.ae_title
    base = fhir_base(request)
    entries = [_entry(base, fhir_audit_event(row, observer=observer)) for row in rows]
    return _respond(_page_bundle(request, "AuditEvent", page, total, entries))


@router.get("/AuditEvent/{id}", summary="Read an audit record", responses=_READ_ERRORS)
def read_audit(id: str, request: Request, _caller: Auditor) -> Response:  # noqa: A002
    with _archive(request).db.read_connection() as conn:
        row = conn.execute(
            select(AuditEvent.__table__).where(_AUDIT.id == _row_id("AuditEvent", id))
        ).one_or_none()
    if row is None:
        raise FHIRError(404, "not-found", f"no AuditEvent {id!r}")
    note(request, AuditEventType.AUDIT_LOG_USED, AuditAction.READ, "audit", id)
    return _respond(fhir_audit_event(row, observer=_archive(request).settings.dimse.ae_title))


# ------------------------------------------------------------------ ServiceRequest

_ORDER = ImagingOrder
Storer = Annotated[Principal, Depends(Permit(Permission.STUDY_STORE))]
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_READ_ERRORS,
    409: {"description": "another order has this placer number (OperationOutcome)"},
    415: {"description": "not application/fhir+json"},
    422: {"description": "not what an imaging order needs (OperationOutcome)"},
}
MAX_RESOURCE_BYTES = 1_000_000
"""The largest ServiceRequest accepted."""


def _order_identifier(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    columns = {
        requests.PLACER_SYSTEM: [_ORDER.placer_order_number],
        requests.FILLER_SYSTEM: [_ORDER.filler_order_number],
        mapping.ACCESSION_SYSTEM: [_ORDER.accession_number],
    }.get(
        token.system or "",
        [_ORDER.placer_order_number, _ORDER.filler_order_number, _ORDER.accession_number],
    )
    if not token.code:
        raise invalid("identifier: empty value")
    return or_(*(column == token.code for column in columns))


def _patient_rows(request: Request, raw: str, name: str) -> list[tuple[int, str, str]]:
    """The archive patient a ``patient``/``subject`` parameter names: (row id, PatientID,
    issuer), with the MPI person's id (or -1)."""
    pk = _id_or_none(reference_id(name, raw, "Patient"))
    with _archive(request).db.read_session() as session:
        row = session.get(Patient, pk) if pk >= 0 else None
        if row is None:
            return []
        person = mpi.person_of_patient(
            session=session, patient_id=row.patient_id, issuer=row.issuer_of_patient_id
        )
        return [(person.id if person is not None else -1, row.patient_id,
                 row.issuer_of_patient_id)]  # fmt: skip


def _order_patient(request: Request, name: str) -> Callable[[str], ColumnElement[bool]]:
    def build(raw: str) -> ColumnElement[bool]:
        found = _patient_rows(request, raw, name)
        if not found:
            return false()
        person_id, patient_id, issuer = found[0]
        same = _ORDER.patient_id == patient_id
        by_id = same & (_ORDER.patient_authority == issuer) if issuer else same
        return or_(_ORDER.person_id == person_id, by_id)

    return build


def _fhir_status(raw: str) -> ColumnElement[bool]:
    code = parse_token(raw).code
    ours = [k for k, v in requests.FHIR_STATUS.items() if v == code]
    if code not in ("draft", "active", "on-hold", "revoked", "completed", "entered-in-error",
                    "unknown"):  # fmt: skip
        raise invalid(f"status: {raw!r} is not a request-status code")
    return _ORDER.status.in_(ours) if ours else false()


def _procedure(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    match = _ORDER.procedure_code == token.code
    if token.system is None:
        return match
    if token.system in ("", requests.PROCEDURE_SYSTEM):
        return match & (_ORDER.procedure_system == "")
    return match & (_ORDER.procedure_system == token.system)


def _order_conditions(request: Request, values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    conditions = _each(values, "_id", lambda v: _ORDER.id == _id_or_none(v))
    conditions += _each(
        values,
        "_lastUpdated",
        lambda v: instant_condition(_ORDER.updated_at, parse_date("_lastUpdated", v)),
    )
    conditions += _each(values, "identifier", _order_identifier)
    for name in ("patient", "subject"):
        conditions += _each(values, name, _order_patient(request, name))
    conditions += _each(values, "status", _fhir_status)
    conditions += _each(
        values,
        "authored",
        lambda v: instant_condition(
            func.coalesce(_ORDER.authored_at, _ORDER.created_at), parse_date("authored", v)
        ),
    )
    conditions += _each(values, "code", _procedure)
    conditions += _each(
        values,
        "encounter",
        lambda v: _ORDER.encounter_id == _id_or_none(reference_id("encounter", v, "Encounter")),
    )
    return conditions


def _subjects(session: Any, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Archive patient row ids of (PatientID, authority) pairs: the same issuer, else a
    patient indexed without issuer."""
    ids = {value for value, _ in pairs if value}
    if not ids:
        return {}
    rows = session.execute(
        select(Patient.id, Patient.patient_id, Patient.issuer_of_patient_id)
        .where(Patient.patient_id.in_(ids))
        .order_by(Patient.id)
    ).all()
    found: dict[tuple[str, str], int] = {}
    for authority_first in (True, False):
        for pk, value, issuer in rows:
            for pair in pairs:
                if pair in found or pair[0] != value:
                    continue
                if (authority_first and issuer == pair[1]) or (not authority_first and not issuer):
                    found[pair] = pk
    return found


def _orders_as_fhir(session: Any, orders_: list[ImagingOrder]) -> list[dict[str, Any]]:
    pairs = {(o.patient_id, o.patient_authority) for o in orders_}
    known = _subjects(session, pairs)
    return [
        requests.service_request(
            o,
            requests.subject(
                known.get((o.patient_id, o.patient_authority)), o.patient_id, o.patient_authority
            )
            if o.patient_id
            else None,
        )
        for o in orders_
    ]


def _visible_orders(caller: Principal) -> ColumnElement[bool] | None:
    return orders.visible_order(_scope(caller))


@router.get("/ServiceRequest", summary="Search imaging orders", responses=_ERRORS)
def search_orders(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["ServiceRequest"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(ImagingOrder).where(*_order_conditions(request, values))
    if (visible := _visible_orders(caller)) is not None:
        stmt = stmt.where(visible)
    order: list[Any] = [
        func.coalesce(_ORDER.authored_at, _ORDER.created_at).desc(),
        _ORDER.id.desc(),
    ]
    with _archive(request).db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows = (
            list(session.scalars(stmt.order_by(*order).limit(page.count).offset(page.offset)))
            if page.count
            else []
        )
        resources = _orders_as_fhir(session, rows)
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "ServiceRequest")
    base = fhir_base(request)
    entries = [_entry(base, r) for r in resources]
    return _respond(_page_bundle(request, "ServiceRequest", page, total, entries))


def _one_order(session: Any, id: str, caller: Principal) -> ImagingOrder:  # noqa: A002
    stmt = select(ImagingOrder).where(_ORDER.id == _row_id("ServiceRequest", id))
    if (visible := _visible_orders(caller)) is not None:
        stmt = stmt.where(visible)
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise FHIRError(404, "not-found", f"no ServiceRequest {id[:64]!r} in this archive")
    return cast(ImagingOrder, row)


@router.get("/ServiceRequest/{id}", summary="Read an imaging order", responses=_READ_ERRORS)
def read_order(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    with _archive(request).db.read_session() as session:
        row = _one_order(session, id, caller)
        [resource] = _orders_as_fhir(session, [row])
        patient_id = row.patient_id
    note(request, AuditEventType.QUERY, AuditAction.READ, "fhir", f"ServiceRequest/{id}",
         patient_id=patient_id or None)  # fmt: skip
    return _respond(resource)


async def _resource_body(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (mapping.FHIR_JSON, "application/json", "application/json+fhir"):
        raise FHIRError(415, "not-supported", "send the resource as application/fhir+json")
    raw = await request.body()
    if len(raw) > MAX_RESOURCE_BYTES:
        raise FHIRError(413, "too-long", f"resource larger than {MAX_RESOURCE_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FHIRError(400, "structure", f"the body is not JSON ({exc.msg})") from exc


def _subject_person(session: Any, pushed: requests.Pushed, source: str) -> tuple[int, str, str]:
    """The MPI person a pushed order is for, created as ADT would: (person id,
    PatientID, authority)."""
    if pushed.patient_ref is not None:
        pk = _id_or_none(pushed.patient_ref.removeprefix("Patient/"))
        row = session.get(Patient, pk) if pk >= 0 else None
        if row is None:
            raise FHIRError(422, "not-found", f"subject: no {pushed.patient_ref} here")
        authority, value = row.issuer_of_patient_id, row.patient_id
    else:
        assert pushed.patient_identifier is not None
        authority, value = pushed.patient_identifier
    try:
        ident = mpi.identifier("PI", authority, value)
        person = mpi.register(session=session, identifiers=[ident],
                              demographics=mpi.Demographics(), source=source)  # fmt: skip
    except mpi.InvalidIdentifier as exc:
        raise FHIRError(422, "value", f"subject: {exc}") from exc
    return person.id, ident.value, ident.authority


def _apply_pushed(
    request: Request,
    caller: Principal,
    body: Any,
    id: str | None,  # noqa: A002
) -> tuple[dict[str, Any], int]:
    pushed = requests.read_service_request(body)
    if id is not None and body.get("id") != id:
        raise FHIRError(400, "invalid", f"id: the body's id must be {id!r} (the URL's)")
    actor = caller.actor(request.client.host if request.client else None)
    source = f"fhir:{actor.id}"[:128]
    with _archive(request).db.session() as session:
        existing = _one_order(session, id, caller) if id is not None else None
        # On create, an order already holding the placer number (or, without one, the
        # filler number) is a conflict: the request would otherwise update it unseen.
        clash = orders.find_order(
            session=session,
            placer=pushed.data.placer_order_number,
            filler=pushed.data.filler_order_number if existing is None else None,
        )
        if clash is not None and (existing is None or clash.id != existing.id):
            number = pushed.data.placer_order_number or pushed.data.filler_order_number
            raise FHIRError(
                409,
                "duplicate",
                f"申请单号已存在 · ServiceRequest/{clash.id} has order number {number!r}; "
                "update that one (PUT)",
            )
        person_id, patient_id, authority = _subject_person(session, pushed, source)
        pushed.data.patient_id, pushed.data.patient_authority = patient_id, authority
        if pushed.encounter_ref is not None:
            visit = session.get(
                Encounter, _id_or_none(pushed.encounter_ref.removeprefix("Encounter/"))
            )
            if visit is None:
                raise FHIRError(422, "not-found", f"encounter: no {pushed.encounter_ref} here")
            pushed.data.visit_number, pushed.data.visit_type = visit.visit_number, visit.visit_type
            pushed.data.ward, pushed.data.room, pushed.data.bed = visit.ward, visit.room, visit.bed
        status = None
        if existing is None or requests.FHIR_STATUS.get(existing.status) != pushed.status:
            status = requests.ORDER_STATUS.get(pushed.status)
        row = orders.save_order(
            session=session,
            data=pushed.data,
            status=status,
            control="update" if existing is not None else "create",
            source=source,
            person_id=person_id,
            order=existing,
            forward_only=False,
        )
        if pushed.encounter_ref is not None:
            row.encounter_id = _id_or_none(pushed.encounter_ref.removeprefix("Encounter/"))
        row.scheduled_at, row.authored_at = pushed.data.scheduled_at, pushed.data.authored_at
        session.flush()
        [resource] = _orders_as_fhir(session, [row])
        order_id = row.id
    note(
        request,
        AuditEventType.HTTP_REQUEST,
        AuditAction.UPDATE if id is not None else AuditAction.CREATE,
        "fhir",
        f"ServiceRequest/{order_id}",
        patient_id=patient_id,
    )
    return resource, order_id


@router.post(
    "/ServiceRequest",
    summary="Create an imaging order (a RIS or HIS pushing it)",
    responses=_WRITE_ERRORS,
    status_code=201,
)
async def create_order(request: Request, caller: Storer) -> Response:
    body = await _resource_body(request)
    resource, order_id = await run_in_threadpool(_apply_pushed, request, caller, body, None)
    response = _respond(resource, 201)
    response.headers["Location"] = f"{fhir_base(request)}/ServiceRequest/{order_id}"
    return response


@router.put("/ServiceRequest/{id}", summary="Update an imaging order", responses=_WRITE_ERRORS)
async def update_order(id: str, request: Request, caller: Storer) -> Response:  # noqa: A002
    body = await _resource_body(request)
    resource, _ = await run_in_threadpool(_apply_pushed, request, caller, body, id)
    return _respond(resource)


# ------------------------------------------------------------------ Encounter

_VISIT = Encounter


def _visit_identifier(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    if token.system not in (None, "", requests.VISIT_SYSTEM):
        return false()
    return _VISIT.visit_number == token.code


def _visit_patient(request: Request, name: str) -> Callable[[str], ColumnElement[bool]]:
    def build(raw: str) -> ColumnElement[bool]:
        found = _patient_rows(request, raw, name)
        return _VISIT.person_id == found[0][0] if found else false()

    return build


def _visit_class(raw: str) -> ColumnElement[bool]:
    token = parse_token(raw)
    if token.system not in (None, "", requests.ACT_CODE):
        raise invalid(f"class: system {token.system!r} unknown; use {requests.ACT_CODE}")
    if token.code not in requests.CLASS_VISIT_TYPES:
        raise invalid(f"class: {token.code!r} is not one of AMB, IMP, EMER")
    return _VISIT.visit_type.in_(requests.CLASS_VISIT_TYPES[token.code])


def _visit_conditions(request: Request, values: dict[str, list[str]]) -> list[ColumnElement[bool]]:
    conditions = _each(values, "_id", lambda v: _VISIT.id == _id_or_none(v))
    conditions += _each(values, "identifier", _visit_identifier)
    for name in ("patient", "subject"):
        conditions += _each(values, name, _visit_patient(request, name))
    conditions += _each(
        values,
        "date",
        lambda v: instant_condition(
            func.coalesce(_VISIT.admitted_at, _VISIT.created_at), parse_date("date", v)
        ),
    )
    conditions += _each(values, "class", _visit_class)
    return conditions


def _visible_visits(caller: Principal) -> ColumnElement[bool] | None:
    visible = _visible_orders(caller)
    if visible is None:
        return None
    return exists(select(_ORDER.id).where(_ORDER.encounter_id == _VISIT.id, visible))


def _visits_as_fhir(session: Any, rows: list[Encounter]) -> list[dict[str, Any]]:
    persons = {r.person_id for r in rows if r.person_id is not None}
    held: dict[int, tuple[str, str]] = {}
    if persons:
        for person_id, value, authority in session.execute(
            select(PersonIdentifier.person_id, PersonIdentifier.value, PersonIdentifier.authority)
            .where(
                PersonIdentifier.person_id.in_(persons),
                PersonIdentifier.id_type == "PI",
                PersonIdentifier.value.is_not(None),
            )
            .order_by(PersonIdentifier.id)
        ):
            held.setdefault(person_id, (value, authority))
    known = _subjects(session, set(held.values()))
    resources = []
    for row in rows:
        pair = held.get(row.person_id) if row.person_id is not None else None
        patient = requests.subject(known.get(pair), *pair) if pair is not None else None
        resources.append(requests.encounter(row, patient))
    return resources


@router.get("/Encounter", summary="Search visits (encounters)", responses=_ERRORS)
def search_visits(request: Request, caller: Searcher) -> Response:
    values = _parameters(request, {p[0] for p in _SEARCH_PARAMS["Encounter"]})
    page = paging(values, default=DEFAULT_COUNT, maximum=MAX_COUNT)
    stmt = select(Encounter).where(*_visit_conditions(request, values))
    if (visible := _visible_visits(caller)) is not None:
        stmt = stmt.where(visible)
    order: list[Any] = [
        func.coalesce(_VISIT.admitted_at, _VISIT.created_at).desc(),
        _VISIT.id.desc(),
    ]
    with _archive(request).db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        rows = (
            list(session.scalars(stmt.order_by(*order).limit(page.count).offset(page.offset)))
            if page.count
            else []
        )
        resources = _visits_as_fhir(session, rows)
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "fhir", "Encounter")
    base = fhir_base(request)
    entries = [_entry(base, r) for r in resources]
    return _respond(_page_bundle(request, "Encounter", page, total, entries))


@router.get("/Encounter/{id}", summary="Read a visit (encounter)", responses=_READ_ERRORS)
def read_visit(id: str, request: Request, caller: Reader) -> Response:  # noqa: A002
    stmt = select(Encounter).where(_VISIT.id == _row_id("Encounter", id))
    if (visible := _visible_visits(caller)) is not None:
        stmt = stmt.where(visible)
    with _archive(request).db.read_session() as session:
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise FHIRError(404, "not-found", f"no Encounter {id[:64]!r} in this archive")
        [resource] = _visits_as_fhir(session, [row])
    note(request, AuditEventType.QUERY, AuditAction.READ, "fhir", f"Encounter/{id}")
    return _respond(resource)


# ------------------------------------------------------------------ anything else

_OFFERED = ", ".join(["metadata", *_SEARCH_PARAMS])


@router.get(
    "/{resource_type}",
    summary="A resource type this server does not offer (yet)",
    responses={404: {"description": "not supported (OperationOutcome)"}},
    include_in_schema=False,
)
def unsupported_type(resource_type: str, _caller: SignedIn) -> Response:
    raise FHIRError(
        404, "not-supported", f"{resource_type[:64]!r} is not offered here; offered: {_OFFERED}"
    )


@router.get(
    "/{resource_type}/{id}",
    summary="A resource type this server does not offer (yet)",
    responses={404: {"description": "not supported (OperationOutcome)"}},
    include_in_schema=False,
)
def unsupported_read(resource_type: str, id: str, _caller: SignedIn) -> Response:  # noqa: A002
    del id
    return unsupported_type(resource_type, _caller)
