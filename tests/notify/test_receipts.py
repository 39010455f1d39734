"""Delivery receipts over HTTP (shared token, the ``http`` platform's HMAC, WeChat's
signature; Alibaba Cloud's SmsReport array) and the administrators' masked list."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from notify_fakes import SmsPlatform, notify_archive, serving, sms_settings
from sqlalchemy import select

from cloudfilm.app import create_app
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.clock import MovableClock
from cloudfilm.config import Settings
from cloudfilm.notify import service
from cloudfilm.notify.models import Notification

from auth_helpers import make_user, signed_in
from conftest import LiveServer, client_token, free_port

PHONE = "13812341234"
TOKEN = "receipt-token-for-tests-0123456789"
VARS = {"hospital": "第一人民医院", "exam": "胸部CT", "link": "https://film.example.cn/s/abc"}


@pytest.fixture
def platform() -> Iterator[SmsPlatform]:
    with serving(SmsPlatform(hmac_secret="platform-hmac-secret")) as fake:
        assert isinstance(fake, SmsPlatform)
        yield fake


@pytest.fixture
def start() -> Iterator[Callable[[Archive], LiveServer]]:
    """Serve an archive's HTTP application on a loopback port (uvicorn in a thread)."""
    running: list[tuple[uvicorn.Server, threading.Thread, Archive]] = []

    def serve(archive: Archive) -> LiveServer:
        clock = MovableClock()
        app = create_app(archive, clock=clock)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, log_level="warning", access_log=False
            )  # fmt: skip
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        running.append((server, thread, archive))
        token = client_token(archive, clock)
        return LiveServer(f"http://127.0.0.1:{port}", archive, token, app.state.accounts, clock)

    yield serve
    for server, thread, archive in running:
        server.should_exit = True
        thread.join(timeout=10)
        archive.close()


def _sent(archive: Archive, count: int = 1, to: str = PHONE) -> list[int]:
    ids = []
    with archive.db.session() as session:
        for _ in range(count):
            queued = service.enqueue(session, channel="sms", template="report-released",
                                     to=to, variables=VARS, object_type="report",
                                     object_id="7")  # fmt: skip
            assert queued is not None
            ids.append(queued)
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == count
    dispatcher.close()
    return ids


def _row(archive: Archive, notification_id: int) -> Notification:
    with archive.db.read_session() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        return row


def _last_audit(archive: Archive) -> AuditEvent:
    with archive.db.read_session() as session:
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
        assert event is not None
        return event


def test_receipt__http_token_and_hmac(
    settings: Settings, platform: SmsPlatform, start: Callable[[Archive], LiveServer]
) -> None:
    archive = notify_archive(settings, **sms_settings(platform, receipt_token=TOKEN))
    server = start(archive)
    first, second = _sent(archive, 2)
    url = f"{server.url}/api/notify/receipts/http"
    receipt = {"message_id": "sid-1", "status": "DELIVERED"}

    refused = httpx.post(url, json=receipt, headers={"X-Notify-Token": "wrong"})
    assert refused.status_code == 401 and "回执未通过认证" in refused.json()["message"]
    event = _last_audit(archive)
    assert event.event_type == "authentication-failed"
    assert event.detail["refused"] == "no valid token or signature"
    assert _row(archive, first).state == "sent"

    accepted = httpx.post(url, json=receipt, headers={"X-Notify-Token": TOKEN})
    assert accepted.status_code == 200
    row = _row(archive, first)
    assert (row.state, row.receipt_status) == ("delivered", "DELIVERED") and row.receipt_at
    event = _last_audit(archive)
    assert event.event_type == "notification-receipt"
    assert event.detail["delivered"] == 1 and event.detail["notifications"] == [first]

    # Signed by the platform instead (HMAC-SHA256 over timestamp and body).
    body = b'[{"message_id": "sid-2", "status": "UNDELIV"}, {"message_id": "x", "status": "0"}]'
    stamp = str(int(time.time()))
    mac = hmac.new(b"platform-hmac-secret", stamp.encode() + b"\n" + body, hashlib.sha256)
    headers = {"X-Timestamp": stamp, "X-Signature": mac.hexdigest(),
               "Content-Type": "application/json"}  # fmt: skip
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    row = _row(archive, second)
    assert row.state == "failed" and row.last_error == "delivery failed: UNDELIV"
    assert _last_audit(archive).detail["unknown"] == 1
    tampered = {**headers, "X-Signature": "0" * 64}
    assert httpx.post(url, content=body, headers=tampered).status_code == 401

    malformed = httpx.post(url, content=b"not json", headers={"X-Notify-Token": TOKEN})
    assert malformed.status_code == 400 and "回执不是 JSON" in malformed.json()["message"]
    assert httpx.post(f"{server.url}/api/notify/receipts/nope", json=[]).status_code == 404


def test_receipt__aliyun_sms_report(
    settings: Settings, platform: SmsPlatform, start: Callable[[Archive], LiveServer]
) -> None:
    archive = notify_archive(settings, **sms_settings(platform, receipt_token=TOKEN))
    server = start(archive)
    [notification_id] = _sent(archive)
    with archive.db.session() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        row.driver, row.provider_message_id = "aliyun", "12345^0"
    report = [
        {
            "phone_number": PHONE,
            "send_time": "2026-11-28 20:00:00",
            "report_time": "2026-11-28 20:00:05",
            "success": True,
            "err_code": "DELIVERED",
            "err_msg": "用户接收成功",
            "sms_size": "1",
            "biz_id": "12345^0",
            "out_id": "",
        }
    ]
    response = httpx.post(f"{server.url}/api/notify/receipts/aliyun", json=report,
                          headers={"X-Notify-Token": TOKEN})  # fmt: skip
    assert response.status_code == 200 and response.json() == {"code": 0, "msg": "接收成功"}
    row = _row(archive, notification_id)
    assert (row.state, row.receipt_status) == ("delivered", "DELIVERED")
    assert row.receipt_at is not None
    assert row.receipt_at.strftime("%H:%M:%S") == "12:00:05"  # China time → UTC


def _wechat_query(token: str) -> dict[str, str]:
    stamp, nonce = str(int(time.time())), "nonce123"
    signature = hashlib.sha1("".join(sorted([token, stamp, nonce])).encode()).hexdigest()
    return {"timestamp": stamp, "nonce": nonce, "signature": signature}


def test_receipt__wechat_signed_event(
    settings: Settings, platform: SmsPlatform, start: Callable[[Archive], LiveServer]
) -> None:
    notify = sms_settings(platform, wechat={"callback_token": "wechat-callback-token"})
    archive = notify_archive(settings, **notify)
    server = start(archive)
    [notification_id] = _sent(archive)
    with archive.db.session() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        row.driver, row.provider_message_id = "wechat", "200228332"
    url = f"{server.url}/api/notify/receipts/wechat"
    query = _wechat_query("wechat-callback-token")
    check = httpx.get(url, params={**query, "echostr": "echo-123"})
    assert check.status_code == 200 and check.text == "echo-123"
    event = (
        "<xml><ToUserName><![CDATA[gh_7f083739789a]]></ToUserName>"
        "<FromUserName><![CDATA[oia2TjuEGTNoeX76QEjQNrcURxG8]]></FromUserName>"
        "<CreateTime>1395658920</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>200228332</MsgID>"
        "<Status><![CDATA[failed:user block]]></Status></xml>"
    )
    bad = _wechat_query("another-token")
    assert httpx.post(url, params=bad, content=event.encode()).status_code == 401
    response = httpx.post(url, params=query, content=event.encode())
    assert response.status_code == 200 and response.text == "success"
    row = _row(archive, notification_id)
    assert (row.state, row.receipt_status) == ("failed", "failed:user block")
    dtd = b'<!DOCTYPE x [<!ENTITY a "b">]><xml><Event>&a;</Event></xml>'
    assert httpx.post(url, params=query, content=dtd).status_code == 400


def test_messages__masked_list_for_system_administrators(
    settings: Settings, platform: SmsPlatform, start: Callable[[Archive], LiveServer]
) -> None:
    notify = sms_settings(platform, channels=["sms", "wechat"])
    archive = notify_archive(settings, **notify)
    server = start(archive)
    _sent(archive)
    with archive.db.session() as session:
        service.enqueue(session, channel="sms", template="report-released", to="12",
                        variables=VARS)  # fmt: skip
    make_user(server, "sys", ["sysadmin"])
    make_user(server, "doc", ["radiologist"])
    url = f"{server.url}/api/notify/messages"
    assert httpx.get(url, headers=signed_in(server, "doc")).status_code == 403
    assert httpx.get(url).status_code == 401
    response = httpx.get(url, headers=signed_in(server, "sys"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["total"] == 2
    newest, oldest = body["messages"]
    assert oldest["recipient"] == "138****1234" and oldest["state"] == "sent"
    assert oldest["provider_message_id"] == "sid-1" and oldest["object_id"] == "7"
    assert newest["state"] == "refused" and "手机号码无效" in newest["last_error"]
    assert PHONE not in response.text and "film.example.cn" not in response.text
    only = httpx.get(url, params={"state": "refused"}, headers=signed_in(server, "sys")).json()
    assert [m["id"] for m in only["messages"]] == [newest["id"]]
    event = _last_audit(archive)
    assert event.event_type == "query" and event.actor_id == "sys"
