"""Archive statistics over HTTP for the console: the lossless compression report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from cloudfilm.archive import compression
from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal

router = APIRouter(tags=["archive"])
Viewer = Annotated[Principal, Depends(Permit(Permission.ARCHIVE_STATS))]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "not signed in"},
    403: {"description": "not permitted"},
}


@router.get(
    "/api/archive/compression",
    summary="Compression ratios (size as received / size stored): overall, per modality, "
    "per study with ?study=",
    responses=_ERRORS,
)
def compression_report(
    request: Request,
    _caller: Viewer,
    study: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONResponse:
    archive: Archive = request.app.state.archive
    with archive.db.read_session() as session:
        report = compression.report(session=session, study_instance_uid=study)
    settings = archive.settings.compression
    return JSONResponse(
        {
            **report.as_dict(),
            "settings": {
                "at_ingest": settings.at_ingest,
                "codec": settings.codec.value,
                "by_modality": {k: v.value for k, v in settings.by_modality.items()},
            },
        }
    )
