"""The outbox on SQLite and PostgreSQL: queued in the caller's transaction, sent by the
dispatcher through real HTTP servers that speak each platform's protocol, retried with
back-off, given up, refused over the send limits, deduplicated; storage alarms to the
administrators."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from notify_fakes import AliyunSms, SmsPlatform, WechatApi, notify_archive, serving, sms_settings
from sqlalchemy import select, text

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.clock import MovableClock, as_utc
from cloudfilm.config import Settings
from cloudfilm.notify import service
from cloudfilm.notify.drivers import forget_tokens
from cloudfilm.notify.models import Notification

PHONE = "13812341234"
VARS = {"hospital": "第一人民医院", "exam": "胸部CT", "link": "https://film.example.cn/s/abc"}


@pytest.fixture
def platform() -> Iterator[SmsPlatform]:
    with serving(SmsPlatform()) as fake:
        assert isinstance(fake, SmsPlatform)
        yield fake


@pytest.fixture
def archives() -> Iterator[list[Archive]]:
    made: list[Archive] = []
    yield made
    for archive in made:
        archive.close()


def _archive(settings: Settings, archives: list[Archive], **notify: Any) -> Archive:
    archive = notify_archive(settings, **notify)
    archives.append(archive)
    return archive


def _enqueue(archive: Archive, to: str = PHONE, **kw: Any) -> int | None:
    options: dict[str, Any] = {"channel": "sms", "template": "report-released",
                               "variables": VARS, **kw}  # fmt: skip
    with archive.db.session() as session:
        return service.enqueue(session, to=to, **options)


def _row(archive: Archive, notification_id: int) -> Notification:
    with archive.db.read_session() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        return row


def _events(archive: Archive, event_type: str) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.event_type == event_type)
                .order_by(AuditEvent.seq)
            )
        )


def test_enqueue__rolled_back_sends_nothing_committed_sends_once(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform))
    with pytest.raises(RuntimeError), archive.db.session() as session:
        queued = service.enqueue(session, channel="sms", template="report-released", to=PHONE,
                                 variables=VARS, object_type="report", object_id="7")  # fmt: skip
        assert queued is not None
        raise RuntimeError("the report release failed")
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 0 and platform.received == []

    notification_id = _enqueue(archive, to="+86 138-1234-1234", object_type="report", object_id="7")
    assert notification_id is not None
    assert dispatcher.run_once() == 1
    assert dispatcher.run_once() == 0  # sent once
    dispatcher.close()
    [request] = platform.received
    body = request.json()
    assert body["mobile"] == PHONE
    assert body["content"] == (
        "【云胶片医院】您在第一人民医院的胸部CT检查报告已发布，请点击查看：https://film.example.cn/s/abc"
    )
    row = _row(archive, notification_id)
    assert (row.state, row.attempts, row.provider_message_id) == ("sent", 1, "sid-1")
    assert row.sent_at is not None and (row.object_type, row.object_id) == ("report", "7")
    # Neither the number nor the link is stored in clear.
    with archive.db.read_session() as session:
        raw = session.execute(text("SELECT * FROM notification")).one()
    assert not any(PHONE in str(v) or "film.example.cn" in str(v) for v in raw)
    [sent] = _events(archive, "notification-sent")
    assert sent.object_id == str(notification_id) and PHONE not in json.dumps(sent.detail)


def test_dispatch__retries_after_500_and_timeout_with_backoff(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform))
    platform.script = ["500", "timeout", "ok"]
    notification_id = _enqueue(archive)
    assert notification_id is not None
    clock = MovableClock()
    dispatcher = service.Dispatcher(archive, clock=clock)

    assert dispatcher.run_once() == 1
    row = _row(archive, notification_id)
    assert (row.state, row.attempts) == ("queued", 1) and "500" in (row.last_error or "")
    wait = as_utc(row.not_before) - clock.now()
    assert timedelta(seconds=25) < wait <= timedelta(seconds=30)
    assert dispatcher.run_once() == 0  # not due yet

    clock.advance(seconds=31)
    assert dispatcher.run_once() == 1  # the platform answers after the client's timeout
    row = _row(archive, notification_id)
    assert (row.state, row.attempts) == ("queued", 2) and "time" in (row.last_error or "")
    wait = as_utc(row.not_before) - clock.now()
    assert timedelta(seconds=55) < wait <= timedelta(seconds=60)  # doubled

    clock.advance(seconds=61)
    assert dispatcher.run_once() == 1
    dispatcher.close()
    row = _row(archive, notification_id)
    assert (row.state, row.attempts, row.last_error) == ("sent", 3, None)
    assert len(platform.received) == 3
    failed = _events(archive, "notification-failed")
    assert [e.detail["retry"] for e in failed] == [True, True]
    assert len(_events(archive, "notification-sent")) == 1


def test_dispatch__gives_up_after_max_attempts(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform, max_attempts=2))
    platform.script = ["500"] * 5
    notification_id = _enqueue(archive)
    assert notification_id is not None
    clock = MovableClock()
    dispatcher = service.Dispatcher(archive, clock=clock)
    assert dispatcher.run_once() == 1
    clock.advance(hours=1)
    assert dispatcher.run_once() == 1
    clock.advance(hours=1)
    assert dispatcher.run_once() == 0
    dispatcher.close()
    row = _row(archive, notification_id)
    assert (row.state, row.attempts) == ("given-up", 2)
    [given_up] = _events(archive, "notification-given-up")
    assert given_up.object_id == str(notification_id) and given_up.outcome == 8
    assert len(platform.received) == 2


def test_dispatch__refused_by_platform_is_final(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform))
    platform.script = ["refuse"]
    notification_id = _enqueue(archive)
    assert notification_id is not None
    clock = MovableClock()
    dispatcher = service.Dispatcher(archive, clock=clock)
    assert dispatcher.run_once() == 1
    clock.advance(days=1)
    assert dispatcher.run_once() == 0
    dispatcher.close()
    row = _row(archive, notification_id)
    assert row.state == "failed" and "refused" in (row.last_error or "")
    [failed] = _events(archive, "notification-failed")
    assert failed.detail["retry"] is False


def test_send_limits__refused_with_reason_and_audited(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform, limit_per_hour=2,
                                                             limit_per_day=3))  # fmt: skip
    ids = [_enqueue(archive, to=to) for to in (PHONE, "+8613812341234", "138 1234 1234")]
    other = _enqueue(archive, to="13900001111")
    states = [_row(archive, i).state for i in ids if i is not None]
    assert states == ["queued", "queued", "refused"]
    refused = _row(archive, ids[2] or 0)
    assert refused.last_error is not None and "per hour" in refused.last_error
    assert "超过发送上限" in refused.last_error
    assert _row(archive, other or 0).state == "queued"
    [event] = _events(archive, "notification-refused")
    assert event.object_id == str(ids[2]) and "per hour" in (event.message or "")
    # A refusal does not count: the day's limit is about messages that go out.
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 3
    dispatcher.close()
    assert sorted(r.json()["mobile"] for r in platform.received) == [PHONE, PHONE, "13900001111"]


def test_enqueue__dedupe_key_and_disabled_channel(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform))
    first = _enqueue(archive, dedupe_key="report:7:released")
    assert first is not None
    assert _enqueue(archive, dedupe_key="report:7:released") is None
    assert _enqueue(archive, dedupe_key="report:8:released") not in (None, first)
    with archive.db.session() as session:
        assert service.enqueue(session, channel="wechat", template="report-released",
                               to="oUser1234567890", variables=VARS) is None  # fmt: skip
    with archive.db.read_session() as session:
        assert len(session.scalars(select(Notification)).all()) == 2


def test_enqueue__bad_input_is_refused_not_lost(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform))
    bad_phone = _enqueue(archive, to="12345")
    no_template = _enqueue(archive, template="no-such-template")
    missing = _enqueue(archive, variables={"hospital": "第一人民医院"})
    reasons = [_row(archive, i or 0).last_error or "" for i in (bad_phone, no_template, missing)]
    assert "手机号码无效" in reasons[0] and "not a valid mobile" in reasons[0]
    assert "no template named 'no-such-template'" in reasons[1]
    assert "missing variable: exam" in reasons[2]
    assert all(_row(archive, i or 0).state == "refused" for i in (bad_phone, no_template, missing))
    assert len(_events(archive, "notification-refused")) == 3
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 0 and platform.received == []
    dispatcher.close()


def test_aliyun__send_sms_signed_as_documented(settings: Settings, archives: list[Archive]) -> None:
    with serving(AliyunSms()) as fake:
        assert isinstance(fake, AliyunSms)
        notify = {
            "channels": ["sms"],
            "sms_driver": "aliyun",
            "sms_signature": "云胶片医院",
            "aliyun": {
                "endpoint": f"{fake.url}/",
                "access_key_id": fake.access_key_id,
                "access_key_secret": fake.access_key_secret,
            },  # fmt: skip
            "templates": {
                "report-released": {"sms": "报告已发布 {exam} {link}", "sms_code": "SMS_123456789"}
            },  # fmt: skip
        }
        archive = _archive(settings, archives, **notify)
        good = _enqueue(archive)
        # Characters the encoding rules single out: space, *, ~, +, and Chinese text.
        odd = _enqueue(archive, variables={**VARS, "exam": "CT * 2 ~ A+B"})
        dispatcher = service.Dispatcher(archive)
        assert dispatcher.run_once() == 2
        dispatcher.close()
        assert fake.sent == 2
        first = fake.received[0].form()
        assert first["PhoneNumbers"] == PHONE and first["SignName"] == "云胶片医院"
        assert first["TemplateCode"] == "SMS_123456789"
        assert json.loads(first["TemplateParam"]) == VARS
        assert json.loads(fake.received[1].form()["TemplateParam"])["exam"] == "CT * 2 ~ A+B"
        assert _row(archive, good or 0).provider_message_id == "900001^0"
        assert _row(archive, odd or 0).state == "sent"

        # Signed with another secret: the server refuses it, the message fails for good.
        wrong = dict(notify, aliyun={**notify["aliyun"], "access_key_secret": "not-the-secret"})
        other = _archive(settings, archives, **wrong)
        refused = _enqueue(other, to="13900001111")
        dispatcher = service.Dispatcher(other)
        assert dispatcher.run_once() == 1
        dispatcher.close()
        assert fake.sent == 2
        row = _row(other, refused or 0)
        assert row.state == "failed" and "SignatureDoesNotMatch" in (row.last_error or "")


def test_wechat__token_cached_and_refreshed_on_40001_42001(
    settings: Settings, archives: list[Archive]
) -> None:
    forget_tokens()
    with serving(WechatApi()) as fake:
        assert isinstance(fake, WechatApi)
        notify = {
            "channels": ["wechat"],
            "wechat": {"base_url": fake.url, "app_id": fake.app_id,
                       "app_secret": fake.app_secret},  # fmt: skip
            "templates": {"report-released": {
                "wechat_template_id": "TPL-report",
                "wechat_fields": {"first": "{hospital}", "keyword1": "{exam}"},
                "wechat_url": "{link}",
            }},
        }  # fmt: skip
        archive = _archive(settings, archives, **notify)
        openid = "oUser_1234567890abcdef"
        options = {"channel": "wechat", "template": "report-released", "variables": VARS}
        dispatcher = service.Dispatcher(archive)
        with archive.db.session() as session:
            service.enqueue(session, to=openid, **options)
            service.enqueue(session, to=openid + "2", **options)
        assert dispatcher.run_once() == 2
        assert fake.token_requests == 1  # cached for the second message
        assert fake.sent[0] == {
            "touser": openid,
            "template_id": "TPL-report",
            "url": VARS["link"],
            "data": {"first": {"value": VARS["hospital"]}, "keyword1": {"value": VARS["exam"]}},
        }
        for code in (42001, 40001):
            fake.expire_tokens(code)
            with archive.db.session() as session:
                queued = service.enqueue(session, to=openid + str(code), **options)
            assert dispatcher.run_once() == 1
            assert _row(archive, queued or 0).state == "sent"
        dispatcher.close()
        assert fake.token_requests == 3 and len(fake.sent) == 4
    forget_tokens()


def test_running__background_loop_sends(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform, interval_seconds=0.2))
    with service.running(archive) as dispatcher:
        assert dispatcher is not None
        notification_id = _enqueue(archive)
        deadline = time.monotonic() + 20
        while _row(archive, notification_id or 0).state != "sent":
            assert time.monotonic() < deadline, "the background loop did not send"
            time.sleep(0.1)
    assert len(platform.received) == 1
    quiet = _archive(settings, archives)
    with service.running(quiet) as nothing:
        assert nothing is None


def test_storage_alarm__one_sms_per_alarm(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    notify = sms_settings(platform, alarm_recipients=[{"channel": "sms", "to": PHONE}])
    configured = settings.model_copy(
        update={"monitoring": settings.monitoring.model_copy(
            update={"warning_percent": 0.0001, "critical_percent": 100.0}
        )}
    )  # fmt: skip
    archive = _archive(configured, archives, **notify)
    result = archive.monitor.run_once()
    raised = [a for a in result.raised if a.kind == "disk_usage"]
    if not raised:
        pytest.skip("this storage reports no device usage (object storage without a quota)")
    archive.monitor.run_once()  # still active: not raised again, nothing queued again
    with archive.db.read_session() as session:
        rows = session.scalars(select(Notification)).all()
    assert [(r.template, r.object_type, r.object_id) for r in rows] == [
        ("storage-alarm", "alarm", str(raised[0].id))
    ]
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 1
    dispatcher.close()
    [request] = platform.received
    assert request.json()["mobile"] == PHONE
    assert request.json()["content"].startswith("【云胶片医院】云胶片存储告警：")
    assert "storage primary" in request.json()["content"]


def test_dispatch__lease_of_a_dead_dispatcher_runs_out(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    archive = _archive(settings, archives, **sms_settings(platform, lease_seconds=60))
    notification_id = _enqueue(archive)
    assert notification_id is not None
    clock = MovableClock()
    dead = service.Dispatcher(archive, clock=clock)
    assert dead._lease(notification_id) is not None  # leased, then the process died
    dead.close()
    assert _row(archive, notification_id).state == "sending"
    dispatcher = service.Dispatcher(archive, clock=clock)
    assert dispatcher.run_once() == 0  # still leased
    clock.advance(seconds=61)
    assert dispatcher.run_once() == 1
    dispatcher.close()
    assert _row(archive, notification_id).state == "sent" and len(platform.received) == 1


def test_http_driver__form_body_with_signature_template_and_variables_fields(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    notify = sms_settings(platform)
    notify["http"] = {
        **notify["http"],
        "body_format": "form",
        "phone_field": "phone",
        "text_field": "text",
        "signature_field": "sign",
        "template_field": "tpl",
        "variables_field": "params",
        "extra_fields": {"account": "hospital-1"},
    }
    notify["templates"] = {"report-released": {"sms": "报告已发布：{link}", "sms_code": "T100"}}
    archive = _archive(settings, archives, **notify)
    _enqueue(archive)
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 1
    dispatcher.close()
    [request] = platform.received
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
    form = request.form()
    assert form == {
        "account": "hospital-1",
        "phone": PHONE,
        "text": "报告已发布：https://film.example.cn/s/abc",  # the signature in its own field
        "sign": "云胶片医院",
        "tpl": "T100",
        "params": json.dumps(VARS, ensure_ascii=False),
    }


def test_integrity_alarm__queued_to_each_administrator_once(
    settings: Settings, archives: list[Archive], platform: SmsPlatform
) -> None:
    from cloudfilm.storage import alarms
    from cloudfilm.storage.monitor import Severity

    admins = [{"channel": "sms", "to": PHONE}, {"channel": "sms", "to": "13900001111"}]
    archive = _archive(settings, archives, **sms_settings(platform, alarm_recipients=admins))
    message = "2 个对象在所有副本上都已损坏 · 2 objects damaged on every copy"
    for _ in range(2):  # the second raise finds the alarm active: no new message
        alarms.raise_alarm(archive.db, alarms.IntegrityAlarm.OBJECT_DAMAGED, Severity.CRITICAL,
                           alarms.INTEGRITY_SUBJECT, message)  # fmt: skip
    with archive.db.read_session() as session:
        rows = session.scalars(select(Notification).order_by(Notification.id)).all()
    assert [(r.template, r.object_type) for r in rows] == [("storage-alarm", "alarm")] * 2
    dispatcher = service.Dispatcher(archive)
    assert dispatcher.run_once() == 2
    dispatcher.close()
    assert sorted(r.json()["mobile"] for r in platform.received) == [PHONE, "13900001111"]
    assert all(message in r.json()["content"] for r in platform.received)
