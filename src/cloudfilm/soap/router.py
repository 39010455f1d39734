"""The query WebService's two doors over the same queries (issue 7, item 5).

* HTTP/JSON: ``POST /api/webservice/exams`` (exam list) and ``POST /api/webservice/exam``
  (one exam's status and report); body and answer are envelopes (:mod:`.client`).
* SOAP 1.1 (document/literal): ``POST /api/webservice/soap`` with the operations
  ``QueryExams`` and ``GetExam``; the WSDL at ``GET /api/webservice/soap?wsdl``.

Both doors need the client's bearer token (OAuth2 client credentials) *and* an envelope
sealed with the client's key; the caller's data scope applies as in QIDO-RS and FHIR.
Each call is audited, refusals included (``note``; the audit middleware writes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import BadRequest, Conflict, NotFound
from cloudfilm.httpaudit import note
from cloudfilm.soap import service, wsdl
from cloudfilm.soap.client import REQUEST_FIELDS, EnvelopeOpenError, open_envelope, seal

router = APIRouter(prefix="/api/webservice", tags=["WebService"])
Searcher = Annotated[Principal, Depends(Permit(Permission.STUDY_SEARCH))]
Reader = Annotated[Principal, Depends(Permit(Permission.STUDY_READ))]

#: Largest SOAP request taken (an envelope of query parameters is well under 4 KB).
MAX_SOAP_BYTES = 64 * 1024

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the result, in a response envelope"},
    400: {"description": "plaintext parameters, malformed envelope, invalid parameters"},
    401: {
        "description": "no or invalid token; unknown client, wrong key id, timestamp out "
        "of the window, authentication failed, replayed nonce"
    },
    403: {"description": "not permitted"},
    404: {"description": "no such exam in the caller's data scope (GetExam)"},
    409: {"description": "the accession number names several exams (GetExam)"},
}


class Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_PLAINTEXT = (
    "参数必须加密，拒绝明文参数 · plaintext parameters refused: send the envelope "
    "{client_id, key_id, timestamp, nonce, ciphertext} (docs/webservice.md)"
)


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    permission: Permission
    action: AuditAction


EXAMS = Operation("QueryExams", Permission.STUDY_SEARCH, AuditAction.EXECUTE)
EXAM = Operation("GetExam", Permission.STUDY_READ, AuditAction.READ)
OPERATIONS = {op.name: op for op in (EXAMS, EXAM)}


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _base(request: Request) -> str:
    public = _archive(request).settings.http.public_url
    return (public or str(request.base_url)).rstrip("/")


def _check_envelope(body: Any) -> dict[str, Any]:
    if body is None or body in ("", b""):
        raise Refusal(400, "malformed_envelope", "请求体为空 · empty body: send the envelope")
    if not isinstance(body, dict):  # a form, a query string, plain text: not an envelope
        raise Refusal(400, "plaintext_refused", _PLAINTEXT)
    envelope: dict[str, Any] = dict(body)
    extra = set(envelope) - set(REQUEST_FIELDS)
    if extra or "ciphertext" not in envelope:
        raise Refusal(400, "plaintext_refused", _PLAINTEXT)
    missing = [f for f in REQUEST_FIELDS if f not in envelope]
    if missing:
        raise Refusal(
            400, "malformed_envelope", f"信封缺少字段 · envelope lacks {', '.join(missing)}"
        )
    timestamp = envelope["timestamp"]
    if isinstance(timestamp, str) and timestamp.strip().lstrip("-").isdigit():
        envelope = {**envelope, "timestamp": int(timestamp)}  # SOAP carries text
    elif not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise Refusal(400, "malformed_envelope", "timestamp 应为整数秒 · timestamp is Unix seconds")
    for name in ("client_id", "key_id", "nonce", "ciphertext"):
        if not isinstance(envelope[name], str) or not envelope[name]:
            raise Refusal(400, "malformed_envelope", f"{name} 应为非空字符串 · {name} is a string")
    if len(envelope["nonce"]) > 32 or len(envelope["ciphertext"]) > 16384:
        raise Refusal(
            400, "malformed_envelope", "nonce 或 ciphertext 过长 · nonce or ciphertext too long"
        )
    return envelope


def _open(
    request: Request, caller: Principal, envelope: Any
) -> tuple[dict[str, Any], Any, service.ClientKey]:
    """Check the envelope in order (form, client, key, time, tag, nonce) and open it."""
    checked = _check_envelope(envelope)
    archive = _archive(request)
    client_id = checked["client_id"]
    with archive.db.read_session() as session:
        key = service.key_of(session=session, settings=archive.settings, name=client_id)
    if key is None or client_id != caller.name or caller.user_id is not None:
        raise Refusal(
            401, "unknown_client",
            "未知客户端 · unknown client: client_id must be the API client of the bearer token",
        )  # fmt: skip
    settings = archive.settings.webservice
    if checked["key_id"] != key.key_id:
        raise Refusal(
            401, "wrong_key_id",
            "密钥标识不符 · key_id is not this client's current key; ask the administrator "
            "for it (cloudfilm client webservice-key NAME)",
        )  # fmt: skip
    now = request.app.state.accounts.clock.now()
    skew = settings.max_clock_skew_seconds
    if abs(now.timestamp() - checked["timestamp"]) > skew:
        raise Refusal(
            401, "stale_timestamp",
            f"时间戳超出允许范围（±{skew}秒） · timestamp more than {skew} s from the "
            "server's clock: sync the caller's clock (NTP)",
        )  # fmt: skip
    try:
        params = open_envelope(checked, key=key.key)
    except EnvelopeOpenError:
        raise Refusal(
            401, "authentication_failed",
            "认证失败 · authentication failed: ciphertext or associated data altered, or "
            "sealed under another key",
        ) from None  # fmt: skip
    fresh = service.take_nonce(
        db=archive.db, client_id=client_id, nonce=checked["nonce"],
        expires_at=service.expiry(checked["timestamp"], skew), now=now,
    )  # fmt: skip
    if not fresh:
        raise Refusal(
            401, "replayed",
            "重放请求被拒绝 · replayed request: this nonce was used before; seal every "
            "request with a fresh nonce",
        )  # fmt: skip
    return checked, params, key


def _answer(
    request: Request, caller: Principal, operation: Operation, envelope: Any, door: str
) -> dict[str, Any]:
    """The response envelope of one call, or :class:`Refusal`; audited either way."""
    detail: dict[str, Any] = {"door": door}
    try:
        if not caller.may(operation.permission):
            wanted = operation.permission
            raise Refusal(
                403, "forbidden", f"无此权限 · not permitted: {wanted.label} ({wanted.value})"
            )
        if request.query_params:  # parameters in the URL reach proxy and server logs
            raise Refusal(400, "plaintext_refused", _PLAINTEXT)
        checked, params, key = _open(request, caller, envelope)
        result, patient_id, study_uid = _run(request, caller, operation, params)
    except Refusal as refusal:
        detail["refused"] = refusal.code
        event = (
            AuditEventType.AUTHENTICATION_FAILED if refusal.status == 401 else AuditEventType.QUERY
        )
        note(request, event, operation.action, "webservice", operation.name, detail=detail)
        raise
    note(
        request, AuditEventType.QUERY, operation.action, "webservice", operation.name,
        patient_id=patient_id, study_instance_uid=study_uid, detail=detail,
    )  # fmt: skip
    now = request.app.state.accounts.clock.now()
    return seal(
        {"operation": operation.name, "result": result}, client_id=key.client_id, key=key.key,
        key_id=key.key_id, reply_to=checked["nonce"], timestamp=int(now.timestamp()),
    )  # fmt: skip


def _run(
    request: Request, caller: Principal, operation: Operation, params: Any
) -> tuple[Any, str | None, str | None]:
    links = service.Links(_base(request) + "/dicom-web", _base(request) + "/ohif/viewer")
    try:
        with _archive(request).db.read_session() as session:
            if operation is EXAMS:
                exams = service.find_exams(
                    session=session, query=service.parse(service.ExamsQuery, params),
                    scope=caller.study_scope, links=links,
                )  # fmt: skip
                patients = {e["patient"]["patient_id"] for e in exams}
                return {"exams": exams}, (patients.pop() if len(patients) == 1 else None), None
            exam = service.find_exam(
                session=session, query=service.parse(service.ExamQuery, params),
                scope=caller.study_scope, links=links,
            )  # fmt: skip
            return exam, exam["patient"]["patient_id"] or None, exam["study_instance_uid"]
    except BadRequest as exc:
        raise Refusal(400, "invalid_parameters", str(exc)) from None
    except NotFound as exc:
        raise Refusal(404, "not_found", str(exc)) from None
    except Conflict as exc:
        raise Refusal(409, "ambiguous", str(exc)) from None


def _json_refusal(refusal: Refusal) -> JSONResponse:
    return JSONResponse(
        {"error": refusal.code, "message": refusal.message},
        status_code=refusal.status,
        headers={"Cache-Control": "no-store"},
    )


_NO_STORE = {"Cache-Control": "no-store"}


# ------------------------------------------------------------------ HTTP/JSON door


@router.post(
    "/exams",
    summary="Exam list by patient identifier or accession number (encrypted envelope)",
    responses=_RESPONSES,
)
def query_exams(
    request: Request, caller: Searcher, envelope: Annotated[Any, Body()] = None
) -> JSONResponse:
    try:
        return JSONResponse(_answer(request, caller, EXAMS, envelope, "json"), headers=_NO_STORE)
    except Refusal as refusal:
        return _json_refusal(refusal)


@router.post(
    "/exam",
    summary="One exam's status, images and report (encrypted envelope)",
    responses=_RESPONSES,
)
def get_exam(
    request: Request, caller: Reader, envelope: Annotated[Any, Body()] = None
) -> JSONResponse:
    try:
        return JSONResponse(_answer(request, caller, EXAM, envelope, "json"), headers=_NO_STORE)
    except Refusal as refusal:
        return _json_refusal(refusal)


# ------------------------------------------------------------------ SOAP 1.1 door


@router.get(
    "/soap",
    summary="The WSDL of the SOAP door (?wsdl)",
    responses={200: {"content": {"text/xml": {}}}, 401: {"description": "no or invalid token"}},
)
def soap_wsdl(request: Request, _caller: Searcher) -> Response:
    note(request, AuditEventType.QUERY, AuditAction.READ, "webservice", "wsdl")
    return Response(wsdl.document(_base(request) + "/api/webservice/soap"), media_type="text/xml")


@router.post(
    "/soap",
    summary="SOAP 1.1 door: QueryExams and GetExam (document/literal, encrypted envelope)",
    responses={**_RESPONSES, 200: {"content": {"text/xml": {}}}},
)
async def soap(request: Request, caller: Searcher) -> Response:
    body = await request.body()
    return await run_in_threadpool(_soap, request, caller, body)


def _soap(request: Request, caller: Principal, body: bytes) -> Response:
    operation = EXAMS
    try:
        name, envelope = wsdl.parse_request(body, MAX_SOAP_BYTES)
        operation = OPERATIONS[name]
        answer = _answer(request, caller, operation, envelope, "soap")
    except wsdl.SOAPError as exc:
        refusal = Refusal(400, exc.code, exc.message)
        detail = {"door": "soap", "refused": refusal.code}
        note(
            request, AuditEventType.QUERY, AuditAction.EXECUTE, "webservice", "soap", detail=detail
        )
        return _soap_fault(refusal)
    except Refusal as refusal:
        return _soap_fault(refusal)
    return Response(
        wsdl.response(operation.name, answer),
        media_type="text/xml; charset=utf-8",
        headers=_NO_STORE,
    )


def _soap_fault(refusal: Refusal) -> Response:
    # SOAP 1.1 asks for HTTP 500 on every fault; the door answers the JSON door's status
    # instead (as SOAP 1.2 does for Sender faults), so that proxies, the audit outcome and
    # monitoring tell a refused request from a server failure. The body is a standard Fault.
    return Response(
        wsdl.fault(refusal.code, refusal.message, server=refusal.status >= 500),
        status_code=refusal.status,
        media_type="text/xml; charset=utf-8",
        headers=_NO_STORE,
    )
