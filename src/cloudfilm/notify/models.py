"""The notification outbox table.

A row is written by the code that causes the message, in the same transaction (outbox):
committed with that change or not at all. The recipient's phone number is personal data:
it is stored sealed (AES-256-GCM, :mod:`cloudfilm.notify.keys`) with a keyed blind index
for the send limits. The variables and the rendered text may carry a patient's access
link (a capability), so they are sealed too; an openid is stored as it is.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class Notification(Base):
    """One SMS or WeChat message, from queueing to its delivery receipt."""

    __tablename__ = "notification"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    """``sms`` or ``wechat``."""
    driver: Mapped[str] = mapped_column(String(16))
    """The driver that sends it (``http``, ``aliyun``, ``wechat``), fixed when queued."""
    template: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(512))
    """Sealed phone number (``sms``) or the openid as it is (``wechat``)."""
    recipient_index: Mapped[str] = mapped_column(String(64))
    """HMAC-SHA256 of ``channel:recipient`` under a key derived from the application
    secret: counts a recipient's messages without the number."""
    variables: Mapped[str] = mapped_column(Text)
    """Sealed JSON object of the template variables."""
    rendered: Mapped[str] = mapped_column(Text)
    """Sealed text as sent (SMS) or JSON of the template data (WeChat)."""
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(512))
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    receipt_status: Mapped[str | None] = mapped_column(String(64))
    """Status code of the delivery receipt as the platform wrote it."""
    receipt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    object_type: Mapped[str] = mapped_column(String(32), default="")
    """What the message is about: ``report``, ``study``, ``alarm``..."""
    object_id: Mapped[str] = mapped_column(String(128), default="")
    dedupe_key: Mapped[str | None] = mapped_column(String(191), unique=True)
    """A second enqueue with the same key does nothing."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_notification_state_not_before", "state", "not_before"),
        Index("ix_notification_recipient_index_created_at", "recipient_index", "created_at"),
        Index("ix_notification_provider_message_id", "provider_message_id"),
    )
