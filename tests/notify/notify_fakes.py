"""Local stand-ins for the platforms the outbox talks to, each a real HTTP server on
loopback (a thread, a free port) that speaks the platform's protocol, checks what the
platform checks (credentials, signatures, tokens) and records what it received.

* :class:`SmsPlatform`: a generic SMS platform (JSON or form, bearer token, HMAC-SHA256);
* :class:`AliyunSms`: Alibaba Cloud SMS ``SendSms`` (RPC, signature method HMAC-SHA1,
  version 2017-05-25), the signature recomputed from the received parameters exactly as
  the documentation describes;
* :class:`WechatApi`: ``/cgi-bin/token`` and ``/cgi-bin/message/template/send``, tokens
  that the test can expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from conftest import free_port


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class _Base:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    script: list[str] = field(default_factory=list)
    """What to do with the next requests, in order: ``ok``, ``500``, ``timeout`` (answer
    after ``slow_seconds``), ``refuse``; empty: ``ok``."""
    slow_seconds: float = 2.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else "ok"

    def handle(self, request: Received) -> tuple[int, Any]:
        raise NotImplementedError


@contextmanager
def serving(fake: _Base) -> Iterator[_Base]:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Received(
                self.command,
                parts.path,
                dict(parse_qsl(parts.query, keep_blank_values=True)),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            with fake.lock:
                fake.received.append(request)
            status, answer = fake.handle(request)
            data = json.dumps(answer, ensure_ascii=False).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

        do_GET = do_POST = _any

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class SmsPlatform(_Base):
    """``POST /send`` with ``mobile``/``content`` (JSON); checks the bearer token and, when
    ``hmac_secret`` is set, ``X-Signature`` = HMAC-SHA256(timestamp + "\\n" + body)."""

    token: str = "platform-token"
    hmac_secret: str | None = None
    sent: int = 0

    def handle(self, request: Received) -> tuple[int, Any]:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"code": 401, "message": "bad token"}
        if self.hmac_secret is not None:
            stamp = request.headers.get("x-timestamp", "")
            mac = hmac.new(self.hmac_secret.encode(), stamp.encode() + b"\n" + request.body,
                           hashlib.sha256).hexdigest()  # fmt: skip
            if not hmac.compare_digest(mac, request.headers.get("x-signature", "")):
                return 403, {"code": 403, "message": "bad signature"}
        action = self.next_action()
        if action == "500":
            return 500, {"code": 500, "message": "internal error"}
        if action == "timeout":
            time.sleep(self.slow_seconds)
        if action == "refuse":
            return 200, {"code": 17, "message": "blacklisted"}
        with self.lock:
            self.sent += 1
            number = self.sent
        return 200, {"code": 0, "data": {"sid": f"sid-{number}"}}


def _encode(value: str) -> str:
    # The documentation's rule: UTF-8, then percent-encode all but A-Z a-z 0-9 - _ . ~
    # ("+" → %20, "*" → %2A, "%7E" → "~"), upper-case hex.
    return quote(value.encode("utf-8"), safe="-_.~")


@dataclass
class AliyunSms(_Base):
    """The RPC endpoint of ``SendSms``: common parameters, a fresh SignatureNonce, the
    timestamp within 15 minutes, and the signature recomputed from what was received."""

    access_key_id: str = "LTAI-test"
    access_key_secret: str = "aliyun-secret-for-tests"
    nonces: set[str] = field(default_factory=set)
    sent: int = 0

    def expected_signature(self, method: str, params: dict[str, str]) -> str:
        pairs = sorted((k, v) for k, v in params.items() if k != "Signature")
        canonical = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in pairs)
        string_to_sign = method + "&" + _encode("/") + "&" + _encode(canonical)
        key = (self.access_key_secret + "&").encode()
        return base64.b64encode(
            hmac.new(key, string_to_sign.encode(), hashlib.sha1).digest()
        ).decode()

    def handle(self, request: Received) -> tuple[int, Any]:
        params = request.form() if request.method == "POST" else dict(request.query)
        fixed = {"Action": "SendSms", "Version": "2017-05-25", "Format": "JSON",
                 "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0"}  # fmt: skip
        for key, value in fixed.items():
            if params.get(key) != value:
                return 400, {"Code": "MissingParameter", "Message": key}
        if params.get("AccessKeyId") != self.access_key_id:
            return 404, {"Code": "InvalidAccessKeyId.NotFound"}
        stamp = time.strptime(params.get("Timestamp", ""), "%Y-%m-%dT%H:%M:%SZ")
        if abs(time.mktime(stamp) - time.mktime(time.gmtime())) > 900:
            return 400, {"Code": "InvalidTimeStamp.Expired"}
        nonce = params.get("SignatureNonce", "")
        with self.lock:
            if not nonce or nonce in self.nonces:
                return 400, {"Code": "SignatureNonceUsed"}
            self.nonces.add(nonce)
        if params.get("Signature") != self.expected_signature(request.method, params):
            return 400, {"Code": "SignatureDoesNotMatch"}
        for key in ("PhoneNumbers", "SignName", "TemplateCode", "TemplateParam"):
            if not params.get(key):
                return 400, {"Code": "MissingParameter", "Message": key}
        json.loads(params["TemplateParam"])
        action = self.next_action()
        if action == "500":
            return 503, {"Code": "ServiceUnavailable"}
        if action == "refuse":
            return 200, {"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "illegal number"}
        with self.lock:
            self.sent += 1
            number = self.sent
        return 200, {"Code": "OK", "Message": "OK", "BizId": f"9{number:05d}^0",
                     "RequestId": f"req-{number}"}  # fmt: skip


@dataclass
class WechatApi(_Base):
    """``GET /cgi-bin/token`` (client_credential) and the template send API."""

    app_id: str = "wx0123456789abcdef"
    app_secret: str = "wechat-secret-for-tests"
    tokens: dict[str, bool] = field(default_factory=dict)
    """Issued tokens → still valid."""
    token_requests: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)

    def expire_tokens(self, errcode: int = 42001) -> None:
        with self.lock:
            self.expired_code = errcode
            for token in self.tokens:
                self.tokens[token] = False

    expired_code: int = 42001

    def handle(self, request: Received) -> tuple[int, Any]:
        if request.path == "/cgi-bin/token":
            q = request.query
            if q.get("grant_type") != "client_credential":
                return 200, {"errcode": 40002, "errmsg": "invalid grant_type"}
            if q.get("appid") != self.app_id or q.get("secret") != self.app_secret:
                return 200, {"errcode": 40125, "errmsg": "invalid appsecret"}
            with self.lock:
                self.token_requests += 1
                token = f"token-{self.token_requests}"
                self.tokens[token] = True
            return 200, {"access_token": token, "expires_in": 7200}
        if request.path == "/cgi-bin/message/template/send" and request.method == "POST":
            token = request.query.get("access_token", "")
            with self.lock:
                valid = self.tokens.get(token)
            if valid is None:
                return 200, {"errcode": 40001, "errmsg": "invalid credential"}
            if not valid:
                return 200, {"errcode": self.expired_code, "errmsg": "access_token expired"}
            payload = request.json()
            if not payload.get("touser") or not payload.get("template_id"):
                return 200, {"errcode": 47001, "errmsg": "data format error"}
            action = self.next_action()
            if action == "500":
                return 200, {"errcode": -1, "errmsg": "system error"}
            with self.lock:
                self.sent.append(payload)
                number = len(self.sent)
            return 200, {"errcode": 0, "errmsg": "ok", "msgid": 200228000 + number}
        return 404, {"errcode": 404}


def notify_archive(settings: Any, **notify: Any) -> Any:
    """An archive on the test's database (SQLite or PostgreSQL) with ``notify`` settings."""
    from cloudfilm import migrations
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.config import NotifySettings
    from cloudfilm.db import Database
    from cloudfilm.storage import open_storage

    configured = settings.model_copy(update={"notify": NotifySettings(**notify)})
    db = Database(configured)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    return Archive(configured, db=db, storage=open_storage(configured))


def sms_settings(platform: SmsPlatform, **extra: Any) -> dict[str, Any]:
    """``notify`` settings sending SMS through ``platform`` (the ``http`` driver)."""
    return {
        "channels": ["sms"],
        "sms_signature": "云胶片医院",
        "backoff_initial_seconds": 30,
        "http": {
            "url": f"{platform.url}/send",
            "auth_value": f"Bearer {platform.token}",
            "message_id_field": "data.sid",
            "timeout_seconds": 0.5,
            **({"hmac_secret": platform.hmac_secret} if platform.hmac_secret else {}),
        },
        **extra,
    }
