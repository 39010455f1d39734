"""The MLLP listener against a test archive (SQLite and PostgreSQL): python-hl7's MLLP
client sends a day of messages with Chinese names in UTF-8 and GB 18030."""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hl7.client import MLLPClient
from sqlalchemy import func, select

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.config import HL7Settings
from cloudfilm.hl7 import handlers
from cloudfilm.hl7.listener import HL7Listener, process
from cloudfilm.hl7.models import HL7Message
from cloudfilm.hl7.sealing import MAGIC, open_raw

NAMES = ["张三丰", "李小龙", "欧阳娜娜", "王芳"]
CHARSET = {"utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000"}
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n" * 20


def message(kind: str, control_id: str, encoding: str = "utf-8", name: str = "张三丰",
            charset: str | None = None, facility: str = "人民医院",
            prior: str = "POLD001") -> bytes:  # fmt: skip
    """One HL7 v2.5 message of type ``kind`` (``ADT^A01`` ...), encoded as a sender would;
    the patient is ``P<control_id>``, an A40 merges patient ``prior`` into it."""
    msh18 = CHARSET[encoding] if charset is None else charset
    structure = {"ADT^A01": "ADT_A01", "ADT^A08": "ADT_A01", "ADT^A40": "ADT_A39",
                 "ORM^O01": "ORM_O01", "ORU^R01": "ORU_R01"}.get(kind, "")  # fmt: skip
    segments = [
        f"MSH|^~\\&|HIS|{facility}|CLOUDFILM|影像科|20261128083000||{kind}^{structure}|"
        f"{control_id}|P|2.5|||AL|NE|CHN|{msh18}",
        "EVN|A01|20261128083000",
        f"PID|1||P{control_id}^^^HIS^PI||{name}^^^^^^L||19800101|M|||北京市海淀区^^北京",
        "PV1|1|O|放射科^^^人民医院",
    ]
    if kind == "ADT^A40":
        segments.append(f"MRG|{prior}^^^HIS^PI")
    if kind == "ORM^O01":
        segments += ["ORC|NW|ORD1|ACC1", "OBR|1|ORD1|ACC1|CT001^胸部CT平扫"]
    if kind == "ORU^R01":
        pdf = base64.b64encode(PDF).decode("ascii")
        segments += [
            "OBR|1|ORD1|ACC1|CT001^胸部CT平扫|||20261128090000||||||||||||||||||F",  # OBR-25
            "OBX|1|TX|RPT^报告||两肺纹理清晰，未见明显异常。||||||F",
            f"OBX|2|ED|PDF^报告PDF||^application^pdf^Base64^{pdf}||||||F",
        ]
    return ("\r".join(segments) + "\r").encode(encoding)


def parse_ack(data: bytes, encoding: str = "utf-8") -> Any:
    assert data.startswith(b"\x0b") and data.endswith(b"\x1c\x0d"), data
    return hl7.parse(data[1:-2].decode(encoding))


def send_raw(port: int, data: bytes, timeout: float = 5, *, hang_up: bool = False) -> bytes:
    """Write ``data`` as is (then, with ``hang_up``, close our side), read until the peer's
    EB CR or close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while not received.endswith(b"\x1c\x0d"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


@pytest.fixture
def listener(archive: Archive) -> Iterator[HL7Listener]:
    server = HL7Listener(archive.db, HL7Settings(port=0, max_message_bytes=200_000,
                                                 idle_timeout_seconds=5))  # fmt: skip
    server.start()
    yield server
    server.stop()


def rows(archive: Archive) -> list[HL7Message]:
    with archive.db.read_session() as session:
        return list(session.scalars(select(HL7Message).order_by(HL7Message.id)))


DAY = ["ADT^A01", "ADT^A08", "ORM^O01", "ORU^R01", "ADT^A40"]


@pytest.mark.parametrize("encoding", ["utf-8", "gb18030"])
def test_listener__day_of_messages_acked_after_store(
    archive: Archive, listener: HL7Listener, encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: dict[str, bytes] = {}
    with MLLPClient("127.0.0.1", listener.port, encoding=encoding) as client:
        for n, kind in enumerate(DAY * 2):  # many messages on one connection
            control_id = f"{encoding[:2].upper()}{n:04d}"
            # The day's A40 merges the patient its A01 registered into a new one.
            first = f"P{encoding[:2].upper()}{n - n % len(DAY):04d}"
            raw = message(kind, control_id, encoding, name=NAMES[n % len(NAMES)], prior=first)
            sent[control_id] = raw
            ack = parse_ack(client.send_message(raw), encoding)
            assert str(ack.segment("MSA")[1]) == "AA"
            assert str(ack.segment("MSA")[2]) == control_id
            msh = ack.segment("MSH")
            # Sender and receiver swapped; the ACK in the sender's character set.
            assert str(msh[3]) == "CLOUDFILM" and str(msh[4]) == "影像科"
            assert str(msh[5]) == "HIS" and str(msh[6]) == "人民医院"
            assert str(msh[9]) == f"ACK^{kind.split('^')[1]}^ACK"
            assert str(msh[18]) == CHARSET[encoding]
    stored = rows(archive)
    assert {row.control_id: open_raw(archive.settings, row.raw) for row in stored} == sent
    # Sealed at rest: the names (and the ID numbers a PID carries) are not in the column.
    for row in stored:
        assert row.raw.startswith(MAGIC)
        assert not any(name.encode(encoding) in row.raw for name in NAMES)
    assert {row.encoding for row in stored} == {encoding}
    # ADT applied to the patient index, ORM to the orders, ORU to the reports.
    assert {row.status for row in stored} == {"processed"}
    assert {row.message_type for row in stored} == set(DAY)
    with archive.db.read_session() as session:
        audited = session.scalar(
            select(func.count()).where(AuditEvent.event_type == "hl7-message-received")
        )
    assert audited == len(sent)
    logs = caplog.text
    assert "AA" in logs
    for name in NAMES:
        assert name not in logs


def test_listener__gb18030_without_msh18_falls_back(
    archive: Archive, listener: HL7Listener
) -> None:
    raw = message("ADT^A01", "NOCS1", "gb18030", charset="")
    with MLLPClient("127.0.0.1", listener.port) as client:
        ack = parse_ack(client.send_message(raw), "gb18030")
    assert str(ack.segment("MSA")[1]) == "AA"
    [row] = rows(archive)
    assert row.encoding == "gb18030" and open_raw(archive.settings, row.raw) == raw


def test_listener__duplicate_processed_once(archive: Archive, listener: HL7Listener) -> None:
    calls: list[str] = []
    previous = handlers.handler_for("ADT^A01")

    @handlers.register("ADT^A01")
    def count(*, session: Any, message: Any, record: HL7Message) -> None:  # noqa: ARG001
        calls.append(str(message.segment("PID")[5]))

    try:
        raw = message("ADT^A01", "DUP1")
        with MLLPClient("127.0.0.1", listener.port) as client:
            first = parse_ack(client.send_message(raw))
            again = parse_ack(client.send_message(raw))
        for ack in (first, again):
            assert str(ack.segment("MSA")[1]) == "AA"
            assert str(ack.segment("MSA")[2]) == "DUP1"
        original, duplicate = rows(archive)
        assert original.status == "processed" and original.processed_at is not None
        assert duplicate.status == "duplicate" and duplicate.duplicate_of == original.id
        assert open_raw(archive.settings, duplicate.raw) == raw
        assert calls == ["张三丰^^^^^^L"]
        # Replay runs the handler again on purpose (an operator's decision).
        assert process(archive.db, original.id) == "processed"
        assert len(calls) == 2
    finally:
        handlers.unregister("ADT^A01")
        if previous is not None:
            handlers.register("ADT^A01")(previous)


def test_listener__bad_input_answered_and_listener_keeps_serving(
    archive: Archive, listener: HL7Listener
) -> None:
    port = listener.port

    def answer(data: bytes) -> Any:
        return parse_ack(send_raw(port, data))

    no_msh = answer(b"\x0bPID|1||123||X^Y\r\x1c\x0d")
    assert str(no_msh.segment("MSA")[1]) == "AR"
    assert "MSH" in str(no_msh.segment("ERR")[8])

    bad_separators = answer(b"\x0bMSH|^~|HIS|H|CF|CF|2026||ADT^A01|S1|P|2.5\r\x1c\x0d")
    assert str(bad_separators.segment("MSA")[1]) == "AR"
    assert str(bad_separators.segment("MSA")[2]) == "S1"

    no_control_id = answer(b"\x0b" + message("ADT^A01", "") + b"\x1c\x0d")
    assert str(no_control_id.segment("MSA")[1]) == "AE"
    assert str(no_control_id.segment("ERR")[3][0][0]) == "101"

    unknown = answer(b"\x0b" + message("ZZZ^Z01", "U1") + b"\x1c\x0d")
    assert str(unknown.segment("MSA")[1]) == "AE"
    assert str(unknown.segment("ERR")[3][0][0]) == "200"

    not_utf8 = answer(b"\x0b" + message("ADT^A01", "E1", "gb18030", charset="UNICODE UTF-8")
                      + b"\x1c\x0d")  # fmt: skip
    assert str(not_utf8.segment("MSA")[1]) == "AR"

    no_start = send_raw(port, b"MSH|^~\\&|junk\x1c\x0d")
    assert str(parse_ack(no_start).segment("MSA")[1]) == "AR"

    oversize = send_raw(port, b"\x0b" + message("ADT^A01", "BIG") + b"X" * 300_000 + b"\x1c\x0d")
    assert str(parse_ack(oversize).segment("MSA")[1]) == "AR"

    truncated = send_raw(port, b"\x0b" + message("ADT^A01", "T1")[:40], hang_up=True)
    assert truncated == b""

    with MLLPClient("127.0.0.1", port) as client:
        ack = parse_ack(client.send_message(message("ADT^A01", "OK1")))
    assert str(ack.segment("MSA")[1]) == "AA"

    stored = {row.control_id: row for row in rows(archive)}
    assert stored["OK1"].status == "processed"
    assert "T1" not in stored and "BIG" not in stored
    assert stored["U1"].status == "failed" and stored["U1"].ack_code == "AE"
    assert stored["S1"].ack_code == "AR"
    # A corrected resend under the same MSH-10 as a refused message is taken as new.
    with MLLPClient("127.0.0.1", port) as client:
        ack = parse_ack(client.send_message(message("ADT^A08", "U1")))
    assert str(ack.segment("MSA")[1]) == "AA"


def test_listener__restart_loses_nothing_acked(archive: Archive) -> None:
    settings = HL7Settings(port=0)
    acked: list[str] = []
    server = HL7Listener(archive.db, settings)
    server.start()
    port = server.port
    try:
        with MLLPClient("127.0.0.1", port) as client:
            for n in range(3):
                ack = parse_ack(client.send_message(message(DAY[n], f"R{n}", prior="PR0")))
                assert str(ack.segment("MSA")[1]) == "AA"
                acked.append(f"R{n}")
    finally:
        server.stop()
    server = HL7Listener(archive.db, settings, port=port)
    server.start()
    try:
        with MLLPClient("127.0.0.1", port) as client:
            for n in range(2, 5):  # R2 again: the sender did not see its ACK
                ack = parse_ack(client.send_message(message(DAY[n], f"R{n}", prior="PR0")))
                assert str(ack.segment("MSA")[1]) == "AA"
                acked.append(f"R{n}")
    finally:
        server.stop()
    stored = rows(archive)
    assert {row.control_id for row in stored} == set(acked)
    assert [row.status for row in stored if row.control_id == "R2"] == ["processed", "duplicate"]


def test_listener__refuses_peers_outside_allowed_sources(archive: Archive) -> None:
    server = HL7Listener(archive.db, HL7Settings(port=0, allowed_sources=["10.0.0.0/8"]))
    server.start()
    try:
        assert send_raw(server.port, b"\x0b" + message("ADT^A01", "X1") + b"\x1c\x0d") == b""
    finally:
        server.stop()
    assert rows(archive) == []


def test_listener__python_hl7_asyncio_client(archive: Archive, listener: HL7Listener) -> None:
    """python-hl7's asyncio MLLP client: a burst of messages on one connection, in GB 18030."""
    import asyncio

    import hl7.mllp

    async def send_all() -> list[Any]:
        reader, writer = await hl7.mllp.open_hl7_connection(
            "127.0.0.1", listener.port, encoding="gb18030"
        )
        acks = []
        for n in range(20):
            first = f"PAS{n - n % len(DAY):03d}"  # each A40 merges its cycle's A01 patient
            raw = message(DAY[n % len(DAY)], f"AS{n:03d}", "gb18030", prior=first)
            text = raw.decode("gb18030")
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            acks.append(await reader.readmessage())
        writer.close()
        await writer.wait_closed()
        return acks

    acks = asyncio.run(send_all())
    assert [str(ack.segment("MSA")[2]) for ack in acks] == [f"AS{n:03d}" for n in range(20)]
    assert {str(ack.segment("MSA")[1]) for ack in acks} == {"AA"}
    assert len(rows(archive)) == 20


def test_listener__same_message_on_two_connections_at_once(
    archive: Archive, listener: HL7Listener
) -> None:
    """A sender retrying on a second connection while the first is still waiting: one
    original, the rest duplicates, every copy answered AA."""
    from concurrent.futures import ThreadPoolExecutor

    raw = message("ORM^O01", "RACE1")

    def send(_: int) -> Any:
        with MLLPClient("127.0.0.1", listener.port) as client:
            return parse_ack(client.send_message(raw))

    with ThreadPoolExecutor(4) as pool:
        acks = list(pool.map(send, range(4)))
    assert {str(ack.segment("MSA")[1]) for ack in acks} == {"AA"}
    statuses = sorted(row.status for row in rows(archive))
    assert statuses == ["duplicate", "duplicate", "duplicate", "processed"]


def test_listener__connections_beyond_the_limit_are_closed(archive: Archive) -> None:
    server = HL7Listener(archive.db, HL7Settings(port=0, max_connections=1))
    server.start()
    try:
        with MLLPClient("127.0.0.1", server.port) as first:
            ack = parse_ack(first.send_message(message("ADT^A01", "L1")))
            assert str(ack.segment("MSA")[1]) == "AA"
            assert send_raw(server.port, b"\x0b" + message("ADT^A01", "L2") + b"\x1c\x0d") == b""
        # Once the listener has seen the first one go, a new connection is served.
        deadline = time.monotonic() + 5
        frame = b"\x0b" + message("ADT^A01", "L3") + b"\x1c\x0d"
        while not (answer := send_raw(server.port, frame)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert str(parse_ack(answer).segment("MSA")[1]) == "AA"
    finally:
        server.stop()
    assert [row.control_id for row in rows(archive)] == ["L1", "L3"]
