"""The HTTP application. Later issues mount DICOMweb, FHIR, portal and console routers here."""

from __future__ import annotations

import html
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from string import Template
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from cloudfilm import __version__
from cloudfilm.archive import stats
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.auth.deps import client_address, require_actor
from cloudfilm.dicomweb.router import DicomwebError
from cloudfilm.dicomweb.router import router as dicomweb_router
from cloudfilm.dicomweb.wado_uri import router as wado_uri_router

_HOME = Template((Path(__file__).parent / "templates" / "home.html").read_text("utf-8"))


#: Routes anyone may call: probes for load balancers, the API description, the home page.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/", "/api/docs", "/api/openapi.json", "/api/docs/oauth2-redirect"}
)
_STUDY_IN_PATH = re.compile(r"/studies/([0-9.]{1,64})")


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(
        title="Cloud Film 云胶片",
        version=__version__,
        docs_url="/api/docs",
        swagger_ui_oauth2_redirect_url="/api/docs/oauth2-redirect",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.archive = archive
    app.include_router(dicomweb_router)
    app.include_router(wado_uri_router)

    @app.exception_handler(DicomwebError)
    def dicomweb_error(_request: Request, exc: DicomwebError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def audit_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """One audit record per request to a protected route, refusals included (G1)."""
        if request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        try:
            response = await call_next(request)
        except Exception:
            await run_in_threadpool(_audit_request, archive, request, 500)
            raise
        await run_in_threadpool(_audit_request, archive, request, response.status_code)
        return response

    @app.get("/healthz", summary="Liveness: the process answers", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: index database and storage reachable",
        tags=["ops"],
        responses={503: {"description": "a dependency is down"}},
    )
    def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            with archive.db.read_session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            archive.storage.sweep_temporary(archive.settings.storage.temp_max_age_seconds)
            checks["storage"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["storage"] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get(
        "/api/archive/summary",
        summary="Counts of what the archive holds (no patient data)",
        tags=["archive"],
        responses={401: {"description": "no or invalid credentials"}},
    )
    def summary(_caller: Annotated[Actor, Depends(require_actor)]) -> dict[str, int]:
        with archive.db.read_session() as session:
            return stats.counts(session=session).as_dict()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        with archive.db.read_session() as session:
            counts = stats.counts(session=session)
        return _HOME.substitute(
            version=html.escape(__version__),
            aet=html.escape(archive.settings.dimse.ae_title),
            dicom_port=archive.settings.dimse.port,
            patients=counts.patients,
            studies=counts.studies,
            series=counts.series,
            instances=counts.instances,
            gigabytes=f"{counts.bytes / 1e9:.2f}",
        )

    return app


def _audit_request(archive: Archive, request: Request, status: int) -> None:
    actor = getattr(request.state, "actor", None) or Actor(
        ActorType.ANONYMOUS, "anonymous", source=client_address(request)
    )
    path = request.url.path
    if request.method in ("POST", "PUT"):
        event, action = AuditEventType.HTTP_REQUEST, AuditAction.CREATE
    elif path.endswith(("/studies", "/series", "/instances")):
        event, action = AuditEventType.QUERY, AuditAction.EXECUTE
    elif path.startswith("/dicom-web/"):
        event, action = AuditEventType.RETRIEVE, AuditAction.READ
    else:
        event, action = AuditEventType.HTTP_REQUEST, AuditAction.READ
    if status == 401:
        event = AuditEventType.AUTHENTICATION_FAILED
    outcome = (
        AuditOutcome.SUCCESS
        if status < 400
        else AuditOutcome.SERIOUS_FAILURE
        if status in (401, 403)
        else AuditOutcome.MAJOR_FAILURE
        if status >= 500
        else AuditOutcome.MINOR_FAILURE
    )
    study = _STUDY_IN_PATH.search(path)
    with archive.db.session() as session:
        audit.record(
            session=session,
            actor=actor,
            event_type=event,
            action=action,
            outcome=outcome,
            object_type="http",
            object_id=path[-128:],
            study_instance_uid=study.group(1) if study else None,
            message=f"{request.method} {path[:900]} -> {status}",
            detail={"query": str(request.url.query)[:2000]} if request.url.query else None,
        )
