"""Use cases of the HL7 message store: take a message in, process it, list, replay.

Functions that take ``session`` flush and never commit (STYLE 2); the MLLP listener and
the command line own the transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.hl7 import adt as _adt  # noqa: F401  (registers the ADT handlers)
from cloudfilm.hl7 import dft as _dft  # noqa: F401  (registers the DFT^P03 charge handler)
from cloudfilm.hl7 import handlers, sealing
from cloudfilm.hl7 import orm as _orm  # noqa: F401  (registers the ORM/OMI handlers)
from cloudfilm.hl7 import oru as _oru  # noqa: F401  (registers the ORU report handler)
from cloudfilm.hl7.messages import (
    AckCode,
    Header,
    MessageError,
    build_ack,
    decode,
    parse,
    read_header,
)
from cloudfilm.hl7.models import HL7Message, MessageStatus


@dataclass(slots=True)
class Verdict:
    """What reading a message gave, before anything is stored."""

    header: Header | None
    encoding: str | None
    message: Any
    """The parsed :class:`hl7.Message`, or None when it did not parse."""
    error: MessageError | None

    @property
    def ack(self) -> AckCode:
        return self.error.ack if self.error else AckCode.ACCEPT


def examine(raw: bytes) -> Verdict:
    """Decode, read MSH and parse ``raw``; never raises on bad input."""
    header: Header | None = None
    encoding: str | None = None
    try:
        decoded = decode(raw)
        encoding = decoded.encoding
        header = read_header(decoded.text)
        return Verdict(header, encoding, parse(decoded.text, header), None)
    except MessageError as exc:
        if header is None:
            # Still address the answer: the sender's names read as Latin-1 never fail.
            try:
                header = read_header(raw.decode("latin-1"))
            except MessageError:
                header = None
        return Verdict(header, encoding, None, exc)


def _original(session: Session, header: Header) -> HL7Message | None:
    return session.scalars(
        select(HL7Message).where(
            HL7Message.sending_facility == header.sending_facility[:227],
            HL7Message.sending_application == header.sending_application[:227],
            HL7Message.control_id == header.control_id[:199],
            HL7Message.ack_code == AckCode.ACCEPT.value,
            HL7Message.status != MessageStatus.DUPLICATE.value,
        )
    ).one_or_none()


def store(
    *,
    session: Session,
    raw: bytes,
    verdict: Verdict,
    source: str | None,
    now: datetime | None = None,
) -> HL7Message:
    """Add the message to the store, as a ``duplicate`` when an accepted message with the
    same sender and MSH-10 is there already, and audit it (one record, no message text)."""
    header = verdict.header
    original = (
        _original(session, header)
        if header is not None and header.control_id and verdict.error is None
        else None
    )
    if original is not None:
        status = MessageStatus.DUPLICATE
    elif verdict.error is not None:
        status = MessageStatus.FAILED
    else:
        status = MessageStatus.RECEIVED
    row = HL7Message(
        received_at=now or datetime.now(UTC),
        source=source[:64] if source else None,
        control_id=header.control_id[:199] or None if header else None,
        sending_application=header.sending_application[:227] if header else "",
        sending_facility=header.sending_facility[:227] if header else "",
        message_type=header.message_type[:16] or None if header else None,
        encoding=verdict.encoding,
        raw=sealing.seal_for(session, raw),
        status=status.value,
        ack_code=verdict.ack.value,
        error=verdict.error.text if verdict.error else None,
        duplicate_of=original.id if original is not None else None,
    )
    session.add(row)
    session.flush()
    _audit(session, row, source, len(raw))
    return row


def _audit(session: Session, row: HL7Message, source: str | None, size: int) -> None:
    outcome = {
        AckCode.ACCEPT.value: AuditOutcome.SUCCESS,
        AckCode.ERROR.value: AuditOutcome.MINOR_FAILURE,
    }.get(row.ack_code, AuditOutcome.SERIOUS_FAILURE)
    sender = "^".join(part for part in (row.sending_application, row.sending_facility) if part)
    audit.record(
        session=session,
        actor=audit.Actor.system(f"hl7:{sender}" if sender else "hl7"),
        event_type=AuditEventType.HL7_MESSAGE_RECEIVED,
        action=AuditAction.CREATE,
        outcome=outcome,
        object_type="hl7-message",
        object_id=str(row.id),
        source=source,
        detail={
            "control_id": row.control_id,
            "message_type": row.message_type,
            "ack": row.ack_code,
            "status": row.status,
            "encoding": row.encoding,
            "bytes": size,
            **({"duplicate_of": row.duplicate_of} if row.duplicate_of else {}),
            **({"error": row.error} if row.error else {}),
        },
    )


def ack_for(verdict: Verdict, control_id: str, *, application: str = "CLOUDFILM") -> str:
    """The ACK text for ``verdict`` (the caller encodes it in the message's encoding)."""
    return build_ack(
        verdict.header,
        verdict.ack,
        control_id=control_id,
        error=verdict.error,
        application=application,
    )


def process(*, session: Session, row: HL7Message, now: datetime | None = None) -> bool:
    """Run the handler of ``row``'s type and set its status; False when none is registered
    (the status stays ``received``). A handler's error propagates: the caller rolls back
    and records it with :func:`mark_failed`."""
    verdict = examine(raw_of(session=session, row=row))
    if verdict.message is None:
        raise ValueError(f"message {row.id} does not parse: {verdict.error}")
    if not handlers.run(session=session, message=verdict.message, record=row):
        return False
    row.status = MessageStatus.PROCESSED.value
    row.error = None
    row.processed_at = now or datetime.now(UTC)
    session.flush()
    return True


def raw_of(*, session: Session, row: HL7Message) -> bytes:
    """The message's bytes exactly as received (the store keeps them sealed)."""
    return sealing.open_for(session, row.raw)


def mark_failed(
    *,
    session: Session,
    message_id: int,
    error: str,
    ack: AckCode | None = None,
    code: str | None = None,
) -> None:
    """Status ``failed`` with ``error``; ``ack`` when the sender is answered with it (AE
    for a message whose handler failed on arrival: it then no longer counts as accepted,
    so a corrected resend under the same MSH-10 is taken as new; audited with the ERR
    ``code``)."""
    row = session.get(HL7Message, message_id)
    if row is not None:
        row.status = MessageStatus.FAILED.value
        row.error = error[:2000]
        if ack is not None:
            row.ack_code = ack.value
        session.flush()
        if ack is not None:
            audit.record(
                session=session,
                actor=audit.Actor.system("hl7"),
                event_type=AuditEventType.HL7_MESSAGE_FAILED,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.MINOR_FAILURE,
                object_type="hl7-message",
                object_id=str(row.id),
                source=row.source,
                detail={
                    "control_id": row.control_id,
                    "message_type": row.message_type,
                    "ack": row.ack_code,
                    **({"code": code} if code else {}),
                },
            )


def list_messages(
    *,
    session: Session,
    status: str | None = None,
    message_type: str | None = None,
    limit: int = 100,
) -> list[HL7Message]:
    """Newest first; ``message_type`` ``ADT`` matches every ADT trigger."""
    query = select(HL7Message).order_by(HL7Message.id.desc()).limit(limit)
    if status:
        query = query.where(HL7Message.status == status)
    if message_type:
        pattern = message_type.upper()
        if "^" in pattern:
            query = query.where(HL7Message.message_type == pattern)
        else:
            query = query.where(HL7Message.message_type.like(f"{pattern}^%"))
    return list(session.scalars(query))
