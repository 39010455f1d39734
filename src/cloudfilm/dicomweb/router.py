"""DICOMweb routes under ``/dicom-web`` (PS3.18): QIDO-RS search, WADO-RS metadata and
retrieve, STOW-RS store. Every route declares its permission (:class:`Permit`); every
study-addressed read goes through :func:`_addressed` or :func:`_search`, which add the
caller's data scope to the query (a study outside it is 404, as if absent). The audit
middleware records each request."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import secrets
from collections.abc import Iterator
from typing import Annotated, Any
from xml.sax.saxutils import escape as xml_escape

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cloudfilm.archive import export
from cloudfilm.archive.access import note_access
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.matching import Level, QueryError
from cloudfilm.archive.models import Instance, InstanceMetadata, Series, Study
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.dicomweb import qido, rendered, stow, wado
from cloudfilm.dicomweb.media import media_type_parameters
from cloudfilm.errors import StorageFull, StorageUnavailable
from cloudfilm.storage import codecs

DICOM_JSON = "application/dicom+json"
_CHUNK = 1024 * 1024

router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])
Searcher = Annotated[Principal, Depends(Permit(Permission.STUDY_SEARCH))]
Reader = Annotated[Principal, Depends(Permit(Permission.STUDY_READ))]
Downloader = Annotated[Principal, Depends(Permit(Permission.STUDY_DOWNLOAD))]
Storer = Annotated[Principal, Depends(Permit(Permission.STUDY_STORE))]
SignedIn = Annotated[Principal, Depends(Permit.signed_in())]


class DicomwebError(Exception):
    """An HTTP error with a readable message (rendered by the app's handler)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def scope_of(request: Request) -> Any:
    """The caller's study condition (``None``: all studies). Fails closed when the route
    did not authenticate the caller."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not principal.authenticated:
        raise RuntimeError("a study was addressed before the caller was authorised")
    return principal.study_scope


def archive_of(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def base_url(request: Request) -> str:
    public = archive_of(request).settings.http.public_url
    return (public or str(request.base_url)).rstrip("/") + "/dicom-web"


# --------------------------------------------------------------------------- QIDO-RS

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed query"},
    401: {"description": "no or invalid credentials"},
}


def _search(request: Request, level: Level, fixed: dict[str, str]) -> Response:
    archive = archive_of(request)
    try:
        parsed = qido.parse_search(
            level,
            request.query_params.multi_items(),
            max_results=archive.settings.dicomweb.max_results,
            fixed=fixed,
        )
        parsed.query.scope = scope_of(request)
        with archive.db.read_session() as session:
            results, truncated = qido.search(session, parsed, base_url(request))
    except QueryError as exc:
        raise DicomwebError(400, str(exc)) from exc
    headers = {}
    if truncated:
        # PS3.18 8.3.4.4 / RFC 7234 Warning 299: tell the client to page with offset.
        headers["Warning"] = (
            '299 cloudfilm "The number of results exceeded the maximum supported by the '
            'server. Additional results can be requested."'
        )
    if not results:
        return Response(status_code=204, headers=headers)
    return Response(qido.dumps(results), media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="Search for studies (QIDO-RS)", responses=_ERRORS)
def search_studies(request: Request, _caller: Searcher) -> Response:
    return _search(request, Level.STUDY, {})


@router.get("/series", summary="Search for series (QIDO-RS)", responses=_ERRORS)
def search_series(request: Request, _caller: Searcher) -> Response:
    return _search(request, Level.SERIES, {})


@router.get("/instances", summary="Search for instances (QIDO-RS)", responses=_ERRORS)
def search_instances(request: Request, _caller: Searcher) -> Response:
    return _search(request, Level.IMAGE, {})


@router.get("/studies/{study}/series", summary="Search the series of a study", responses=_ERRORS)
def search_study_series(study: str, request: Request, _caller: Searcher) -> Response:
    return _search(request, Level.SERIES, {"StudyInstanceUID": _uid(study)})


@router.get(
    "/studies/{study}/instances", summary="Search the instances of a study", responses=_ERRORS
)
def search_study_instances(study: str, request: Request, _caller: Searcher) -> Response:
    return _search(request, Level.IMAGE, {"StudyInstanceUID": _uid(study)})


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="Search the instances of a series",
    responses=_ERRORS,
)
def search_series_instances(
    study: str, series: str, request: Request, _caller: Searcher
) -> Response:
    return _search(
        request, Level.IMAGE, {"StudyInstanceUID": _uid(study), "SeriesInstanceUID": _uid(series)}
    )


def _uid(value: str) -> str:
    from cloudfilm.archive.parsing import is_valid_uid

    if not is_valid_uid(value):
        raise DicomwebError(400, f"{value[:80]!r} is not a valid UID")
    return value


# --------------------------------------------------------------------------- WADO-RS

_RETRIEVE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"description": "no such study, series or instance"},
    406: {"description": "the Accept header asks for something we cannot produce"},
}


def _addressed(
    request: Request,
    columns: list[Any],
    study: str,
    series: str | None,
    instance: str | None,
    *,
    with_metadata: bool = False,
) -> list[Any]:
    """Rows of ``columns`` for the instances the path addresses, in display order (404 if
    there are none)."""
    stmt = (
        select(*columns)
        .select_from(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == _uid(study))
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    if with_metadata:
        stmt = stmt.join(InstanceMetadata, InstanceMetadata.instance_pk == Instance.id)
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == _uid(series))
    if instance is not None:
        stmt = stmt.where(Instance.sop_instance_uid == _uid(instance))
    scope = scope_of(request)
    if scope is not None:
        stmt = stmt.where(scope)
    db = archive_of(request).db
    if any(isinstance(c, type) for c in columns):  # mapped objects need an ORM session
        with db.read_session() as session:
            rows = list(session.execute(stmt).all())
    else:
        rows = db.read_once(stmt, {})
    if not rows:
        what = "instance" if instance else "series" if series else "study"
        raise DicomwebError(404, f"no such {what} in this archive")
    return rows


def instances_of(
    request: Request, study: str, series: str | None, instance: str | None
) -> list[tuple[Instance, str, str]]:
    """The instances addressed by the path, with their series and study UIDs (404 if none)."""
    columns = [Instance, Series.series_instance_uid, Study.study_instance_uid]
    return [(r[0], r[1], r[2]) for r in _addressed(request, columns, study, series, instance)]


def _metadata(request: Request, study: str, series: str | None, instance: str | None) -> Response:
    rows = _addressed(
        request,
        [
            InstanceMetadata.dicom_json,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.updated_at,
        ],
        study,
        series,
        instance,
        with_metadata=True,
    )
    root = f"{base_url(request)}/studies/{study}/series/"
    parts = []
    for text, series_uid, sop_uid, _ in rows:
        # Stored JSON refers to bulk data relative to its instance; make the URIs absolute.
        prefix = f'"BulkDataURI":"{root}{series_uid}/instances/{sop_uid}/bulkdata/'
        parts.append(text.replace('"BulkDataURI":"bulkdata/', prefix))
    body = ("[" + ",".join(parts) + "]").encode("utf-8")
    etag = (
        '"'
        + hashlib.sha256("|".join(f"{r[2]}@{r[3]}" for r in rows).encode()).hexdigest()[:32]
        + '"'
    )
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > 1024:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=DICOM_JSON, headers=headers)


@router.get(
    "/studies/{study}/metadata",
    summary="Metadata of every instance of a study",
    responses=_RETRIEVE_ERRORS,
)
def study_metadata(study: str, request: Request, _caller: Reader) -> Response:
    return _metadata(request, study, None, None)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="Metadata of every instance of a series",
    responses=_RETRIEVE_ERRORS,
)
def series_metadata(study: str, series: str, request: Request, _caller: Reader) -> Response:
    return _metadata(request, study, series, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Metadata of one instance",
    responses=_RETRIEVE_ERRORS,
)
def instance_metadata(
    study: str, series: str, instance: str, request: Request, _caller: Reader
) -> Response:
    return _metadata(request, study, series, instance)


def _wanted_syntax(request: Request) -> str | None:
    """The transfer syntax the Accept header asks for: ``None`` for the stored one.

    PS3.18 8.7.3.5: ``multipart/related; type="application/dicom"; transfer-syntax=...``;
    ``*`` (or no parameter with ``*/*``) means "as stored". Lossless targets we can
    produce are served by transcoding; anything else is 406.
    """
    accept = request.headers.get("accept", "*/*").lower()
    if not accept.strip():
        return None
    offered = []
    for item in accept.split(","):
        media, params = media_type_parameters(item)
        if media in ("*/*", "multipart/*"):
            return None
        if media == "multipart/related" and params.get("type", "application/dicom") not in (
            "application/dicom",
            "application/*",
            "*/*",
        ):
            continue
        if media not in ("multipart/related", "application/dicom"):
            continue
        syntax = params.get("transfer-syntax", "*")
        if syntax in ("*", ""):
            return None
        if codecs.can_produce(syntax):
            return syntax
        offered.append(syntax)
    raise DicomwebError(
        406,
        'can send multipart/related; type="application/dicom" as stored (transfer-syntax=*) '
        f"or in {', '.join(codecs.TARGETS)}; not in {', '.join(offered) or accept[:100]}",
    )


def _retrieve(
    request: Request, study: str, series: str | None, instance: str | None
) -> StreamingResponse:
    target = _wanted_syntax(request)
    rows = instances_of(request, study, series, instance)
    # An offline object cannot be streamed: answer 503 (recalling) before the stream starts.
    archive_of(request).tiering.ensure_rows_readable([row for row, _, _ in rows])
    note_access(archive_of(request), [study])  # tier policies' "not accessed for N days"
    storage = archive_of(request).storage
    boundary = secrets.token_hex(16)

    def part(syntax: str, size: int) -> bytes:
        return (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode("ascii")

    def body() -> Iterator[bytes]:
        for row, _, _ in rows:
            if target is None or target == row.transfer_syntax_uid:
                yield part(row.transfer_syntax_uid, row.byte_size)
                with storage.open(row.storage_key) as fh:
                    while chunk := fh.read(_CHUNK):
                        yield chunk
            else:
                # A failure here cannot change the status any more: the stream ends early
                # and the client sees a truncated multipart body, never a wrong object.
                data = codecs.transcode(storage.read(row.storage_key), target)
                yield part(target, len(data))
                yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode("ascii")

    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


@router.get(
    "/studies/{study}", summary="Retrieve a study (multipart DICOM)", responses=_RETRIEVE_ERRORS
)
def retrieve_study(study: str, request: Request, _caller: Reader) -> StreamingResponse:
    return _retrieve(request, study, None, None)


@router.get(
    "/studies/{study}/series/{series}",
    summary="Retrieve a series (multipart DICOM)",
    responses=_RETRIEVE_ERRORS,
)
def retrieve_series(
    study: str, series: str, request: Request, _caller: Reader
) -> StreamingResponse:
    return _retrieve(request, study, series, None)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="Retrieve one instance (multipart DICOM)",
    responses=_RETRIEVE_ERRORS,
)
def retrieve_instance(
    study: str, series: str, instance: str, request: Request, _caller: Reader
) -> StreamingResponse:
    return _retrieve(request, study, series, instance)


# --------------------------------------------------------------------------- STOW-RS

_STOW_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    202: {"description": "some instances stored, some failed (see FailedSOPSequence)"},
    409: {"description": "no instance could be stored (see FailedSOPSequence)"},
    507: {"description": "no instance could be stored: storage is full (0xA700); retry later"},
    415: {"description": "not multipart/related with application/dicom parts"},
}


async def _store(request: Request, study: str | None) -> Response:
    archive = archive_of(request)
    media, params = media_type_parameters(request.headers.get("content-type", ""))
    part_type = params.get("type", "application/dicom").lower()
    if (
        media != "multipart/related"
        or part_type != "application/dicom"
        or not params.get("boundary")
    ):
        raise DicomwebError(
            415,
            'send multipart/related; type="application/dicom"; boundary=... '
            f"(got {media or 'no Content-Type'}"
            + (f"; type={part_type}" if media == "multipart/related" else "")
            + ")",
        )
    collector = stow.PartCollector(params["boundary"], archive.limits.max_object_bytes)
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    out_of_space: list[bool] = []
    root = base_url(request)
    actor = request.state.actor

    def handle(part: stow.Part) -> None:
        kind = part.headers.get("content-type", "application/dicom").split(";")[0].strip()
        if kind.lower() != "application/dicom":
            failed.append({"00081197": {"vr": "US", "Value": [stow.UNSUPPORTED_MEDIA]}})
            return
        if part.too_large:
            failed.append({"00081197": {"vr": "US", "Value": [stow.OUT_OF_RESOURCES]}})
            return
        try:
            result = archive.ingest(bytes(part.data), actor=actor, study_instance_uid=study)
        except StorageUnavailable as exc:
            failed.append({"00081197": {"vr": "US", "Value": [stow.OUT_OF_RESOURCES]}})
            if isinstance(exc, StorageFull):
                out_of_space.append(True)
            return
        item = stow.sop_reference(result)
        reason = stow.failure_reason(result)
        if reason is not None:
            if study and result.reason and "named in the request" in result.reason:
                reason = stow.STUDY_MISMATCH
            item["00081197"] = {"vr": "US", "Value": [reason]}
            failed.append(item)
            return
        item["00081190"] = {
            "vr": "UR",
            "Value": [
                f"{root}/studies/{result.study_instance_uid}/instances/{result.sop_instance_uid}"
            ],
        }
        referenced.append(item)

    # Two parts in the ingest pipeline at once: one parses while the other waits for its
    # fsyncs. Completed parts are stored whatever happens to the rest of the body.
    slots = asyncio.Semaphore(_PARTS_IN_FLIGHT)
    started: list[asyncio.Task[None]] = []

    async def ingest(part: stow.Part) -> None:
        try:
            await run_in_threadpool(handle, part)
        finally:
            slots.release()

    try:
        try:
            async for chunk in request.stream():
                for part in collector.write(chunk):
                    await slots.acquire()
                    started.append(asyncio.create_task(ingest(part)))
        finally:
            await asyncio.gather(*started)
    except stow.StowError as exc:
        raise DicomwebError(
            exc.status, f"{exc.message}; {len(referenced)} instance(s) before the error were stored"
        ) from exc
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening; nothing partial was stored
    if not collector.ended:
        raise DicomwebError(
            400,
            f"the body ended before the closing boundary; {len(referenced)} complete "
            "instance(s) before it were stored, the cut-off part was not",
        )
    if not referenced and not failed:
        raise DicomwebError(400, "the multipart body holds no part")
    body: dict[str, Any] = {}
    if study:
        body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    # Nothing stored because the disk is full: 507 Insufficient Storage (RFC 4918 11.5),
    # so that senders retry later instead of treating the objects as bad (409).
    status = 200 if not failed else 202 if referenced else 507 if out_of_space else 409
    return Response(orjson.dumps(body), status_code=status, media_type=DICOM_JSON)


#: Parts of one STOW-RS request ingested at the same time.
_PARTS_IN_FLIGHT = 2


@router.post("/studies", summary="Store instances (STOW-RS)", responses=_STOW_ERRORS)
async def store_instances(request: Request, _caller: Storer) -> Response:
    return await _store(request, None)


@router.post(
    "/studies/{study}", summary="Store instances of one study (STOW-RS)", responses=_STOW_ERRORS
)
async def store_study_instances(study: str, request: Request, _caller: Storer) -> Response:
    return await _store(request, _uid(study))


# --------------------------------------------------------------------------- frames, bulk data


def _one_blob(request: Request, study: str, series: str, instance: str) -> bytes:
    [(row, _, _)] = instances_of(request, study, series, instance)
    return archive_of(request).storage.read(row.storage_key)


def _multipart(parts: list[tuple[str, bytes]]) -> Response:
    boundary = secrets.token_hex(16)
    chunks = []
    for content_type, data in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode("ascii")
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    first = parts[0][0].split(";")[0] if parts else "application/octet-stream"
    return Response(
        b"".join(chunks), media_type=f'multipart/related; type="{first}"; boundary={boundary}'
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames (1-based list: 1,2,3)",
    responses=_RETRIEVE_ERRORS,
)
def retrieve_frames(
    study: str, series: str, instance: str, frames: str, request: Request, _caller: Reader
) -> Response:
    [(key, index, ts, count)] = _addressed(
        request,
        [
            Instance.storage_key,
            Instance.frame_index,
            Instance.transfer_syntax_uid,
            Instance.number_of_frames,
        ],
        study,
        series,
        instance,
    )
    accept = request.headers.get("accept", "*/*")
    storage = archive_of(request).storage
    note_access(archive_of(request), [study])
    try:
        found = None
        if index is not None:  # read just the frames' bytes (archive/frames.py)
            found = wado.indexed_frames(
                lambda start, end: storage.open_range(key, start, end),
                index,
                ts,
                count or 1,
                frames,
                accept,
            )
        if found is None:
            found = wado.frames(storage.read(key), frames, accept)
    except wado.FrameError as exc:
        raise DicomwebError(exc.status, exc.message) from exc
    return _multipart(
        [(f"{f.media_type}; transfer-syntax={f.transfer_syntax_uid}", f.data) for f in found]
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    summary="Retrieve the bulk data of one element",
    responses=_RETRIEVE_ERRORS,
)
def retrieve_bulkdata(
    study: str, series: str, instance: str, tag: str, request: Request, _caller: Reader
) -> Response:
    blob = _one_blob(request, study, series, instance)
    try:
        data = wado.bulkdata(blob, tag)
    except wado.FrameError as exc:
        raise DicomwebError(exc.status, exc.message) from exc
    return _multipart([("application/octet-stream", data)])


# --------------------------------------------------------------------------- rendered, thumbnail

_RENDER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_RETRIEVE_ERRORS,
    422: {"description": "the pixel data cannot be decoded"},
}
_THUMBNAIL = (128, 128)


def _render(
    request: Request, row: Instance, frame: int, default_viewport: tuple[int, int] | None = None
) -> Response:
    try:
        opts = rendered.options(
            dict(request.query_params),
            request.headers.get("accept", ""),
            default_viewport=default_viewport,
        )
        image = rendered.render(archive_of(request).storage.read(row.storage_key), frame, opts)
    except rendered.RenderError as exc:
        raise DicomwebError(exc.status, exc.message) from exc
    return Response(
        image, media_type=opts.media_type, headers={"Cache-Control": "private, max-age=3600"}
    )


def _representative(request: Request, study: str, series: str | None) -> Instance:
    """The middle instance of the (first) series: what a thumbnail shows."""
    rows = instances_of(request, study, series, None)
    first_series = rows[0][1]
    in_series = [row for row, series_uid, _ in rows if series_uid == first_series]
    return in_series[len(in_series) // 2]


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="Rendered instance (first frame; JPEG or PNG)",
    responses=_RENDER_ERRORS,
)
def rendered_instance(
    study: str, series: str, instance: str, request: Request, _caller: Reader
) -> Response:
    [(row, _, _)] = instances_of(request, study, series, instance)
    return _render(request, row, 1)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="Rendered frame (JPEG or PNG)",
    responses=_RENDER_ERRORS,
)
def rendered_frame(
    study: str, series: str, instance: str, frame: str, request: Request, _caller: Reader
) -> Response:
    if not frame.isdigit() or len(frame) > 7:
        raise DicomwebError(400, "one frame number (1, 2, ...) is rendered at a time")
    [(row, _, _)] = instances_of(request, study, series, instance)
    return _render(request, row, int(frame))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="Thumbnail of an instance",
    responses=_RENDER_ERRORS,
)
def instance_thumbnail(
    study: str, series: str, instance: str, request: Request, _caller: Reader
) -> Response:
    [(row, _, _)] = instances_of(request, study, series, instance)
    return _render(request, row, 1, _THUMBNAIL)


@router.get(
    "/studies/{study}/series/{series}/thumbnail",
    summary="Thumbnail of a series",
    responses=_RENDER_ERRORS,
)
def series_thumbnail(study: str, series: str, request: Request, _caller: Reader) -> Response:
    return _render(request, _representative(request, study, series), 1, _THUMBNAIL)


@router.get("/studies/{study}/thumbnail", summary="Thumbnail of a study", responses=_RENDER_ERRORS)
def study_thumbnail(study: str, request: Request, _caller: Reader) -> Response:
    return _render(request, _representative(request, study, None), 1, _THUMBNAIL)


# --------------------------------------------------------------------------- study ZIP


@router.get(
    "/studies/{study}/archive",
    summary="Download a study as ZIP (DICOM files + DICOMDIR)",
    responses={**_RETRIEVE_ERRORS, 200: {"content": {"application/zip": {}}}},
)
def study_archive(study: str, request: Request, _caller: Downloader) -> StreamingResponse:
    rows = instances_of(request, study, None, None)
    archive_of(request).tiering.ensure_rows_readable([row for row, _, _ in rows])
    note_access(archive_of(request), [study])
    objects = [(row.sop_instance_uid, row.storage_key) for row, _, _ in rows]
    return StreamingResponse(
        export.study_zip(archive_of(request).storage, objects),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{study}.zip"'},
    )


# --------------------------------------------------------------------------- capabilities


def _wadl(request: Request) -> Response:
    """PS3.18 8.9: the service description as WADL, built from the routes themselves."""
    resources: dict[str, list[tuple[str, str]]] = {}
    for route in router.routes:
        if isinstance(route, APIRoute):
            relative = route.path.removeprefix("/dicom-web") or "/"
            for method in sorted(route.methods or ()):
                resources.setdefault(relative, []).append((method, route.summary or ""))
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<application xmlns="http://wadl.dev.java.net/2009/02">',
        f'  <resources base="{xml_escape(base_url(request))}">',
    ]
    for path in sorted(resources):
        lines.append(f'    <resource path="{xml_escape(path)}">')
        for method, summary in resources[path]:
            lines.append(f'      <method name="{method}"><doc>{xml_escape(summary)}</doc></method>')
        lines.append("    </resource>")
    lines += ["  </resources>", "</application>"]
    return Response("\n".join(lines) + "\n", media_type="application/vnd.sun.wadl+xml")


@router.get("/capabilities", summary="The services offered (WADL, PS3.18 8.9)", responses=_ERRORS)
def capabilities(request: Request, _caller: SignedIn) -> Response:
    return _wadl(request)


@router.options("", summary="The services offered (WADL, PS3.18 8.9)", responses=_ERRORS)
def capabilities_options(request: Request, _caller: SignedIn) -> Response:
    return _wadl(request)
