"""HL7 v2 message text: character sets, the MSH header, parsing and acknowledgements.

References are to HL7 v2.5.1 chapter 2 (Control): 2.14.9 MSH, 2.14.8 MSA, 2.14.5 ERR,
2.9.2 original-mode acknowledgement, and tables 0008 (acknowledgement code), 0211
(alternate character sets) and 0357 (message error condition codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import hl7  # type: ignore[import-untyped]  # python-hl7 ships no type hints

#: MSH-18 values (HL7 table 0211 and what Chinese HIS/RIS send) → Python codec.
CHARSETS: dict[str, str] = {
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "GB 18030": "gb18030",
    "GB2312": "gb18030",  # GB 18030 is a superset of GB 2312 and GBK
    "GBK": "gb18030",
    "ASCII": "utf-8",
    "8859/1": "latin-1",
}

#: The message codes (MSH-9.1) this archive takes in; anything else is answered AE 200.
KNOWN_MESSAGE_CODES = frozenset({"ADT", "ORM", "OMI", "ORU", "DFT"})


class AckCode(StrEnum):
    """HL7 table 0008, original mode."""

    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


class ErrorCode(StrEnum):
    """HL7 table 0357: ``code^text^HL70357`` in ERR-3."""

    SEGMENT_SEQUENCE = "100^Segment sequence error"
    REQUIRED_FIELD_MISSING = "101^Required field missing"
    DATA_TYPE_ERROR = "102^Data type error"
    UNSUPPORTED_MESSAGE_TYPE = "200^Unsupported message type"
    UNKNOWN_KEY = "204^Unknown key identifier"
    DUPLICATE_KEY = "205^Duplicate key identifier"
    APPLICATION_ERROR = "207^Application internal error"


class MessageError(Exception):
    """The message cannot be used; ``ack`` says how to answer, ``code`` and ``location``
    fill the ERR segment."""

    def __init__(
        self, ack: AckCode, code: ErrorCode, text: str, location: str | None = None
    ) -> None:
        super().__init__(text)
        self.ack = ack
        self.code = code
        self.text = text
        self.location = location


@dataclass(frozen=True, slots=True)
class Header:
    """What the store and the ACK need from MSH, read from the raw bytes.

    Read without the full parser, so that even a message that does not parse can be
    stored with its sender and answered with the right fields swapped.
    """

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str
    """MSH-9 code^trigger, e.g. ``ADT^A01`` (the structure component is left out)."""
    control_id: str
    processing_id: str
    version: str
    charset: str
    """MSH-18 as sent."""


@dataclass(frozen=True, slots=True)
class Decoded:
    text: str
    encoding: str
    """The codec the text was decoded with: ``utf-8`` or ``gb18030`` (or ``latin-1``)."""


def _msh_fields(raw: bytes) -> list[bytes]:
    """MSH split on its field separator: index ``n`` holds MSH-(n+1), as MSH-1 is the
    separator itself (2.14.9.1)."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise MessageError(
            AckCode.REJECT, ErrorCode.SEGMENT_SEQUENCE, "the message does not start with MSH"
        )
    separator = raw[3:4]
    if separator.isalnum() or separator in (b"\r", b"\n", b" "):
        raise MessageError(
            AckCode.REJECT,
            ErrorCode.SEGMENT_SEQUENCE,
            "MSH-1 field separator is missing or invalid",
            "MSH^1^1",
        )
    first = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r", 1)[0]
    return first.split(separator)


def charset_of(raw: bytes) -> str:
    """MSH-18 as sent (empty when absent)."""
    fields = _msh_fields(raw)
    value = fields[17] if len(fields) > 17 else b""
    # The first repetition names the character set of the whole message (2.14.9.18).
    repetition = fields[1][1:2] if len(fields) > 1 and len(fields[1]) > 1 else b"~"
    return value.split(repetition)[0].decode("ascii", "replace").strip()


def decode(raw: bytes) -> Decoded:
    """The message text in the character set MSH-18 names; without MSH-18 UTF-8, and
    GB 18030 when the bytes are not UTF-8 (Chinese senders that leave MSH-18 empty)."""
    declared = charset_of(raw).upper()
    codec = CHARSETS.get(declared)
    candidates = [codec] if codec else ["utf-8", "gb18030"]
    for candidate in candidates:
        try:
            return Decoded(raw.decode(candidate), candidate)
        except UnicodeDecodeError:
            continue
    raise MessageError(
        AckCode.REJECT,
        ErrorCode.APPLICATION_ERROR,
        f"the message is not valid {' or '.join(candidates)} text"
        + (f" (MSH-18 {declared!r})" if declared else ""),
        "MSH^1^18",
    )


def read_header(text: str) -> Header:
    """The MSH fields of ``text`` (decoded), leniently: missing fields are empty."""
    raw_first = text.replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    _msh_fields(raw_first.encode("utf-8"))  # checks "MSH" and the separator
    separator = raw_first[3]
    fields = raw_first.split(separator)
    encoding_characters = fields[1] if len(fields) > 1 else ""
    component = encoding_characters[0] if encoding_characters else "^"

    def field(number: int) -> str:
        index = number - 1
        return fields[index].strip() if len(fields) > index else ""

    type_parts = field(9).split(component)
    message_type = component.join(part for part in type_parts[:2] if part)
    repetition = encoding_characters[1:2] or "~"
    return Header(
        field_separator=separator,
        encoding_characters=encoding_characters,
        sending_application=field(3),
        sending_facility=field(4),
        receiving_application=field(5),
        receiving_facility=field(6),
        message_type=message_type,
        control_id=field(10),
        processing_id=field(11),
        version=field(12),
        charset=field(18).split(repetition)[0].strip(),
    )


def parse(text: str, header: Header) -> Any:
    """Parse with python-hl7 and check what every message needs (MSH-9, MSH-10).

    Raises
    ------
    MessageError
        AR when it does not parse; AE when it parses but is unusable here.
    """
    if len(header.encoding_characters) not in (3, 4) or header.field_separator in (
        header.encoding_characters
    ):
        raise MessageError(
            AckCode.REJECT,
            ErrorCode.SEGMENT_SEQUENCE,
            "MSH-2 encoding characters are invalid",
            "MSH^1^2",
        )
    # Segments end with CR (2.5.2); some senders end them with LF or CR LF.
    normalized = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        message = hl7.parse(normalized)
        message.segment("MSH")
    except Exception as exc:  # python-hl7 raises several types on bad input
        raise MessageError(
            AckCode.REJECT,
            ErrorCode.SEGMENT_SEQUENCE,
            f"the message cannot be parsed ({type(exc).__name__})",
        ) from exc
    if not header.message_type:
        raise MessageError(
            AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "MSH-9 message type is empty",
            "MSH^1^9",
        )  # fmt: skip
    if not header.control_id:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.REQUIRED_FIELD_MISSING,
            "MSH-10 message control ID is empty",
            "MSH^1^10",
        )
    code = header.message_type.split(header.encoding_characters[0])[0]
    if code not in KNOWN_MESSAGE_CODES:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"message type {header.message_type} is not taken in here "
            f"(known: {', '.join(sorted(KNOWN_MESSAGE_CODES))})",
            "MSH^1^9",
        )
    return message


def _escape(value: str, header: Header | None) -> str:
    """Free text for an ACK field: HL7 escape sequences for the delimiters (2.7.4)."""
    if header is None or len(header.encoding_characters) < 4:
        separators = ("|", "^", "~", "\\", "&")
        escape = "\\"
    else:
        separators = (header.field_separator, *header.encoding_characters)
        escape = header.encoding_characters[2]
    codes = {separators[0]: "F", separators[1]: "S", separators[2]: "R", separators[4]: "T"}
    out = []
    for char in value:
        if char == escape:
            out.append(f"{escape}E{escape}")
        elif char in codes:
            out.append(f"{escape}{codes[char]}{escape}")
        elif char in "\r\n":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def build_ack(
    header: Header | None,
    ack: AckCode,
    *,
    control_id: str,
    error: MessageError | None = None,
    application: str = "CLOUDFILM",
    facility: str = "",
    now: datetime | None = None,
) -> str:
    """An original-mode ACK (2.9.2): MSH with sender and receiver swapped, MSA-1 the
    code, MSA-2 the message's MSH-10, and an ERR segment when ``error`` is given.

    Without a usable header (the message did not even start with MSH) the ACK uses the
    standard delimiters and empty addressing.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    sep = header.field_separator if header else "|"
    enc = header.encoding_characters if header and len(header.encoding_characters) >= 3 else "^~\\&"
    comp = enc[0]
    trigger = ""
    if header and comp in header.message_type:
        trigger = header.message_type.split(comp)[1]
    received_by = header.receiving_application if header else ""
    msh = [
        "MSH",
        enc,
        received_by or application,
        (header.receiving_facility if header else "") or facility,
        header.sending_application if header else "",
        header.sending_facility if header else "",
        stamp,
        "",
        f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK",
        control_id,
        (header.processing_id if header else "") or "P",
        (header.version if header else "") or "2.5",
    ]
    if header and header.charset:
        msh += [""] * 5 + [header.charset]  # MSH-13..17 empty, MSH-18 as the sender's
    original_id = header.control_id if header else ""
    segments = [sep.join(msh), sep.join(["MSA", ack.value, _escape(original_id, header)])]
    if error is not None:
        code, text = error.code.value.split("^", 1)
        location = error.location or ""
        if location and comp != "^":
            location = location.replace("^", comp)
        segments.append(
            sep.join(
                [
                    "ERR",
                    "",  # ERR-1 (v2.4 and earlier) left empty
                    location,
                    f"{code}{comp}{text}{comp}HL70357",
                    "E",
                    "",
                    "",
                    "",
                    _escape(error.text, header),
                ]
            )
        )
    return "\r".join(segments) + "\r"
