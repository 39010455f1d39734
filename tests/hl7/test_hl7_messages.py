"""Message text without the network: character sets, MSH, ACKs, the store and handlers."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.hl7 import handlers, service
from cloudfilm.hl7.listener import process
from cloudfilm.hl7.messages import (
    AckCode,
    ErrorCode,
    MessageError,
    build_ack,
    charset_of,
    decode,
    read_header,
)
from cloudfilm.hl7.models import HL7Message

MSH = "MSH|^~\\&|RIS|人民医院|CF|影像科|20261128||ORU^R01^ORU_R01|M1|P|2.5|||||CHN|{cs}\r"


@pytest.mark.parametrize(
    ("charset", "codec"),
    [("UNICODE UTF-8", "utf-8"), ("GB 18030-2000", "gb18030"), ("GBK", "gb18030"),
     ("", "utf-8")],
)  # fmt: skip
def test_decode__follows_msh18(charset: str, codec: str) -> None:
    text = MSH.format(cs=charset) + "PID|1||1||欧阳娜娜\r"
    decoded = decode(text.encode(codec))
    assert decoded.encoding == codec and decoded.text == text


def test_decode__wrong_declared_charset_is_rejected() -> None:
    raw = (MSH.format(cs="UNICODE UTF-8") + "PID|1||1||王芳\r").encode("gb18030")
    with pytest.raises(MessageError) as info:
        decode(raw)
    assert info.value.ack is AckCode.REJECT


def test_charset_of__first_repetition() -> None:
    assert charset_of(MSH.format(cs="GB 18030-2000~UNICODE UTF-8").encode()) == "GB 18030-2000"


def test_read_header__fields() -> None:
    header = read_header(MSH.format(cs="UNICODE UTF-8"))
    assert header.message_type == "ORU^R01"
    assert (header.sending_application, header.sending_facility) == ("RIS", "人民医院")
    assert header.control_id == "M1" and header.charset == "UNICODE UTF-8"


def test_build_ack__swaps_and_escapes() -> None:
    header = read_header(MSH.format(cs="UNICODE UTF-8"))
    error = MessageError(AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "a|b^c&d~e\\f", "PID^1^3")
    ack = hl7.parse(build_ack(header, AckCode.ERROR, control_id="A1", error=error))
    msh = ack.segment("MSH")
    assert [str(msh[i]) for i in (3, 4, 5, 6)] == ["CF", "影像科", "RIS", "人民医院"]
    assert str(msh[9]) == "ACK^R01^ACK" and str(msh[10]) == "A1"
    assert str(ack.segment("MSA")[1]) == "AE" and str(ack.segment("MSA")[2]) == "M1"
    err = ack.segment("ERR")
    assert str(err[2]) == "PID^1^3" and str(err[3][0][0]) == "101" and str(err[4]) == "E"
    assert ack.unescape(str(err[8])) == "a|b^c&d~e\\f"


def test_build_ack__without_header() -> None:
    text = build_ack(None, AckCode.REJECT, control_id="X")
    assert text.startswith("MSH|^~\\&|CLOUDFILM||||") and "\rMSA|AR|\r" in text


def _take(archive: Archive, raw: bytes) -> HL7Message:
    with archive.db.session() as session:
        return service.store(session=session, raw=raw, verdict=service.examine(raw), source="t")


def test_handler__failure_recorded_then_replayed(archive: Archive) -> None:
    raw = (MSH.format(cs="UNICODE UTF-8") + "PID|1||1||李小龙\r").encode()
    row = _take(archive, raw)
    broken = True

    reports = handlers.handler_for("ORU^R01")
    assert reports is not None

    @handlers.register("ORU^R01")
    def report(*, session: Any, message: Any, record: HL7Message) -> None:  # noqa: ARG001
        if broken:
            raise RuntimeError("no order for this report")

    try:
        assert process(archive.db, row.id) == "failed"
        broken = False
        assert process(archive.db, row.id) == "processed"
    finally:
        handlers.register("ORU^R01")(reports)
    with archive.db.read_session() as session:
        stored = session.scalars(select(HL7Message)).one()
        assert stored.status == "processed" and stored.error is None
        assert service.list_messages(session=session, message_type="ORU") == [stored]
        assert service.list_messages(session=session, message_type="ORU^R01") == [stored]
        assert service.list_messages(session=session, status="failed") == []


def test_process__without_handler_stays_received(archive: Archive) -> None:
    pending = MSH.replace("ORU^R01^ORU_R01", "ADT^A05^ADT_A05")  # no A05 handler (yet)
    row = _take(archive, (pending.format(cs="") + "PID|1\r").encode())
    assert process(archive.db, row.id) == "received"


def test_store__sealed_at_rest_and_earlier_clear_rows_still_read(archive: Archive) -> None:
    from cloudfilm.crypto.keys import SealError
    from cloudfilm.hl7.sealing import MAGIC, open_raw

    raw = MSH.format(cs="UNICODE UTF-8") + "PID|1||1^^^HIS^PI~11010519491231002X^^^CHN^NNCHN\r"
    row = _take(archive, raw.encode())
    assert row.raw.startswith(MAGIC) and b"11010519491231002X" not in row.raw
    with archive.db.read_session() as session:
        assert service.raw_of(session=session, row=row) == raw.encode()
    assert open_raw(archive.settings, raw.encode()) == raw.encode()  # stored before sealing
    tampered = row.raw[:-1] + bytes([row.raw[-1] ^ 1])
    with pytest.raises(SealError):
        open_raw(archive.settings, tampered)
