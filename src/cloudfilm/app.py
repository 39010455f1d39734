"""The HTTP application. Later issues mount DICOMweb, FHIR, portal and console routers here."""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import os
from pathlib import Path
from string import Template
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import configure_mappers
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudfilm import __version__, httpaudit
from cloudfilm.archive import stats
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.router import router as archive_router
from cloudfilm.archive.tiers_router import router as tiers_router
from cloudfilm.audit.router import router as audit_router
from cloudfilm.auth.accounts import Accounts, WeakPassword
from cloudfilm.auth.admin import router as admin_router
from cloudfilm.auth.guard import AuthError, Permit
from cloudfilm.auth.pages import router as pages_router
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.auth.router import router as auth_router
from cloudfilm.billing.router import router as billing_router
from cloudfilm.clock import Clock
from cloudfilm.config import Settings
from cloudfilm.dicomweb.router import DicomwebError
from cloudfilm.dicomweb.router import router as dicomweb_router
from cloudfilm.dicomweb.wado_uri import router as wado_uri_router
from cloudfilm.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PermissionDenied,
    RecallNeeded,
    StorageFull,
    StorageUnavailable,
)
from cloudfilm.fhir.diagnostic import router as fhir_reports_router
from cloudfilm.fhir.router import router as fhir_router
from cloudfilm.kiosk.router import router as kiosk_router
from cloudfilm.mpi.router import router as mpi_router
from cloudfilm.notify.router import router as notify_router
from cloudfilm.ohif import router as ohif_router
from cloudfilm.reports.router import router as reports_router
from cloudfilm.sharing.router import router as portal_router
from cloudfilm.soap.router import router as webservice_router
from cloudfilm.storage.router import router as storage_router

_HOME = Template((Path(__file__).parent / "templates" / "home.html").read_text("utf-8"))


#: Requests that leave no audit record: probes, the API description, static pages.
UNAUDITED_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/",
        "/login",
        "/ohif",
        "/api/docs",
        "/api/openapi.json",
        "/api/docs/oauth2-redirect",
    }
)


def audited(path: str) -> bool:
    """Whether a request to ``path`` gets an audit record (all but probes and page assets).

    The OHIF viewer's files (``/ohif/...``: about a hundred scripts, styles and WASM
    modules per page load) hold no patient data; what the viewer reads goes through
    ``/dicom-web``, which is audited."""
    return path not in UNAUDITED_PATHS and not path.startswith(("/static/", "/ohif/"))


_PUBLIC = Depends(Permit.public_route())


#: Environment variable through which ``cloudfilm serve`` hands its command-line settings
#: to the HTTP worker processes (``http.workers`` > 1); the rest comes from the same
#: environment and configuration file.
WORKER_SETTINGS = "CLOUDFILM_WORKER_SETTINGS"


def worker_app() -> FastAPI:
    """The app of one HTTP worker process, built by uvicorn in each process it starts.

    The main process has migrated the database and runs the DICOM listener and the
    background jobs; a worker only opens the index and the storage and serves HTTP.
    """
    from cloudfilm.audit import service as audit
    from cloudfilm.db import Database

    settings = Settings(**json.loads(os.environ.get(WORKER_SETTINGS) or "{}"))
    audit.configure(settings.audit)
    return serving_app(Archive(settings, db=Database(settings)))


def serving_app(archive: Archive) -> FastAPI:
    """:func:`create_app`, plus what its first request would otherwise pay (tens of ms,
    once per process): the ORM's mapper set-up, the first database connection, the
    route tables, the thread pool's import."""
    configure_mappers()
    archive.db.read_once(text("SELECT 1"), {})
    app = create_app(archive)
    _build_route_tables(app.router.routes)
    with contextlib.suppress(ImportError):  # anyio's asyncio backend, loaded lazily
        importlib.import_module("anyio._backends._asyncio")
    return app


def _build_route_tables(routes: list[Any]) -> None:
    """Build now what FastAPI builds on the first request that reaches each included
    router (its routes' dependency trees: ~20 ms for the DICOMweb router). Best effort:
    it relies on how FastAPI resolves included routers, and does nothing otherwise."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            _build_route_tables(candidates())


def create_app(archive: Archive, *, clock: Clock | None = None) -> FastAPI:
    app = FastAPI(
        title="Cloud Film 云胶片",
        version=__version__,
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.archive = archive
    app.state.accounts = Accounts(archive.settings, clock)
    app.state.storage_monitor = archive.monitor
    app.include_router(dicomweb_router)
    app.include_router(wado_uri_router)
    app.include_router(billing_router)
    app.include_router(fhir_reports_router)  # before the FHIR router's catch-all routes
    app.include_router(fhir_router)
    app.include_router(auth_router)
    app.include_router(admin_router)
    app.include_router(audit_router)
    app.include_router(pages_router)
    app.include_router(ohif_router)
    app.include_router(storage_router)
    app.include_router(archive_router)
    app.include_router(tiers_router)
    app.include_router(mpi_router)
    app.include_router(kiosk_router)
    app.include_router(notify_router)
    app.include_router(webservice_router)
    app.include_router(reports_router)
    app.include_router(portal_router)
    _install_error_handlers(app)
    app.add_middleware(httpaudit.AuditMiddleware, archive=archive, audited=audited)
    _install_headers(app, archive)

    @app.get("/api/openapi.json", include_in_schema=False, dependencies=[_PUBLIC])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/docs", include_in_schema=False, dependencies=[_PUBLIC])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/api/openapi.json", title="Cloud Film API")

    @app.get(
        "/healthz", summary="Liveness: the process answers", tags=["ops"], dependencies=[_PUBLIC]
    )
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: index database and storage reachable",
        tags=["ops"],
        responses={503: {"description": "a dependency is down"}},
        dependencies=[_PUBLIC],
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
    def summary(
        _caller: Annotated[Principal, Depends(Permit(Permission.ARCHIVE_STATS))],
    ) -> dict[str, int]:
        with archive.db.read_session() as session:
            return stats.counts(session=session).as_dict()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=[_PUBLIC])
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


class SecurityHeaders:
    """Pure ASGI middleware adding the security headers to every response start."""

    _NO_STORE = ("/api/auth", "/api/admin", "/api/oauth", "/api/audit")
    _CSP = "default-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"

    def __init__(self, app: ASGIApp, public_url: str) -> None:
        self.app = app
        # Behind the HTTPS proxy the public address says so; browsers then refuse plain
        # HTTP to this host for a year (HSTS). Never sent when the site is plain HTTP.
        self.hsts = public_url.startswith("https://")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        https = self.hsts or scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
                if https:
                    headers.setdefault(
                        "Strict-Transport-Security", "max-age=31536000; includeSubDomains"
                    )
                if path.startswith(self._NO_STORE):
                    headers["Cache-Control"] = "no-store"
                html_page = headers.get("content-type", "").startswith("text/html")
                if html_page and path != "/api/docs":  # Swagger UI loads from its CDN
                    headers.setdefault("Content-Security-Policy", self._CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DicomwebError)
    def dicomweb_error(_request: Request, exc: DicomwebError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(AuthError)
    def auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        headers = {"Cache-Control": "no-store"}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="cloudfilm"'
        return JSONResponse(
            {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field names and reasons only: the input may hold a password.
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {
                "error": "invalid_request",
                "message": "请求无效 · invalid request: " + "; ".join(problems),
            },
            status_code=400,
        )

    @app.exception_handler(RecallNeeded)
    def recalling(_request: Request, exc: RecallNeeded) -> JSONResponse:
        # The read already queued the recall (TieredStorage.on_recall): tell the viewer
        # what is happening and when to ask again (RFC 9110 10.2.3 Retry-After).
        return JSONResponse(
            {
                "error": "recalling",
                "message": "影像正在从离线存储调取 · being recalled from offline storage",
                "study": exc.study_instance_uid,
                "job": exc.job_id,
            },
            status_code=503,
            headers={"Retry-After": str(exc.retry_after)},
        )

    # StorageFull before its base: 507 Insufficient Storage (RFC 4918 11.5), retry later.
    statuses: dict[type[Exception], int] = {
        BadRequest: 400,
        NotFound: 404,
        Conflict: 409,
        PermissionDenied: 403,
        WeakPassword: 400,
        StorageFull: 507,
        StorageUnavailable: 503,
    }
    for kind, status in statuses.items():

        def handler(_request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse(
                {"error": type(exc).__name__.lower(), "message": str(exc)}, status_code=status
            )

        app.add_exception_handler(kind, handler)


def _install_headers(app: FastAPI, archive: Archive) -> None:
    """Security headers on every response (R13); no caching of personal data."""
    origins = archive.settings.http.cors_origins
    app.add_middleware(SecurityHeaders, public_url=archive.settings.http.public_url or "")
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-CSRF-Token", "Accept"],
        )
