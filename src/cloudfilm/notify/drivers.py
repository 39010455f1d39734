"""The drivers that hand one message to a platform: a generic HTTP SMS platform, Alibaba
Cloud SMS and the WeChat Official Account template message.

A driver's :meth:`~Driver.send` returns the platform's message id, or raises
:class:`SendError` saying whether a later attempt may succeed (a timeout, a 5xx, a
throttle) or not (the platform refused the message itself). Drivers log no recipient and
no text: those are personal data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from cloudfilm.config import HttpBodyFormat, NotifySettings


class SendError(Exception):
    """A send attempt failed; ``retry`` tells whether another attempt may succeed."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message as a driver sends it (recipient and texts opened)."""

    to: str
    template: str
    variables: dict[str, str]
    text: str
    """The rendered SMS text without the signature."""
    template_code: str | None = None
    wechat_template_id: str | None = None
    wechat_data: dict[str, str] = field(default_factory=dict)
    wechat_url: str = ""


class Driver(Protocol):
    name: str

    def send(self, message: Outgoing) -> str:
        """Hand ``message`` to the platform; its message id."""
        ...


def dig(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for ``a.b``; ``None`` when absent (a list takes its first item)."""
    for part in path.split("."):
        if isinstance(data, list):
            data = data[0] if data else None
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _status_error(response: httpx.Response, platform: str) -> SendError:
    status = response.status_code
    retry = status >= 500 or status in (408, 429)
    return SendError(f"{platform} answered HTTP {status}", retry=retry)


def _request(client: httpx.Client, platform: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(**kwargs)
    except httpx.TimeoutException as exc:
        raise SendError(f"{platform} did not answer in time", retry=True) from exc
    except httpx.TransportError as exc:
        raise SendError(f"{platform} unreachable: {type(exc).__name__}", retry=True) from exc


def _json(response: httpx.Response, platform: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise SendError(f"{platform} answered something that is not JSON", retry=True) from exc


def sign_body(secret: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp + "\\n" + body`` (the ``http`` driver's signature)."""
    return hmac.new(secret.encode(), timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


class HttpSmsDriver:
    """A generic SMS platform over HTTP: field names, body format, authentication and how
    the answer is read all come from ``notify.http``."""

    name = "http"

    def __init__(self, settings: NotifySettings, client: httpx.Client) -> None:
        self.settings = settings
        self.http = settings.http
        self.client = client

    def send(self, message: Outgoing) -> str:
        s = self.http
        if not s.url:
            raise SendError("notify.http.url is not set", retry=True)
        fields: dict[str, str] = dict(s.extra_fields)
        fields[s.phone_field] = message.to
        signature = self.settings.sms_signature
        if s.text_field:
            prefix = f"【{signature}】" if signature and not s.signature_field else ""
            fields[s.text_field] = prefix + message.text
        if s.signature_field:
            fields[s.signature_field] = signature
        if s.template_field and message.template_code:
            fields[s.template_field] = message.template_code
        if s.variables_field:
            fields[s.variables_field] = json.dumps(message.variables, ensure_ascii=False)
        headers: dict[str, str] = {}
        if s.auth_value is not None:
            headers[s.auth_header] = s.auth_value.get_secret_value()
        method = s.method.upper()
        request: dict[str, Any] = {"method": method, "url": s.url, "timeout": s.timeout_seconds}
        if method == "GET":
            request["params"] = fields
            body = httpx.QueryParams(fields).__str__().encode()
        elif s.body_format is HttpBodyFormat.JSON:
            body = json.dumps(fields, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json; charset=utf-8"
            request["content"] = body
        else:
            body = httpx.QueryParams(fields).__str__().encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
            request["content"] = body
        if s.hmac_secret is not None:
            timestamp = str(int(time.time()))
            headers[s.hmac_timestamp_header] = timestamp
            headers[s.hmac_header] = sign_body(s.hmac_secret.get_secret_value(), timestamp, body)
        response = _request(self.client, "SMS platform", headers=headers, **request)
        if response.status_code >= 300:
            raise _status_error(response, "SMS platform")
        answer = _json(response, "SMS platform")
        outcome = dig(answer, s.success_field)
        if str(outcome) != s.success_value:
            raise SendError(f"SMS platform refused the message: {s.success_field}={outcome!s:.80}",
                            retry=False)  # fmt: skip
        message_id = dig(answer, s.message_id_field)
        return str(message_id) if message_id is not None else ""


def aliyun_percent_encode(value: str) -> str:
    """RFC 3986 encoding as the RPC signature wants it: only ``A-Z a-z 0-9 - _ . ~`` stay,
    a space is ``%20``, ``*`` is ``%2A``."""
    return quote(value, safe="~")


def aliyun_signature(method: str, params: dict[str, str], secret: str) -> str:
    """Signature of an Alibaba Cloud RPC request (signature method HMAC-SHA1, version 1.0):
    Base64(HMAC-SHA1(secret + "&", method & %2F & encode(sorted, encoded query)))."""
    canonical = "&".join(
        f"{aliyun_percent_encode(k)}={aliyun_percent_encode(v)}" for k, v in sorted(params.items())
    )
    to_sign = f"{method}&{aliyun_percent_encode('/')}&{aliyun_percent_encode(canonical)}"
    digest = hmac.new((secret + "&").encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


#: SendSms codes that a later attempt may get past (flow control, throttling).
_ALIYUN_RETRY = ("isv.BUSINESS_LIMIT_CONTROL", "Throttling", "ServiceUnavailable", "InternalError")


class AliyunSmsDriver:
    """Alibaba Cloud SMS ``SendSms`` (RPC API, version 2017-05-25), POSTed as a form."""

    name = "aliyun"

    def __init__(self, settings: NotifySettings, client: httpx.Client) -> None:
        self.settings = settings
        self.aliyun = settings.aliyun
        self.client = client

    def send(self, message: Outgoing) -> str:
        a = self.aliyun
        if not a.access_key_id or a.access_key_secret is None:
            raise SendError("notify.aliyun access key not set", retry=True)
        if not message.template_code:
            raise SendError(f"template {message.template} has no sms_code", retry=False)
        params = {
            "AccessKeyId": a.access_key_id,
            "Action": "SendSms",
            "Format": "JSON",
            "RegionId": a.region_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": uuid.uuid4().hex,
            "SignatureVersion": "1.0",
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Version": "2017-05-25",
            "PhoneNumbers": message.to,
            "SignName": self.settings.sms_signature,
            "TemplateCode": message.template_code,
            "TemplateParam": json.dumps(message.variables, ensure_ascii=False),
        }
        params["Signature"] = aliyun_signature(
            "POST", params, a.access_key_secret.get_secret_value()
        )
        body = "&".join(f"{aliyun_percent_encode(k)}={aliyun_percent_encode(v)}"
                        for k, v in params.items())  # fmt: skip
        response = _request(
            self.client,
            "Alibaba Cloud SMS",
            method="POST",
            url=a.endpoint,
            content=body.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=a.timeout_seconds,
        )
        if response.status_code >= 500:
            raise _status_error(response, "Alibaba Cloud SMS")
        answer = _json(response, "Alibaba Cloud SMS")
        code = str(answer.get("Code", "")) if isinstance(answer, dict) else ""
        if code != "OK":
            retry = code.startswith(_ALIYUN_RETRY)
            raise SendError(f"Alibaba Cloud SMS refused: {code or response.status_code}",
                            retry=retry)  # fmt: skip
        return str(answer.get("BizId", ""))


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


class _TokenCache:
    """Access tokens per (API root, AppID), shared by the process's dispatchers: WeChat
    allows only a few thousand token requests a day and a new token voids the old one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[tuple[str, str], _Token] = {}


_TOKENS = _TokenCache()

#: errcodes that mean the access token is stale: fetch a new one and try once more.
_STALE_TOKEN = frozenset({40001, 40014, 42001})
#: errcodes a later attempt may get past (system busy, API rate limit).
_WECHAT_RETRY = frozenset({-1, 45009, 45011})


class WechatDriver:
    """WeChat Official Account template messages (``/cgi-bin/message/template/send``)."""

    name = "wechat"

    def __init__(self, settings: NotifySettings, client: httpx.Client) -> None:
        self.wechat = settings.wechat
        self.client = client

    def _key(self) -> tuple[str, str]:
        return (self.wechat.base_url.rstrip("/"), self.wechat.app_id or "")

    def access_token(self, *, fresh: bool = False) -> str:
        """The cached token, or a new one from ``/cgi-bin/token`` when expired or stale."""
        w = self.wechat
        if not w.app_id or w.app_secret is None:
            raise SendError("notify.wechat app_id / app_secret not set", retry=True)
        key = self._key()
        with _TOKENS.lock:
            token = _TOKENS.tokens.get(key)
            if token is not None and not fresh and token.expires > time.monotonic():
                return token.value
            response = _request(
                self.client,
                "WeChat",
                method="GET",
                url=f"{key[0]}/cgi-bin/token",
                params={
                    "grant_type": "client_credential",
                    "appid": w.app_id,
                    "secret": w.app_secret.get_secret_value(),
                },
                timeout=w.timeout_seconds,
            )
            if response.status_code >= 300:
                raise _status_error(response, "WeChat")
            answer = _json(response, "WeChat")
            value = answer.get("access_token") if isinstance(answer, dict) else None
            if not value:
                code = answer.get("errcode") if isinstance(answer, dict) else None
                raise SendError(f"WeChat gave no access token (errcode {code})", retry=True)
            # Renew a minute early: a token that expires in flight fails the send.
            lifetime = float(answer.get("expires_in", 7200))
            _TOKENS.tokens[key] = _Token(str(value), time.monotonic() + max(0.0, lifetime - 60))
            return str(value)

    def send(self, message: Outgoing) -> str:
        if not message.wechat_template_id:
            raise SendError(f"template {message.template} has no wechat_template_id", retry=False)
        payload: dict[str, Any] = {
            "touser": message.to,
            "template_id": message.wechat_template_id,
            "data": {k: {"value": v} for k, v in message.wechat_data.items()},
        }
        if message.wechat_url:
            payload["url"] = message.wechat_url
        body = json.dumps(payload, ensure_ascii=False).encode()
        for fresh in (False, True):
            token = self.access_token(fresh=fresh)
            response = _request(
                self.client,
                "WeChat",
                method="POST",
                url=f"{self._key()[0]}/cgi-bin/message/template/send",
                params={"access_token": token},
                content=body,
                headers={"Content-Type": "application/json; charset=utf-8"},
                timeout=self.wechat.timeout_seconds,
            )
            if response.status_code >= 300:
                raise _status_error(response, "WeChat")
            answer = _json(response, "WeChat")
            code = int(answer.get("errcode", 0)) if isinstance(answer, dict) else -1
            if code == 0:
                return str(answer.get("msgid", ""))
            if code in _STALE_TOKEN and not fresh:
                continue
            raise SendError(f"WeChat refused the message (errcode {code})",
                            retry=code in _WECHAT_RETRY or code in _STALE_TOKEN)  # fmt: skip
        raise AssertionError("unreachable")


def forget_tokens() -> None:
    """Drop every cached WeChat access token (tests, a changed AppSecret)."""
    with _TOKENS.lock:
        _TOKENS.tokens.clear()
