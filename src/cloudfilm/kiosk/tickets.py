"""Kiosk tickets: what a kiosk gets for a scan or a card read, and shows again to download
and to confirm a print.

A ticket names the kiosk (its client id), whose reports it opens (a person of the patient
index, or one report when the QR code's report has no person) and when it expires (at
most ``kiosk.ticket_minutes``, ≤ 10). It is signed with HMAC-SHA256 under a key derived
from the application secret, so every server process accepts it and nothing is stored;
it opens nothing by itself: every use also needs the kiosk's own bearer token.

Format: ``kt1.<base64url JSON>.<base64url MAC>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cloudfilm.config import Settings
from cloudfilm.crypto.keys import application_secret
from cloudfilm.errors import PermissionDenied

PREFIX = "kt1"
MAX_LENGTH = 512
"""Longer ``X-Kiosk-Ticket`` values are not parsed at all."""


class TicketRefused(PermissionDenied):
    """A ticket that is forged, expired, or another kiosk's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Subject:
    """Whose reports a ticket opens: ``person`` (a person id of the patient index) or
    ``report`` (one report, when its QR code names no person)."""

    kind: str
    id: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class Ticket:
    kiosk: str
    subject: Subject
    expires_at: datetime


@lru_cache(maxsize=8)
def _key(secret: bytes) -> bytes:
    return hmac.new(secret, b"cloudfilm-kiosk-ticket-v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(settings: Settings, *, kiosk: str, subject: Subject, now: datetime) -> Ticket:
    """A ticket for ``kiosk`` over ``subject``, valid ``kiosk.ticket_minutes`` from ``now``."""
    expires = now + timedelta(minutes=settings.kiosk.ticket_minutes)
    return Ticket(kiosk, subject, expires.replace(microsecond=0))


def encode(settings: Settings, ticket: Ticket) -> str:
    body = json.dumps(
        {
            "k": ticket.kiosk,
            "s": ticket.subject.kind,
            "i": ticket.subject.id,
            "e": int(ticket.expires_at.timestamp()),
        },
        separators=(",", ":"),
    ).encode("utf-8")
    signed = f"{PREFIX}.{_b64(body)}"
    mac = hmac.new(_key(application_secret(settings)), signed.encode("ascii"), hashlib.sha256)
    return f"{signed}.{_b64(mac.digest())}"


_INVALID = (
    "ticket_invalid",
    "自助打印凭证无效，请重新扫码或读卡 · the kiosk ticket is not valid: scan the code or read "
    "the card again",
)


def decode(settings: Settings, text: str, *, kiosk: str, now: datetime) -> Ticket:
    """The ticket ``text`` if it is ours, unexpired and ``kiosk``'s.

    Raises
    ------
    TicketRefused
        ``ticket_invalid`` (forged, damaged, missing), ``ticket_expired``, or
        ``ticket_other_kiosk`` (issued to another kiosk).
    """
    text = (text or "").strip()
    parts = text.split(".")
    if len(text) > MAX_LENGTH or len(parts) != 3 or parts[0] != PREFIX:
        raise TicketRefused(*_INVALID)
    signed = f"{parts[0]}.{parts[1]}"
    try:
        mac = hmac.new(_key(application_secret(settings)), signed.encode("ascii"), hashlib.sha256)
        given = _unb64(parts[2])
        if not hmac.compare_digest(mac.digest(), given):
            raise TicketRefused(*_INVALID)
        body = json.loads(_unb64(parts[1]))
        ticket = Ticket(
            str(body["k"]),
            Subject(str(body["s"]), int(body["i"])),
            datetime.fromtimestamp(int(body["e"]), UTC),
        )
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError):
        raise TicketRefused(*_INVALID) from None
    if ticket.subject.kind not in ("person", "report"):
        raise TicketRefused(*_INVALID)
    if ticket.expires_at <= now:
        raise TicketRefused(
            "ticket_expired",
            "自助打印凭证已过期，请重新扫码或读卡 · the kiosk ticket expired: scan the code or "
            "read the card again",
        )
    if not hmac.compare_digest(ticket.kiosk.encode("utf-8"), kiosk.encode("utf-8")):
        raise TicketRefused(
            "ticket_other_kiosk",
            "该凭证属于另一台自助机 · this ticket was issued to another kiosk",
        )
    return ticket
