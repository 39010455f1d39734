"""The HTTP application. Later issues mount DICOMweb, FHIR, portal and console routers here."""

from __future__ import annotations

import html

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text

from cloudfilm import __version__
from cloudfilm.archive import stats
from cloudfilm.archive.ingest import Archive


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
        return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                            status_code=200 if ready else 503)

    @app.get("/api/archive/summary", summary="Counts of what the archive holds (no patient data)",
             tags=["archive"])
    def summary() -> dict[str, int]:
        with archive.db.read_session() as session:
            return stats.counts(session=session).as_dict()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        with archive.db.read_session() as session:
            counts = stats.counts(session=session)
        return _HOME.format(
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


_HOME = """<!doctype html>
<html lang="zh-CN">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>云胶片 Cloud Film</title>
<style>
body{{font-family:system-ui,"Noto Sans CJK SC","PingFang SC",sans-serif;margin:0;background:#f4f6f9;color:#1d2733}}
header{{background:#1f5fa8;color:#fff;padding:18px 32px}} header h1{{margin:0;font-size:22px}}
main{{max-width:960px;margin:24px auto;padding:0 16px}}
.cards{{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px}}
.card{{background:#fff;border-radius:8px;padding:16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}}
.card b{{display:block;font-size:28px;margin-top:6px}} small{{color:#66788a}}
section{{background:#fff;border-radius:8px;padding:16px 20px;margin-top:16px}}
code{{background:#eef2f6;padding:2px 6px;border-radius:4px}}
</style></head>
<body><header><h1>云胶片 · Cloud Film</h1><small style="color:#d6e4f5">数字影像归档服务 · v{version}</small></header>
<main>
<div class="cards">
<div class="card">患者 <small>Patients</small><b>{patients}</b></div>
<div class="card">检查 <small>Studies</small><b>{studies}</b></div>
<div class="card">序列 <small>Series</small><b>{series}</b></div>
<div class="card">图像 <small>Instances</small><b>{instances}</b></div>
<div class="card">存储 <small>Stored (GB)</small><b>{gigabytes}</b></div>
</div>
<section><h3>接入 · Connect</h3>
<p>DICOM 接收 (C-STORE / C-ECHO)：AE <code>{aet}</code>，端口 <code>{dicom_port}</code></p>
<p>导入文件 · Import files: <code>cloudfilm import 路径/path</code></p>
<p>接口文档 · API: <a href="/api/docs">/api/docs</a> · 健康检查 · Health: <a href="/readyz">/readyz</a></p>
</section>
</main></body></html>
"""
