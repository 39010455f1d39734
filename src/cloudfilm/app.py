"""The HTTP application. Later issues mount DICOMweb, FHIR, portal and console routers here."""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text

from cloudfilm import __version__
from cloudfilm.archive import stats
from cloudfilm.archive.ingest import Archive

_HOME = Template((Path(__file__).parent / "templates" / "home.html").read_text("utf-8"))


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(
        title="Cloud Film 云胶片",
        version=__version__,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.archive = archive

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
    )
    def summary() -> dict[str, int]:
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
