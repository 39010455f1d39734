"""Storage tiers over HTTP (``/api/storage/...``): where a study is, pin, recall, migrate,
and the job list. Kept beside the archive, not in :mod:`cloudfilm.storage.router`: these
routes know studies, and the storage platform does not import the archive domain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.parsing import is_valid_uid
from cloudfilm.archive.tiering import Tiering
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import BadRequest

router = APIRouter(prefix="/api/storage", tags=["storage"])
Viewer = Annotated[Principal, Depends(Permit(Permission.ARCHIVE_STATS))]
Manager = Annotated[Principal, Depends(Permit(Permission.STORAGE_MANAGE))]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "not signed in"},
    403: {"description": "not permitted"},
    404: {"description": "no such study or tier"},
}


def _tiering(request: Request) -> Tiering:
    archive: Archive = request.app.state.archive
    return archive.tiering


def _uid(value: str) -> str:
    if not is_valid_uid(value):
        raise BadRequest(f"not a valid UID: {value[:70]!r}")
    return value


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str
    source: str = "online"


@router.get(
    "/studies/{study}/location",
    summary="Tier of the study's instances per series, pin, current job (正在调取 recalling)",
    responses=_ERRORS,
)
def study_location(study: str, request: Request, _caller: Viewer) -> JSONResponse:
    return JSONResponse(_tiering(request).location(_uid(study)))


@router.post(
    "/studies/{study}/pin",
    summary="Keep the study online; recalls what is on a lower tier",
    responses=_ERRORS,
)
def pin_study(study: str, request: Request, caller: Manager) -> JSONResponse:
    return JSONResponse(
        _tiering(request).set_pinned(_uid(study), True, caller.name, actor=request.state.actor)
    )


@router.post(
    "/studies/{study}/unpin",
    summary="Let the tier policies move the study again",
    responses=_ERRORS,
)
def unpin_study(study: str, request: Request, caller: Manager) -> JSONResponse:
    return JSONResponse(
        _tiering(request).set_pinned(_uid(study), False, caller.name, actor=request.state.actor)
    )


@router.post(
    "/studies/{study}/recall",
    summary="Queue the recall of the study to the online tier",
    responses=_ERRORS,
)
def recall_study(study: str, request: Request, caller: Manager) -> JSONResponse:
    job = _tiering(request).request_recall(_uid(study), caller.name, actor=request.state.actor)
    return JSONResponse({"job": job}, status_code=202 if job else 200)


@router.post(
    "/studies/{study}/migrate",
    summary="Queue the migration of the study between tiers",
    responses={**_ERRORS, 409: {"description": "pinned online, or no tiers configured"}},
)
def migrate_study(
    study: str, body: MigrateRequest, request: Request, caller: Manager
) -> JSONResponse:
    job = _tiering(request).migrate(
        _uid(study), body.source, body.target, caller.name, actor=request.state.actor
    )
    return JSONResponse({"job": job}, status_code=202)


@router.get("/jobs", summary="Migration and recall jobs, newest first", responses=_ERRORS)
def storage_jobs(
    request: Request,
    _caller: Viewer,
    state: Annotated[list[str] | None, Query(max_length=16)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    tiering = _tiering(request)
    return JSONResponse({"tiers": tiering.tiers(), "jobs": tiering.jobs(states=state, limit=limit)})
