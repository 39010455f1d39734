"""Notifications over HTTP: delivery receipts from the platforms, and the console's list.

``POST /api/notify/receipts/{driver}`` (``http``, ``aliyun``, ``wechat``) is called by the
platforms, not by users: it is open to the network but accepts a receipt only with the
shared ``notify.receipt_token`` in ``X-Notify-Token``, or with the platform's signature
(``http``: HMAC-SHA256 of the body with ``notify.http.hmac_secret``; ``wechat``: the
Official Account's ``signature`` over ``callback_token``, ``timestamp`` and ``nonce``).
Each request leaves one audit record (``notification-receipt``: counts and the
notifications changed; a refused one as ``authentication-failed``).

``GET /api/notify/messages`` lists messages for the system administrator
(``notify:read``), recipients masked, never a message's text.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.config import NotifySettings
from cloudfilm.errors import BadRequest, NotFound
from cloudfilm.httpaudit import note
from cloudfilm.notify import service
from cloudfilm.notify.drivers import dig, sign_body
from cloudfilm.notify.enums import NotifyState
from cloudfilm.notify.service import Receipt

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

router = APIRouter(prefix="/api/notify", tags=["notify"])

_Reader = Annotated[Principal, Depends(Permit(Permission.NOTIFY_READ))]
_PUBLIC = Depends(Permit.public_route())
_DRIVERS = ("http", "aliyun", "wechat")
_MAX_BODY = 1024 * 1024
_MAX_SKEW = 300
_CHINA = ZoneInfo("Asia/Shanghai")
_TOKEN_HEADER = "x-notify-token"
_RECEIPT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a receipt that cannot be read"},
    401: {"description": "no valid X-Notify-Token and no valid signature"},
    404: {"description": "no such driver"},
    413: {"description": "body over 1 MiB"},
}


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _token_ok(settings: NotifySettings, request: Request) -> bool:
    expected = settings.receipt_token
    sent = request.headers.get(_TOKEN_HEADER)
    if expected is None or not sent:
        return False
    return secrets.compare_digest(sent.encode(), expected.get_secret_value().encode())


def _http_signature_ok(settings: NotifySettings, request: Request, body: bytes) -> bool:
    s = settings.http
    if s.hmac_secret is None:
        return False
    timestamp = request.headers.get(s.hmac_timestamp_header, "")
    sent = request.headers.get(s.hmac_header, "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > _MAX_SKEW or not sent:
        return False
    expected = sign_body(s.hmac_secret.get_secret_value(), timestamp, body)
    return secrets.compare_digest(sent.lower(), expected)


def wechat_signature(token: str, timestamp: str, nonce: str) -> str:
    """SHA-1 of the sorted, concatenated token, timestamp and nonce (WeChat server URL
    verification and event pushes)."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce])).encode()).hexdigest()


def _wechat_signature_ok(settings: NotifySettings, request: Request) -> bool:
    token = settings.wechat.callback_token
    params = request.query_params
    timestamp, nonce = params.get("timestamp", ""), params.get("nonce", "")
    sent = params.get("signature", "")
    if token is None or not (timestamp.isdigit() and nonce and sent):
        return False
    if abs(time.time() - int(timestamp)) > _MAX_SKEW:
        return False
    expected = wechat_signature(token.get_secret_value(), timestamp, nonce)
    return hmac.compare_digest(sent, expected)


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest("回执不是 JSON · the receipt is not JSON") from exc


def _http_receipts(settings: NotifySettings, body: bytes) -> list[Receipt]:
    s = settings.http
    data = _json_body(body)
    items = data if isinstance(data, list) else [data]
    receipts = []
    for item in items:
        message_id = dig(item, s.receipt_id_field)
        status = dig(item, s.receipt_status_field)
        if message_id is None or status is None:
            raise BadRequest(
                f"回执缺少 {s.receipt_id_field} 或 {s.receipt_status_field} · the receipt "
                f"lacks {s.receipt_id_field} or {s.receipt_status_field}"
            )
        delivered = str(status) in s.receipt_delivered_values
        receipts.append(Receipt(str(message_id), delivered, str(status)))
    return receipts


def _china_time(value: Any) -> datetime | None:
    try:
        moment = datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return moment.replace(tzinfo=_CHINA).astimezone(UTC)


def _aliyun_receipts(body: bytes) -> list[Receipt]:
    """Alibaba Cloud SMS ``SmsReport`` HTTP push: a JSON array of reports with ``biz_id``,
    ``success``, ``err_code``, ``report_time`` (China time)."""
    data = _json_body(body)
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        raise BadRequest("回执应为 JSON 数组 · SmsReport is a JSON array of reports")
    return [
        Receipt(
            str(item.get("biz_id", "")),
            item.get("success") is True,
            str(item.get("err_code", "")),
            _china_time(item.get("report_time")),
        )
        for item in data
    ]


def _wechat_receipts(body: bytes) -> list[Receipt]:
    """The ``TEMPLATESENDJOBFINISH`` event push (plain-text mode): ``MsgID`` and
    ``Status`` (``success``, ``failed:user block``, ``failed: system failed``)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise BadRequest("回执含有 DTD · the event carries a DTD: refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadRequest("回执不是 XML · the event is not XML") from exc
    event = (root.findtext("Event") or "").strip()
    if event != "TEMPLATESENDJOBFINISH":
        return []
    status = (root.findtext("Status") or "").strip()
    created = (root.findtext("CreateTime") or "").strip()
    at = datetime.fromtimestamp(int(created), UTC) if created.isdigit() else None
    return [Receipt((root.findtext("MsgID") or "").strip(), status == "success", status, at)]


def _answer(driver: str) -> Response:
    if driver == "aliyun":
        return JSONResponse({"code": 0, "msg": "接收成功"})
    if driver == "wechat":
        return PlainTextResponse("success")
    return JSONResponse({"status": "ok"})


@router.post(
    "/receipts/{driver}",
    summary="Delivery receipts from the SMS platform or WeChat (token or signature)",
    responses=_RECEIPT_ERRORS,
    dependencies=[_PUBLIC],
)
async def receipts(request: Request, driver: str) -> Response:
    if driver not in _DRIVERS:
        raise NotFound(
            f"没有名为 {driver[:32]} 的通知驱动 · no notification driver {driver[:32]!r}"
        )
    archive = _archive(request)
    settings = archive.settings.notify
    body = await request.body()
    if len(body) > _MAX_BODY:
        return JSONResponse(
            {"error": "too_large", "message": "回执过大 · receipt body over 1 MiB"},
            status_code=413,
        )
    signed = (driver == "http" and _http_signature_ok(settings, request, body)) or (
        driver == "wechat" and _wechat_signature_ok(settings, request)
    )
    if not (signed or _token_ok(settings, request)):
        refused = {"driver": driver, "refused": "no valid token or signature"}
        note(request, AuditEventType.NOTIFICATION_RECEIPT, AuditAction.UPDATE, "notify-receipt",
             driver, detail=refused)  # fmt: skip
        return JSONResponse(
            {
                "error": "unauthorized",
                "message": "回执未通过认证 · receipt refused: send X-Notify-Token or sign it",
            },
            status_code=401,
        )
    try:
        if driver == "http":
            parsed = _http_receipts(settings, body)
        elif driver == "aliyun":
            parsed = _aliyun_receipts(body)
        else:
            parsed = _wechat_receipts(body)
    except BadRequest as exc:
        note(request, AuditEventType.NOTIFICATION_RECEIPT, AuditAction.UPDATE, "notify-receipt",
             driver, detail={"driver": driver, "refused": str(exc)})  # fmt: skip
        raise

    def apply() -> dict[str, Any]:
        with archive.db.session() as session:
            return service.record_receipts(session, driver=driver, receipts=parsed)

    summary = await run_in_threadpool(apply)
    note(request, AuditEventType.NOTIFICATION_RECEIPT, AuditAction.UPDATE, "notify-receipt",
         driver, detail=summary)  # fmt: skip
    return _answer(driver)


@router.get(
    "/receipts/{driver}",
    summary="WeChat server URL verification (echoes echostr when the signature is valid)",
    responses=_RECEIPT_ERRORS,
    dependencies=[_PUBLIC],
)
def verify_url(request: Request, driver: str) -> Response:
    if driver != "wechat":
        raise NotFound(
            f"没有名为 {driver[:32]} 的通知驱动 · no notification driver {driver[:32]!r}"
        )
    if not _wechat_signature_ok(_archive(request).settings.notify, request):
        return JSONResponse(
            {"error": "unauthorized", "message": "签名无效 · invalid signature"}, status_code=401
        )
    return PlainTextResponse(request.query_params.get("echostr", "")[:128])


@router.get(
    "/messages",
    summary="SMS and WeChat messages, newest first (recipients masked)",
    responses={
        401: {"description": "not signed in"},
        403: {"description": "not permitted (notify:read)"},
    },
)
def messages(
    request: Request,
    _caller: _Reader,
    state: Annotated[NotifyState | None, Query(description="only this state")] = None,
    channel: Annotated[str | None, Query(pattern="^(sms|wechat)$")] = None,
    object_type: Annotated[str | None, Query(max_length=32)] = None,
    object_id: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    note(request, AuditEventType.QUERY, AuditAction.READ, "notification", None,
         detail={"state": state, "channel": channel})  # fmt: skip
    with _archive(request).db.read_session() as session:
        return service.list_messages(
            session,
            state=state.value if state else None,
            channel=channel,
            object_type=object_type,
            object_id=object_id,
            limit=limit,
            offset=offset,
        )
