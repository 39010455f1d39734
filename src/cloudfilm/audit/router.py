"""The audit trail over HTTP (``/api/audit``): search, view, verify, export.

Reading the trail needs ``audit:read``; taking it away (CSV, FHIR AuditEvent, DICOM audit
message) needs ``audit:export``. Both belong to the audit administrator. Every call is
itself audited as "audit log used" (the record keeps the query string it ran).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.export import csv_chunks, dicom_audit_message, fhir_audit_event
from cloudfilm.audit.query import AuditQuery, as_json, get_event, iter_matching, search
from cloudfilm.audit.verify import Checkpoint, snapshot, verify
from cloudfilm.auth.guard import AuthError, Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.httpaudit import note

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

router = APIRouter(prefix="/api/audit", tags=["audit"])

_Reader = Annotated[Principal, Depends(Permit(Permission.AUDIT_READ))]
_Exporter = Annotated[Principal, Depends(Permit(Permission.AUDIT_EXPORT))]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed filter"},
    401: {"description": "not signed in"},
    403: {"description": "not permitted (audit:read, or audit:export for exports)"},
}


class EventFormat(StrEnum):
    JSON = "json"
    FHIR = "fhir"
    """FHIR R4 AuditEvent (``application/fhir+json``)."""
    DICOM = "dicom"
    """DICOM audit message, PS3.15 A.5 (``application/xml``)."""


def audit_filters(
    since: Annotated[
        datetime | None, Query(description="From this time (ISO 8601; no offset: UTC).")
    ] = None,
    until: Annotated[datetime | None, Query(description="Before this time.")] = None,
    actor_id: Annotated[str | None, Query(max_length=128, description="User, AE title…")] = None,
    actor_type: Annotated[
        str | None, Query(max_length=16, description="user, dicom-ae, client, cli, …")
    ] = None,
    event_type: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[
        int | None, Query(description="0 success, 4 minor, 8 serious, 12 major failure")
    ] = None,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    source: Annotated[
        str | None, Query(max_length=255, description="Address or its start, e.g. 10.1.2.3")
    ] = None,
    request_id: Annotated[str | None, Query(max_length=64)] = None,
) -> AuditQuery:
    return AuditQuery(
        since=since,
        until=until,
        actor_id=actor_id,
        actor_type=actor_type,
        event_type=event_type,
        outcome=outcome,
        patient_id=patient_id,
        study_instance_uid=study_instance_uid,
        source=source,
        request_id=request_id,
    )


_Filters = Annotated[AuditQuery, Depends(audit_filters)]


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _used(request: Request, object_id: str) -> None:
    note(request, AuditEventType.AUDIT_LOG_USED, AuditAction.READ, "audit", object_id)


@router.get(
    "/events",
    summary="Search audit records, newest first",
    responses={**_ERRORS, 200: {"description": "a page of records and the next offset"}},
)
def search_events(
    request: Request,
    _principal: _Reader,
    filters: _Filters,
    limit: Annotated[
        int, Query(ge=1, description="Page size (capped by audit.max_results).")
    ] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    archive = _archive(request)
    limit = min(limit, archive.settings.audit.max_results)
    _used(request, "events")
    with archive.db.read_connection() as conn:
        page = search(conn, filters, limit=limit, offset=offset)
    return JSONResponse(
        {
            "events": [as_json(row) for row in page.events],
            "limit": limit,
            "offset": offset,
            "next_offset": page.next_offset,
        }
    )


@router.get(
    "/events.csv",
    summary="Export matching audit records as CSV (UTF-8 with BOM, streamed, oldest first)",
    responses={**_ERRORS, 200: {"content": {"text/csv": {}}}},
)
def export_csv(request: Request, _principal: _Exporter, filters: _Filters) -> StreamingResponse:
    archive = _archive(request)
    _used(request, "events.csv")

    def chunks() -> Iterator[bytes]:
        # The connection lives as long as the download: opened and closed by the stream.
        with archive.db.read_connection() as conn:
            yield from csv_chunks(iter_matching(conn, filters))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        chunks(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'},
    )


@router.get(
    "/events/{event_id}",
    summary="One audit record: JSON, FHIR R4 AuditEvent or DICOM audit message",
    responses={
        **_ERRORS,
        200: {"content": {"application/fhir+json": {}, "application/xml": {}}},
        404: {"description": "no such record"},
    },
)
def get_audit_event(
    request: Request,
    principal: _Reader,
    event_id: int,
    output: Annotated[
        EventFormat, Query(alias="format", description="json, fhir or dicom")
    ] = EventFormat.JSON,
) -> Response:
    if output is not EventFormat.JSON and not principal.may(Permission.AUDIT_EXPORT):
        raise AuthError(
            403,
            "forbidden",
            f"无此权限 · not permitted: {Permission.AUDIT_EXPORT.label} "
            f"({Permission.AUDIT_EXPORT.value})",
        )
    archive = _archive(request)
    _used(request, str(event_id))
    with archive.db.read_connection() as conn:
        row = get_event(conn, event_id)
    ae_title = archive.settings.dimse.ae_title
    if output is EventFormat.FHIR:
        return JSONResponse(
            fhir_audit_event(row, observer=ae_title), media_type="application/fhir+json"
        )
    if output is EventFormat.DICOM:
        return Response(
            dicom_audit_message(row, audit_source_id=ae_title), media_type="application/xml"
        )
    return JSONResponse(as_json(row))


@router.get(
    "/verify",
    summary="Check the hash chain and report the first broken link",
    responses={**_ERRORS, 200: {"description": "ok, the record count, head and any break"}},
)
def verify_chain(
    request: Request,
    _principal: _Reader,
    expect: Annotated[
        str | None,
        Query(
            pattern=r"^\d+:[0-9a-fA-F]{64}$",
            description="SEQ:HASH of a head noted earlier; also catches deleted newest records",
        ),
    ] = None,
) -> JSONResponse:
    archive = _archive(request)
    _used(request, "verify")
    with snapshot(archive.db) as conn:
        report = verify(conn, checkpoint=Checkpoint.parse(expect) if expect else None)
    broken = report.broken
    return JSONResponse(
        {
            "ok": report.ok,
            "records": report.records,
            "first_seq": report.first_seq,
            "head": f"{report.head_seq}:{report.head_hash}" if report.head_seq else None,
            "broken": None
            if broken is None
            else {
                "kind": broken.kind.value,
                "seq": broken.seq,
                "id": broken.id,
                "message": broken.message,
            },
        }
    )
