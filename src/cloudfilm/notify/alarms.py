"""Storage alarms to the administrators (``notify.alarm_recipients``): one ``storage-alarm``
message per recipient, queued in the transaction that records the alarm and deduplicated
per alarm, so that a monitor pass that is rolled back sends nothing and a second monitor
process does not send it again."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from cloudfilm.db import settings_of
from cloudfilm.notify import service
from cloudfilm.notify.keys import keys_for


class RaisedAlarm(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def message(self) -> str: ...


def notify_alarm(session: Session, alarm: RaisedAlarm) -> list[int]:
    """Queue ``storage-alarm`` for each configured recipient; the ids queued."""
    settings = settings_of(session)
    keys = keys_for(settings)
    queued = []
    for recipient in settings.notify.alarm_recipients:
        channel = recipient.channel.value
        # The blind index names the recipient in the key without the number itself.
        who = keys.blind_index(channel, recipient.to.strip())[:24]
        queued_id = service.enqueue(
            session,
            channel=channel,
            template="storage-alarm",
            to=recipient.to,
            variables={"message": alarm.message},
            object_type="alarm",
            object_id=str(alarm.id),
            dedupe_key=f"storage-alarm:{alarm.id}:{channel}:{who}",
        )
        if queued_id is not None:
            queued.append(queued_id)
    return queued
