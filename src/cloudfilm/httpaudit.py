"""One audit record per HTTP request (G1), refusals and errors included.

The middleware writes the record after the response status is known. Routes enrich it
with :func:`note` (what kind of event, which object); the actor is whoever
:func:`cloudfilm.auth.guard.principal_of` found, or the anonymous caller. Every request
also gets an id (``X-Request-ID``, the caller's if it is sane), echoed in the response
and stored with the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.db import Database

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
        self.writer = AuditWriter(archive.db)

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
                await self.writer.write(_fields(request, status))

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
    path = _redacted(request.url.path)
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


#: Refusals a route notes itself: kept as the record's event type on a 401/403.
_OWN_REFUSALS = frozenset({AuditEventType.KIOSK_REFUSED})


def _no_nul(text: str) -> str:
    # A path may carry %00; PostgreSQL text cannot hold NUL, and the record must be written.
    return text.replace("\x00", "\\x00")


#: Paths whose last part is a credential (a patient's entry token): recorded as the first
#: 16 hex digits of its SHA-256, which match ``entry_token.token_hash``, never as itself.
_TOKEN_IN_PATH = re.compile(r"^(/m/e/|/api/portal/entry/)([^/]+)")


def _redacted(path: str) -> str:
    return _TOKEN_IN_PATH.sub(
        lambda m: m.group(1) + "sha256:" + hashlib.sha256(m.group(2).encode()).hexdigest()[:16],
        path,
    )


def _outcome(status: int) -> AuditOutcome:
    if status < 400:
        return AuditOutcome.SUCCESS
    if status in (401, 403):
        return AuditOutcome.SERIOUS_FAILURE
    return AuditOutcome.MAJOR_FAILURE if status >= 500 else AuditOutcome.MINOR_FAILURE


def _fields(request: Request, status: int) -> dict[str, Any]:
    """The audit record of ``request`` answered with ``status`` (keyword arguments of
    :func:`cloudfilm.audit.service.record`, without the connection)."""
    actor: Actor = getattr(request.state, "actor", None) or Actor(
        ActorType.ANONYMOUS,
        "anonymous",
        source=f"{request.client.host}:{request.client.port}" if request.client else None,
    )
    if actor.request_id is None:
        actor = Actor(actor.type, actor.id, actor.source, actor.role, request.state.request_id)
    found: Note | None = getattr(request.state, "audit_note", None)
    default = _default(request)
    described = found or default
    event = described.event_type
    if event in _OWN_REFUSALS:
        pass  # the route refused on its own terms and said so (reprint not allowed, ...)
    elif status == 401:
        event = AuditEventType.AUTHENTICATION_FAILED
    elif status == 403:
        event = AuditEventType.ACCESS_DENIED
    detail = dict(described.detail or {})
    if request.url.query:
        detail["query"] = str(request.url.query)[:2000]
    detail["status"] = status
    return {
        "actor": actor,
        "event_type": event,
        "action": described.action,
        "outcome": _outcome(status),
        "object_type": described.object_type or "http",
        "object_id": _no_nul(described.object_id or _redacted(request.url.path))[-128:],
        "patient_id": described.patient_id,
        "study_instance_uid": described.study_instance_uid or default.study_instance_uid,
        "message": f"{request.method} {_no_nul(_redacted(request.url.path)[:900])} -> {status}",
        "detail": detail,
    }


_Waiting = tuple[dict[str, Any], asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class AuditWriter:
    """Appends the records of HTTP requests from one thread, with group commit.

    A request waits until its record is committed (the answer starts only then), but it
    does not take a thread of the pool, a pooled connection and a transaction of its
    own: records that arrive while a commit runs go into the next one together, on one
    connection the writer keeps. Each record is still chained one by one
    (:func:`cloudfilm.audit.service.record`), so the chain is the same as with one
    transaction per record; other processes append between two of our commits under
    the same write lock.
    """

    _BATCH = 256
    _IDLE_SECONDS = 5.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def write(self, fields: dict[str, Any]) -> None:
        """Append one record; returns when it is committed (raises what the commit raised)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((fields, loop, done))
        self._start()
        await done

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        conn: Connection | None = None
        try:
            while True:
                try:
                    first = self._queue.get(timeout=self._IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:  # idle: let the connection go, unless work just came
                        if self._queue.empty():
                            self._thread = None
                            return
                    continue
                batch = [first]
                while len(batch) < self._BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                conn, error = self._commit(conn, batch)
                for _, loop, done in batch:
                    loop.call_soon_threadsafe(_settle, done, error)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _commit(
        self, conn: Connection | None, batch: list[_Waiting]
    ) -> tuple[Connection | None, BaseException | None]:
        """Append ``batch`` in one transaction; once more on a fresh connection when the
        kept one turns out to be broken (a database restart)."""
        for attempt in (1, 2):
            try:
                if conn is None:
                    conn = self.db.engine.connect()
                with conn.begin():
                    for fields, _, _ in batch:
                        audit.record(session=conn, **fields)
                return conn, None
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
                if attempt == 2 or not invalidated:
                    return None, exc
        raise AssertionError("unreachable")


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
