"""The charge message to the HIS: HL7 v2.5.1 DFT^P03 (6.4.3 Post Detail Financial
Transaction) over MLLP with python-hl7's MLLP client, and the reading of its ACK
(parsed with python-hl7).

One message per charge::

    MSH|^~\\&|CLOUDFILM||HIS||20261128093000+0800||DFT^P03^DFT_P03|CF…|P|2.5.1|||AL|NE||
        UNICODE UTF-8
    EVN|P03|20261128093000+0800
    PID|1||<patient ID>^^^^PI
    FT1|1|<charge id>||<event time>|<posted>|CG|<item code>^<item name>|<item name>||1|
        20.00&CNY|20.00&CNY|<department>|||||||||<accession number>||<modality>^<exam name>

(each segment on one line; wrapped here).

FT1-6 transaction type is ``CG`` (charge) or ``CD`` (credit: a reversal, with FT1-10
quantity -1 and negative amounts); FT1-23 filler order number carries the exam's
accession number. MSH-10 is the charge's own control ID, the same on every attempt, so
that the HIS can drop a repeat.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from hl7.client import EB, MLLPClient  # type: ignore[import-untyped]

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type hints
from cloudfilm.billing.models import Charge, ChargeKind
from cloudfilm.config import BillingSettings
from cloudfilm.orders.service import LOCAL_ZONE

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}


def escape(value: str) -> str:
    """Free text for a field (2.7.4 escape sequences; line breaks become spaces)."""
    return "".join(_ESCAPES.get(c, " " if c in "\r\n" else c) for c in value)


def _ts(moment: datetime) -> str:
    """TS in China Standard Time with its offset (the HIS's local time)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(LOCAL_ZONE).strftime("%Y%m%d%H%M%S+0800")


def build_dft(charge: Charge, billing: BillingSettings, application: str, now: datetime) -> str:
    """The DFT^P03 of ``charge`` (segments ended by CR)."""
    credit = charge.kind == ChargeKind.REVERSAL.value
    money = f"{charge.amount:.2f}&{charge.currency}"
    unit = f"{charge.unit_price:.2f}&{charge.currency}"
    msh = (
        f"MSH|^~\\&|{escape(application)}||{escape(billing.hl7_receiving_application)}|"
        f"{escape(billing.hl7_receiving_facility)}|{_ts(now)}||DFT^P03^DFT_P03|"
        f"{charge.control_id}|P|2.5.1|||AL|NE||UNICODE UTF-8"
    )
    ft1 = [
        "FT1",
        "1",
        str(charge.id),  # FT1-2 transaction ID
        "",
        _ts(charge.event_at),  # FT1-4 transaction date
        _ts(now),  # FT1-5 posting date
        "CD" if credit else "CG",  # FT1-6 transaction type (table 0017)
        f"{escape(charge.item_code)}^{escape(charge.item_name)}",  # FT1-7 transaction code
        escape(charge.item_name),  # FT1-8 description
        "",
        str(charge.quantity),  # FT1-10 quantity
        money,  # FT1-11 extended amount
        unit,  # FT1-12 unit amount
        escape(charge.department),  # FT1-13 department code
        *[""] * 9,  # FT1-14 .. FT1-22
        escape(charge.accession_number),  # FT1-23 filler order number
        "",
        f"{escape(charge.modality)}^{escape(charge.exam_name)}",  # FT1-25 procedure code
    ]
    segments = [
        msh,
        f"EVN|P03|{_ts(now)}",
        f"PID|1||{escape(charge.patient_id)}^^^^PI",
        "|".join(ft1),
    ]
    return "\r".join(segments) + "\r"


@dataclass(frozen=True, slots=True)
class Answer:
    code: str
    """MSA-1: AA, AE, AR (or CA/CE/CR in enhanced mode)."""
    text: str
    """The error text (ERR-8, ERR-3.2, MSA-3), empty on AA."""


class NoAnswer(Exception):
    """Nothing usable came back (refused connection, timeout, closed, not an ACK)."""


def read_ack(raw: bytes, control_id: str) -> Answer:
    """MSA of an ACK to the message ``control_id``."""
    text = raw.strip(b"\x0b\x1c\r\n").decode("utf-8", "replace")
    try:
        message = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))
        msa = message.segment("MSA")
    except Exception as exc:  # python-hl7 raises several types on bad input
        raise NoAnswer(f"the answer is not an HL7 ACK ({type(exc).__name__})") from exc
    code = str(msa[1]).strip().upper() if len(msa) > 1 else ""
    acked = str(msa[2]).strip() if len(msa) > 2 else ""
    if acked != control_id:
        raise NoAnswer(f"the ACK answers message {acked[:40]!r}, not {control_id}")
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise NoAnswer(f"MSA-1 {code[:8]!r} is not an acknowledgement code")
    reason = str(msa[3]).strip() if len(msa) > 3 else ""
    try:
        err = message.segment("ERR")
    except KeyError:
        err = None
    if err is not None:
        user = str(err[8]).strip() if len(err) > 8 else ""
        condition = str(err[3]).strip() if len(err) > 3 else ""
        reason = user or condition.replace("^", " ") or reason
    return Answer(code, message.unescape(reason) if reason else "")


class Client(MLLPClient):  # type: ignore[misc]
    """python-hl7's MLLP client with a connect/read timeout, reading up to the frame end."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.socket = socket.create_connection((host, port), timeout=timeout)
        self.encoding = "utf-8"

    def send(self, data: bytes) -> bytes:
        self.socket.sendall(data)
        received = b""
        while EB not in received:
            chunk = self.socket.recv(65536)
            if not chunk:
                raise NoAnswer("the HIS closed the connection without an ACK")
            received += chunk
            if len(received) > 1024 * 1024:
                raise NoAnswer("the answer is larger than 1 MB")
        return received


def send_dft(message: str, host: str, port: int, timeout: float) -> bytes:
    """Send one message and return the ACK frame; :class:`NoAnswer` when none came."""
    try:
        with Client(host, port, timeout) as client:
            reply: bytes = client.send_message(message)
            return reply
    except (OSError, TimeoutError) as exc:
        raise NoAnswer(f"{type(exc).__name__}: {exc}"[:300]) from exc
