"""The outbox's use cases: queue a message in the caller's transaction, send due messages,
record delivery receipts, list what was sent.

:func:`enqueue` only adds and flushes: the message is committed with the caller's change
or not at all (a rolled-back report release sends nothing). It never raises for bad
input: a message that cannot be sent (invalid recipient, unknown template, missing
variables, over the recipient's send limit) is stored as ``refused`` with the reason and
audited, so that the caller's transaction goes on and nothing is lost silently.

:class:`Dispatcher` sends due messages. Each is leased first (``state = sending``,
``lease_until``) in its own short transaction, sent with no transaction open, and its
outcome committed with its audit record. Delivery is at least once: a dispatcher that
dies between the platform's answer and its commit leaves the lease to run out, and the
message is sent again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.clock import Clock, as_utc
from cloudfilm.config import NotifyChannel, NotifySettings, NotifyTemplate, SmsDriver
from cloudfilm.crypto.keys import SealError
from cloudfilm.db import settings_of
from cloudfilm.errors import BadRequest
from cloudfilm.notify.drivers import (
    AliyunSmsDriver,
    Driver,
    HttpSmsDriver,
    Outgoing,
    SendError,
    WechatDriver,
)
from cloudfilm.notify.enums import NotifyState
from cloudfilm.notify.keys import NotifyKeys, keys_for
from cloudfilm.notify.models import Notification

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

logger = logging.getLogger(__name__)

_ACTOR = Actor.system("notify")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MAINLAND_MOBILE = re.compile(r"^1[3-9]\d{9}$")
_INTERNATIONAL = re.compile(r"^\+[1-9]\d{6,14}$")
_OPENID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_MAX_VARIABLE = 500


class InvalidRecipient(BadRequest):
    """A phone number or openid that cannot be a recipient."""


def normalize_phone(value: str) -> str:
    """A mainland mobile number as 11 digits (``+86``/``0086`` dropped), others as
    ``+`` and digits (E.164).

    Raises
    ------
    InvalidRecipient
        Not a mobile number.
    """
    text = re.sub(r"[\s\-()]", "", value)
    if text.startswith("0086"):
        text = "+86" + text[4:]
    if text.startswith("+86"):
        text = text[3:]
    if _MAINLAND_MOBILE.match(text) or _INTERNATIONAL.match(text):
        return text
    raise InvalidRecipient("手机号码无效 · not a valid mobile phone number")


def normalize_recipient(channel: str, value: str) -> str:
    if channel == NotifyChannel.SMS:
        return normalize_phone(value)
    text = value.strip()
    if not _OPENID.match(text):
        raise InvalidRecipient("微信 openid 无效 · not a valid WeChat openid")
    return text


def mask(channel: str, recipient: str) -> str:
    """``138****1234`` for a phone number, ``oAbC****wxyz`` for an openid."""
    if channel == NotifyChannel.SMS:
        if len(recipient) >= 11:
            return recipient[:3] + "****" + recipient[-4:]
        return recipient[:2] + "****" + recipient[-2:]
    return recipient[:4] + "****" + recipient[-4:] if len(recipient) > 8 else "****"


def render(text: str, variables: dict[str, str]) -> str:
    """``text`` with each ``{name}`` replaced; :class:`KeyError` names a missing one."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise KeyError(name)
        return variables[name]

    return _PLACEHOLDER.sub(substitute, text)


@dataclass(frozen=True, slots=True)
class _Rendered:
    text: str
    """SMS text, or the JSON of WeChat's data and url."""


def _render(channel: str, template: NotifyTemplate, variables: dict[str, str]) -> _Rendered:
    """Raises ``KeyError`` (missing variable) or ``LookupError`` (nothing for the channel)."""
    if channel == NotifyChannel.SMS:
        if not template.sms and not template.sms_code:
            raise LookupError("sms")
        return _Rendered(render(template.sms, variables))
    if not template.wechat_template_id:
        raise LookupError("wechat")
    data = {k: render(v, variables) for k, v in template.wechat_fields.items()}
    return _Rendered(
        json.dumps(
            {"data": data, "url": render(template.wechat_url, variables)}, ensure_ascii=False
        )  # fmt: skip
    )


def _driver_name(settings: NotifySettings, channel: str) -> str:
    if channel == NotifyChannel.WECHAT:
        return "wechat"
    return SmsDriver(settings.sms_driver).value


def _now() -> datetime:
    return datetime.now(UTC)


def _refusal(
    settings: NotifySettings,
    session: Session,
    keys: NotifyKeys,
    channel: str,
    template: str,
    to: str,
    variables: dict[str, str],
    now: datetime,
) -> tuple[str, str, str, str | None]:
    """(stored recipient, blind index, sealed rendered text, refusal reason or None)."""
    try:
        recipient = normalize_recipient(channel, to)
    except InvalidRecipient as exc:
        # Keep what was given (sealed) so that the refusal can be looked into.
        return keys.seal(to[:64]), keys.blind_index(channel, to), keys.seal(""), str(exc)
    stored = keys.seal(recipient) if channel == NotifyChannel.SMS else recipient
    index = keys.blind_index(channel, recipient)
    spec = settings.templates.get(template)
    if spec is None:
        return stored, index, keys.seal(""), f"模板不存在 · no template named {template!r}"
    too_long = [k for k, v in variables.items() if len(v) > _MAX_VARIABLE]
    if too_long:
        return (
            stored,
            index,
            keys.seal(""),
            (f"变量过长 · variable too long: {', '.join(sorted(too_long))}"),
        )
    try:
        rendered = _render(channel, spec, variables)
    except KeyError as exc:
        return stored, index, keys.seal(""), f"缺少变量 · missing variable: {exc.args[0]}"
    except LookupError:
        return (
            stored,
            index,
            keys.seal(""),
            (
                f"模板 {template} 没有 {channel} 内容 · "
                f"template {template} has nothing for {channel}"
            ),
        )
    sealed_text = keys.seal(rendered.text)
    counted = (Notification.recipient_index == index) & (
        Notification.state != NotifyState.REFUSED.value
    )
    for window, limit, zh, en in (
        (timedelta(hours=1), settings.limit_per_hour, "每小时", "per hour"),
        (timedelta(days=1), settings.limit_per_day, "每天", "per day"),
    ):
        count = session.scalar(
            select(func.count())
            .select_from(Notification)
            .where(counted, Notification.created_at > now - window)
        )
        if int(count or 0) >= limit:
            return (
                stored,
                index,
                sealed_text,
                (
                    f"超过发送上限（{zh} {limit} 条） · over the send limit of {limit} "
                    f"messages {en} for this recipient"
                ),
            )
    return stored, index, sealed_text, None


def enqueue(
    session: Session,
    *,
    channel: str,
    template: str,
    to: str,
    variables: dict[str, str],
    object_type: str = "",
    object_id: str = "",
    dedupe_key: str | None = None,
) -> int | None:
    """Queue one message in ``session``'s transaction (add and flush, never commit).

    Returns the row id, or ``None`` when ``channel`` is not enabled (``notify.channels``)
    or a message with ``dedupe_key`` exists already. A message that cannot be sent is
    stored as ``refused`` (reason in ``last_error``) and audited; its id is returned.

    Raises
    ------
    BadRequest
        ``channel`` is neither ``sms`` nor ``wechat`` (a programming error).
    """
    if channel not in NotifyChannel.__members__.values():
        raise BadRequest(f"未知的通知渠道 · unknown notification channel {channel!r}")
    app_settings = settings_of(session)
    settings = app_settings.notify
    if NotifyChannel(channel) not in settings.channels:
        return None
    if dedupe_key is not None and session.scalar(
        select(Notification.id).where(Notification.dedupe_key == dedupe_key)
    ):
        return None
    keys = keys_for(app_settings)
    now = _now()
    variables = {str(k): str(v) for k, v in variables.items()}
    stored, index, sealed_text, reason = _refusal(
        settings, session, keys, channel, template, to, variables, now
    )
    row = Notification(
        channel=channel,
        driver=_driver_name(settings, channel),
        template=template[:64],
        recipient=stored,
        recipient_index=index,
        variables=keys.seal(json.dumps(variables, ensure_ascii=False)),
        rendered=sealed_text,
        state=(NotifyState.REFUSED if reason else NotifyState.QUEUED).value,
        attempts=0,
        not_before=now,
        last_error=reason[:512] if reason else None,
        object_type=object_type[:32],
        object_id=object_id[:128],
        dedupe_key=dedupe_key,
        created_at=now,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        if dedupe_key is not None:
            return None  # the same key queued by another transaction just now
        raise
    if reason:
        audit.record(
            session=session,
            actor=_ACTOR,
            event_type=AuditEventType.NOTIFICATION_REFUSED,
            action=AuditAction.CREATE,
            outcome=AuditOutcome.MINOR_FAILURE,
            object_type="notification",
            object_id=str(row.id),
            message=reason,
            detail=_detail(row, reason=reason),
        )
    return row.id


def _detail(row: Notification, **extra: Any) -> dict[str, Any]:
    """What the audit trail keeps of a message: never the recipient or the text."""
    return {
        "channel": row.channel,
        "driver": row.driver,
        "template": row.template,
        "subject": f"{row.object_type}/{row.object_id}" if row.object_type else None,
        **extra,
    }


def backoff(settings: NotifySettings, attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: initial × 2^(attempts−1), capped."""
    seconds = settings.backoff_initial_seconds * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(settings.backoff_max_seconds, seconds))


def make_drivers(settings: NotifySettings, client: httpx.Client) -> dict[str, Driver]:
    return {
        "http": HttpSmsDriver(settings, client),
        "aliyun": AliyunSmsDriver(settings, client),
        "wechat": WechatDriver(settings, client),
    }


class Dispatcher:
    """Sends due messages (:meth:`run_once`, from a background loop or a command)."""

    def __init__(
        self,
        archive: Archive,
        *,
        clock: Clock | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.archive = archive
        self.settings = archive.settings.notify
        self.keys = keys_for(archive.settings)
        self.clock = clock or Clock()
        self._own_client = client is None
        self.client = client or httpx.Client(follow_redirects=False)
        self.drivers = make_drivers(self.settings, self.client)

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def pending(self) -> int:
        with self.archive.db.read_session() as session:
            count = session.scalar(
                select(func.count())
                .select_from(Notification)
                .where(Notification.state.in_([NotifyState.QUEUED, NotifyState.SENDING]))
            )
        return int(count or 0)

    def run_once(self, limit: int = 32) -> int:
        """Send up to ``limit`` due messages; the number of attempts made."""
        now = self.clock.now()
        with self.archive.db.read_session() as session:
            due = session.scalars(
                select(Notification.id)
                .where(
                    Notification.state.in_([NotifyState.QUEUED, NotifyState.SENDING]),
                    Notification.not_before <= now,
                    or_(Notification.lease_until.is_(None), Notification.lease_until < now),
                )
                .order_by(Notification.not_before, Notification.id)
                .limit(limit)
            ).all()
        attempted = 0
        for notification_id in due:
            outgoing = self._lease(notification_id)
            if outgoing is None:
                continue
            attempted += 1
            driver = self.drivers.get(outgoing[0])
            try:
                if driver is None:
                    raise SendError(f"unknown driver {outgoing[0]}", retry=False)
                message_id = driver.send(outgoing[1])
            except SendError as exc:
                self._failed(notification_id, str(exc), retry=exc.retry)
            except Exception as exc:  # one bad message must not stop the batch
                logger.exception("notification %d: driver failed", notification_id)
                self._failed(notification_id, f"{type(exc).__name__}", retry=True)
            else:
                self._sent(notification_id, message_id)
        return attempted

    def _lease(self, notification_id: int) -> tuple[str, Outgoing] | None:
        now = self.clock.now()
        lease = timedelta(seconds=self.settings.lease_seconds)
        with self.archive.db.session() as session:
            taken = session.execute(
                update(Notification)
                .where(
                    Notification.id == notification_id,
                    Notification.state.in_([NotifyState.QUEUED, NotifyState.SENDING]),
                    or_(Notification.lease_until.is_(None), Notification.lease_until < now),
                )
                .values(state=NotifyState.SENDING.value, lease_until=now + lease)
                .execution_options(synchronize_session=False)
            )
            if getattr(taken, "rowcount", 0) != 1:
                return None
            row = session.get(Notification, notification_id)
            if row is None:
                return None
            try:
                outgoing = self._outgoing(row)
            except (SealError, ValueError) as exc:
                # Sealed under another key (the secret changed), or altered: never sendable.
                self._finish_failed(session, row, f"stored message unreadable: {exc}")
                return None
            return row.driver, outgoing

    def _outgoing(self, row: Notification) -> Outgoing:
        to = self.keys.open(row.recipient) if row.channel == NotifyChannel.SMS else row.recipient
        variables = json.loads(self.keys.open(row.variables))
        text = self.keys.open(row.rendered)
        spec = self.settings.templates.get(row.template) or NotifyTemplate()
        if row.channel == NotifyChannel.WECHAT:
            wechat = json.loads(text)
            return Outgoing(
                to=to,
                template=row.template,
                variables=variables,
                text="",
                wechat_template_id=spec.wechat_template_id,
                wechat_data=wechat.get("data", {}),
                wechat_url=wechat.get("url", ""),
            )
        return Outgoing(
            to=to,
            template=row.template,
            variables=variables,
            text=text,
            template_code=spec.sms_code,
        )

    def _sent(self, notification_id: int, message_id: str) -> None:
        now = self.clock.now()
        with self.archive.db.session() as session:
            row = session.get(Notification, notification_id, with_for_update=True)
            if row is None:
                return
            row.attempts += 1
            row.state = NotifyState.SENT.value
            row.lease_until = None
            row.sent_at = now
            row.provider_message_id = message_id[:128] or None
            row.last_error = None
            session.flush()
            audit.record(
                session=session,
                actor=_ACTOR,
                event_type=AuditEventType.NOTIFICATION_SENT,
                action=AuditAction.EXECUTE,
                object_type="notification",
                object_id=str(row.id),
                message=f"{row.channel} {row.template} sent (attempt {row.attempts})",
                detail=_detail(row, attempt=row.attempts, provider_message_id=message_id),
            )

    def _failed(self, notification_id: int, error: str, *, retry: bool) -> None:
        now = self.clock.now()
        with self.archive.db.session() as session:
            row = session.get(Notification, notification_id, with_for_update=True)
            if row is None:
                return
            row.attempts += 1
            row.lease_until = None
            row.last_error = error[:512]
            given_up = retry and row.attempts >= self.settings.max_attempts
            if not retry:
                row.state = NotifyState.FAILED.value
            elif given_up:
                row.state = NotifyState.GIVEN_UP.value
            else:
                row.state = NotifyState.QUEUED.value
                row.not_before = now + backoff(self.settings, row.attempts)
            session.flush()
            logger.warning(
                "notification %d attempt %d failed (%s): %s",
                row.id,
                row.attempts,
                "retry" if retry and not given_up else "final",
                error,
            )
            audit.record(
                session=session,
                actor=_ACTOR,
                event_type=AuditEventType.NOTIFICATION_FAILED,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.MINOR_FAILURE,
                object_type="notification",
                object_id=str(row.id),
                message=f"{row.channel} {row.template} attempt {row.attempts} failed: {error}",
                detail=_detail(
                    row, attempt=row.attempts, error=error[:300], retry=retry and not given_up
                ),  # fmt: skip
            )
            if given_up:
                audit.record(
                    session=session,
                    actor=_ACTOR,
                    event_type=AuditEventType.NOTIFICATION_GIVEN_UP,
                    action=AuditAction.EXECUTE,
                    outcome=AuditOutcome.SERIOUS_FAILURE,
                    object_type="notification",
                    object_id=str(row.id),
                    message=f"{row.channel} {row.template} given up after {row.attempts} attempts",
                    detail=_detail(row, attempts=row.attempts, error=error[:300]),
                )

    def _finish_failed(self, session: Session, row: Notification, error: str) -> None:
        row.state = NotifyState.FAILED.value
        row.lease_until = None
        row.last_error = error[:512]
        session.flush()
        audit.record(
            session=session,
            actor=_ACTOR,
            event_type=AuditEventType.NOTIFICATION_FAILED,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE,
            object_type="notification",
            object_id=str(row.id),
            message=error,
            detail=_detail(row, error=error[:300], retry=False),
        )


@contextmanager
def running(archive: Archive, interval: float | None = None) -> Iterator[Dispatcher | None]:
    """A background loop sending due messages while the block runs (``None`` when no
    channel is enabled)."""
    from cloudfilm.storage.mirror import PeriodicLoop

    if not archive.settings.notify.channels:
        yield None
        return
    dispatcher = Dispatcher(archive)

    def step() -> None:
        for _ in range(16):  # then look at the stop flag again
            if not dispatcher.run_once():
                return

    loop = PeriodicLoop(
        "notify",
        step,
        interval if interval is not None else archive.settings.notify.interval_seconds,
    )
    loop.start()
    try:
        yield dispatcher
    finally:
        loop.stop(timeout=30)
        dispatcher.close()


# -- delivery receipts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery report from a platform."""

    message_id: str
    delivered: bool
    status: str
    at: datetime | None = None


#: States a receipt may change: it arrives after the platform accepted the message (and
#: may come twice, or a late "delivered" after a "failed").
_RECEIPT_STATES = (NotifyState.SENT, NotifyState.DELIVERED, NotifyState.FAILED)


def record_receipts(
    session: Session, *, driver: str, receipts: list[Receipt], now: datetime | None = None
) -> dict[str, Any]:
    """Apply ``receipts`` of ``driver`` to their messages (by provider message id); what
    was done, for the request's audit record (counts and notification ids)."""
    now = now or _now()
    summary: dict[str, Any] = {"driver": driver, "received": len(receipts), "delivered": 0,
                               "failed": 0, "unknown": 0, "notifications": []}  # fmt: skip
    for receipt in receipts:
        if not receipt.message_id:
            summary["unknown"] += 1
            continue
        rows = session.scalars(
            select(Notification)
            .where(
                Notification.driver == driver,
                Notification.provider_message_id == receipt.message_id[:128],
                Notification.state.in_([s.value for s in _RECEIPT_STATES]),
            )
            .with_for_update()
        ).all()
        if not rows:
            summary["unknown"] += 1
            continue
        for row in rows:
            row.state = (NotifyState.DELIVERED if receipt.delivered else NotifyState.FAILED).value
            row.receipt_status = receipt.status[:64]
            row.receipt_at = receipt.at or now
            if not receipt.delivered:
                row.last_error = f"delivery failed: {receipt.status}"[:512]
            summary["delivered" if receipt.delivered else "failed"] += 1
            summary["notifications"].append(row.id)
    session.flush()
    summary["notifications"] = summary["notifications"][:100]
    return summary


# -- the console's list ------------------------------------------------------------------


def list_messages(
    session: Session,
    *,
    state: str | None = None,
    channel: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """Messages newest first, recipients masked, never the text (it may carry a link)."""
    keys = keys_for(settings_of(session))
    query = select(Notification)
    if state:
        query = query.where(Notification.state == state)
    if channel:
        query = query.where(Notification.channel == channel)
    if object_type:
        query = query.where(Notification.object_type == object_type)
    if object_id:
        query = query.where(Notification.object_id == object_id)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Notification.id.desc()).limit(limit).offset(offset)).all()
    return {"total": int(total or 0), "messages": [_view(keys, row) for row in rows]}


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def _view(keys: NotifyKeys, row: Notification) -> dict[str, Any]:
    if row.channel == NotifyChannel.SMS:
        try:
            recipient = mask(row.channel, keys.open(row.recipient))
        except SealError:
            recipient = "(unreadable)"
    else:
        recipient = mask(row.channel, row.recipient)
    return {
        "id": row.id,
        "channel": row.channel,
        "driver": row.driver,
        "template": row.template,
        "recipient": recipient,
        "state": row.state,
        "attempts": row.attempts,
        "not_before": _iso(row.not_before),
        "last_error": row.last_error,
        "provider_message_id": row.provider_message_id,
        "receipt_status": row.receipt_status,
        "receipt_at": _iso(row.receipt_at),
        "object_type": row.object_type,
        "object_id": row.object_id,
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
    }
