"""One audit record per HTTP request (G1), refusals and errors included.

The middleware writes the record after the response status is known. Routes enrich it
with :func:`note` (what kind of event, which object); the actor is whoever
:func:`cloudfilm.auth.guard.principal_of` found, or the anonymous caller. Every request
also gets an id (``X-Request-ID``, the caller's if it is sane), echoed in the response
and stored with the record.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STUDY_IN_PATH = re.compile(r"/studies/([0-9.]{1,64})")


@dataclass(slots=True)
class Note:
    event_type: AuditEventType
    action: AuditAction
    object_type: str | None = None
    object_id: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    detail: dict[str, Any] | None = None


def note(
    request: Request,
    event_type: AuditEventType,
    action: AuditAction,
    object_type: str | None = None,
    object_id: str | None = None,
    *,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Say what this request does, for its audit record."""
    request.state.audit_note = Note(
        event_type, action, object_type, object_id, patient_id, study_instance_uid, detail
    )


class AuditMiddleware:
    """Pure ASGI (no ``BaseHTTPMiddleware``: it would copy every response body through a
    stream): gives each request its id, adds ``X-Request-ID`` to the answer, and writes
    the audit record when the status is known, before the response starts — a caller
    never holds an answer whose access is not on record (a 204 is complete with its
    first line)."""

    def __init__(self, app: ASGIApp, archive: Archive, audited: Callable[[str], bool]) -> None:
        self.app = app
        self.archive = archive
        self.audited = audited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        audited = self.audited(request.url.path)
        status = 500
        recorded = False

        async def record() -> None:
            nonlocal recorded
            if audited and not recorded:
                recorded = True
                await run_in_threadpool(_record, self.archive, request, status)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
                await record()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            await record()  # the app failed before it answered: still on record


def _default(request: Request) -> Note:
    path = request.url.path
    if request.method in ("POST", "PUT", "PATCH"):
        event, action = AuditEventType.HTTP_REQUEST, AuditAction.CREATE
    elif request.method == "DELETE":
        event, action = AuditEventType.HTTP_REQUEST, AuditAction.DELETE
    elif path.endswith(("/studies", "/series", "/instances")):
        event, action = AuditEventType.QUERY, AuditAction.EXECUTE
    elif path.startswith(("/dicom-web/", "/wado")):
        event, action = AuditEventType.RETRIEVE, AuditAction.READ
    else:
        event, action = AuditEventType.HTTP_REQUEST, AuditAction.READ
    study = _STUDY_IN_PATH.search(path)
    return Note(event, action, "http", path[-128:], None, study.group(1) if study else None)


def _outcome(status: int) -> AuditOutcome:
    if status < 400:
        return AuditOutcome.SUCCESS
    if status in (401, 403):
        return AuditOutcome.SERIOUS_FAILURE
    return AuditOutcome.MAJOR_FAILURE if status >= 500 else AuditOutcome.MINOR_FAILURE


def _record(archive: Archive, request: Request, status: int) -> None:
    actor: Actor = getattr(request.state, "actor", None) or Actor(
        ActorType.ANONYMOUS,
        "anonymous",
        source=f"{request.client.host}:{request.client.port}" if request.client else None,
    )
    if actor.request_id is None:
        actor = Actor(actor.type, actor.id, actor.source, actor.role, request.state.request_id)
    found: Note | None = getattr(request.state, "audit_note", None)
    described = found or _default(request)
    event = described.event_type
    if status == 401:
        event = AuditEventType.AUTHENTICATION_FAILED
    elif status == 403:
        event = AuditEventType.ACCESS_DENIED
    detail = dict(described.detail or {})
    if request.url.query:
        detail["query"] = str(request.url.query)[:2000]
    detail["status"] = status
    with archive.db.engine.begin() as conn:  # Core: the ORM session costs more than the row
        audit.record(
            session=conn,
            actor=actor,
            event_type=event,
            action=described.action,
            outcome=_outcome(status),
            object_type=described.object_type or "http",
            object_id=(described.object_id or request.url.path)[-128:],
            patient_id=described.patient_id,
            study_instance_uid=described.study_instance_uid or _default(request).study_instance_uid,
            message=f"{request.method} {request.url.path[:900]} -> {status}",
            detail=detail,
        )
