"""WADO-URI (PS3.18 9, ``/wado?requestType=WADO&...``) for legacy clients."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cloudfilm.archive.access import note_access
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.dicomweb import rendered
from cloudfilm.dicomweb.router import DicomwebError, archive_of, instances_of
from cloudfilm.storage import codecs

router = APIRouter(tags=["WADO-URI"])
Reader = Annotated[Principal, Depends(Permit(Permission.STUDY_READ))]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "missing or malformed parameter"},
    401: {"description": "no or invalid credentials"},
    404: {"description": "no such object"},
    406: {"description": "content type or transfer syntax not available"},
}


def _number(params: dict[str, str], name: str) -> float | None:
    if name not in params:
        return None
    try:
        return float(params[name])
    except ValueError as exc:
        raise DicomwebError(400, f"{name} must be a number") from exc


@router.get("/wado", summary="WADO-URI: one object as DICOM, JPEG or PNG", responses=_ERRORS)
def wado_uri(request: Request, _caller: Reader) -> Response:
    params = dict(request.query_params)
    if params.get("requestType") != "WADO":
        raise DicomwebError(400, "requestType=WADO is required (PS3.18 9.1.2)")
    missing = [p for p in ("studyUID", "seriesUID", "objectUID") if not params.get(p)]
    if missing:
        raise DicomwebError(400, f"missing {', '.join(missing)}")
    if params.get("anonymize") == "yes":
        raise DicomwebError(400, "anonymize=yes is not offered")
    [(row, _, _)] = instances_of(
        request, params["studyUID"], params["seriesUID"], params["objectUID"]
    )
    archive = archive_of(request)
    blob = archive.storage.read(row.storage_key)
    note_access(archive, [params["studyUID"]])
    content_type = params.get("contentType", "image/jpeg").split(",")[0].strip()
    if content_type == "application/dicom":
        syntax = params.get("transferSyntax")
        if syntax and syntax != row.transfer_syntax_uid:
            try:
                blob = codecs.transcode(blob, syntax)
            except codecs.CodecUnavailable as exc:
                raise DicomwebError(406, str(exc)) from exc
            except codecs.CodecFailed as exc:
                raise DicomwebError(422, str(exc)) from exc
        return Response(blob, media_type="application/dicom")
    if content_type not in rendered.MEDIA_TYPES:
        raise DicomwebError(406, "contentType must be image/jpeg, image/png or application/dicom")
    render_params: dict[str, str] = {}
    center, width = _number(params, "windowCenter"), _number(params, "windowWidth")
    if (center is None) != (width is None):
        raise DicomwebError(400, "windowCenter and windowWidth go together")
    if center is not None and width is not None:
        render_params["window"] = f"{center},{width}"
    rows, columns = _number(params, "rows"), _number(params, "columns")
    if rows or columns:
        render_params["viewport"] = f"{int(columns or rows or 0)},{int(rows or columns or 0)}"
    if "imageQuality" in params:
        render_params["quality"] = params["imageQuality"]
    frame = int(_number(params, "frameNumber") or 1)
    try:
        opts = rendered.options(render_params, content_type)
        image = rendered.render(blob, frame, opts)
    except rendered.RenderError as exc:
        raise DicomwebError(exc.status, exc.message) from exc
    return Response(image, media_type=opts.media_type)
