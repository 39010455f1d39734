"""Archive administration over HTTP for the console: the lossless compression report,
deletion with a recycle bin."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloudfilm.archive import compression, deletion, integrity
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.parsing import is_valid_uid
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import BadRequest

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


@router.get(
    "/api/storage/integrity",
    summary="Storage integrity: the last scrub pass, objects with no good copy, copies "
    "owed to the mirror, reads served by the mirror",
    responses=_ERRORS,
)
def storage_integrity(request: Request, _caller: Viewer) -> JSONResponse:
    # Here, not in storage/router.py: the answer joins the index (a domain table), and
    # the storage platform never imports a domain.
    archive: Archive = request.app.state.archive
    return JSONResponse(integrity.integrity_status(archive))


# --------------------------------------------------------------------------- deletion

Deleter = Annotated[Principal, Depends(Permit(Permission.STUDY_DELETE))]
_DELETE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    400: {"description": "no reason given, or a malformed UID"},
    404: {"description": "no such study, series or instance (within the caller's data scope)"},
    409: {"description": "the deletion is no longer pending"},
}


class DeletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=2, max_length=500)]
    """Why: kept with the deletion and in the audit trail."""
    delay_days: Annotated[int | None, Field(ge=0, le=3650)] = None
    """Days in the recycle bin before the bytes go; default ``retention.recycle_days``."""


def _delete(
    request: Request, caller: Principal, body: DeletionRequest, target: deletion.Target
) -> dict[str, Any]:
    archive: Archive = request.app.state.archive
    for uid in (target.study, target.series, target.instance):
        if uid is not None and not is_valid_uid(uid):
            raise BadRequest(f"{uid[:80]!r} is not a valid UID")
    days = archive.settings.retention.recycle_days if body.delay_days is None else body.delay_days
    clock = request.app.state.accounts.clock
    with archive.db.session() as session:
        done = deletion.request_deletion(
            session=session,
            target=target,
            reason=body.reason,
            actor=request.state.actor,
            now=clock.now(),
            delay=timedelta(days=days),
            scope=caller.study_scope,
        )
        return deletion.view(done)


@router.delete(
    "/api/archive/studies/{study}",
    summary="Delete a study (to the recycle bin; audited with the reason)",
    responses=_DELETE_ERRORS,
)
def delete_study(
    study: str, body: DeletionRequest, request: Request, caller: Deleter
) -> dict[str, Any]:
    return _delete(request, caller, body, deletion.Target(study))


@router.delete(
    "/api/archive/studies/{study}/series/{series}",
    summary="Delete a series (to the recycle bin)",
    responses=_DELETE_ERRORS,
)
def delete_series(
    study: str, series: str, body: DeletionRequest, request: Request, caller: Deleter
) -> dict[str, Any]:
    return _delete(request, caller, body, deletion.Target(study, series))


@router.delete(
    "/api/archive/studies/{study}/series/{series}/instances/{instance}",
    summary="Delete an instance (to the recycle bin)",
    responses=_DELETE_ERRORS,
)
def delete_instance(
    study: str,
    series: str,
    instance: str,
    body: DeletionRequest,
    request: Request,
    caller: Deleter,
) -> dict[str, Any]:
    return _delete(request, caller, body, deletion.Target(study, series, instance))


@router.get(
    "/api/archive/deletions",
    summary="The recycle bin: deletions that can still be restored",
    responses=_ERRORS,
)
def list_deletions(request: Request, _caller: Deleter) -> list[dict[str, Any]]:
    archive: Archive = request.app.state.archive
    with archive.db.read_session() as session:
        return deletion.pending(session)


@router.post(
    "/api/archive/deletions/{deletion_id}/restore",
    summary="Restore a pending deletion",
    responses=_DELETE_ERRORS,
)
def restore_deletion(deletion_id: int, request: Request, _caller: Deleter) -> dict[str, Any]:
    archive: Archive = request.app.state.archive
    restored = deletion.restore(
        archive=archive,
        deletion_id=deletion_id,
        actor=request.state.actor,
        now=request.app.state.accounts.clock.now(),
    )
    return deletion.view(restored)
