"""The HIS's charge list: CSV in UTF-8 and GB 18030 and XLSX, bad lines reported one by
one with the good ones kept, files that are not charge lists refused whole; DFT^P03 from
the HIS over the MLLP listener (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from billing_helpers import MakeArchive, make_archive_fixture  # noqa: F401
from hl7.client import MLLPClient
from openpyxl import Workbook
from sqlalchemy import select

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.billing.importer import ImportRefused, import_file
from cloudfilm.billing.models import HisChargeLine, ImportBatch
from cloudfilm.billing.service import ImportResult
from cloudfilm.config import HL7Settings
from cloudfilm.errors import Conflict
from cloudfilm.hl7.listener import HL7Listener

HEADER = ["检查号", "患者ID", "收费项目编码", "金额", "科室", "收费时间"]
GOOD = [
    ["ACC1", "P1", "CF001", "20.00", "放射科", "2026-11-20 09:30:00"],
    ["ACC2", "P2", "CF001", "25.5", "超声科", "2026/11/20 10:05"],
    ["", "P3", "CF001", "-20", "放射科", "2026-11-21"],
]
BAD = [
    ["ACC4", "P4", "CF001", "二十元", "放射科", "2026-11-20 09:30:00"],  # amount
    ["ACC5", "P5", "CF001", "20.00", "放射科", "昨天"],  # time
    ["", "", "CF001", "20.00", "放射科", "2026-11-20 09:30:00"],  # no key
    ["ACC7", "P7", "", "20.00", "放射科", "2026-11-20 09:30:00"],  # no item
    ["ACC8", "P8", "CF001", "20.001", "放射科", "2026-11-20 09:30:00"],  # 3 decimals
]


def _csv(rows: list[list[str]]) -> str:
    return "\r\n".join(",".join(row) for row in rows) + "\r\n"


def _run(archive: Archive, data: bytes, name: str = "his.csv") -> ImportResult:
    with archive.db.session() as session:
        return import_file(
            session, data=data, file_name=name, billing=archive.settings.billing,
            actor=Actor.cli("pytest"),
        )  # fmt: skip


def _lines(archive: Archive) -> list[HisChargeLine]:
    with archive.db.read_session() as session:
        rows = list(session.scalars(select(HisChargeLine).order_by(HisChargeLine.id)))
        session.expunge_all()
    return rows


def _check_good_and_bad(archive: Archive, result: ImportResult) -> None:
    assert result.kept == 3
    assert [e.line for e in result.errors] == [3, 5, 7, 8, 9]
    messages = [e.message for e in result.errors]
    assert messages[0].startswith("第 3 行：金额 '二十元' 不是有效金额 · line 3: amount")
    assert "收费时间" in messages[1] and "line 5: charge time '昨天'" in messages[1]
    assert "neither accession number nor patient ID" in messages[2]
    assert "item code is empty" in messages[3]
    assert "line 9: amount '20.001'" in messages[4]
    assert all(" · " in m for m in messages)
    lines = _lines(archive)
    assert [(x.line_no, x.accession_number, x.patient_id, x.amount) for x in lines] == [
        (2, "ACC1", "P1", Decimal("20.00")),
        (4, "ACC2", "P2", Decimal("25.50")),
        (6, "", "P3", Decimal("-20.00")),
    ]
    moment = lines[0].charged_at
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    assert moment == datetime(2026, 11, 20, 1, 30, tzinfo=UTC)  # 09:30 China time
    assert lines[1].department == "超声科"
    with archive.db.read_session() as session:
        batch = session.get(ImportBatch, result.batch_id)
        assert batch is not None and (batch.line_count, batch.rejected_count) == (3, 5)
        assert [e["line"] for e in batch.errors] == [3, 5, 7, 8, 9]
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "billing-imported")
        ).one()
        assert event.object_id == str(result.batch_id) and event.detail["rejected"] == 5


def _interleaved() -> list[list[str]]:
    rows = [HEADER]
    for good, bad in zip(GOOD, BAD[:3], strict=True):
        rows += [good, bad]
    return rows + BAD[3:]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030"])
def test_import_csv__bad_lines_reported_good_kept(make_archive: MakeArchive, encoding: str) -> None:
    archive = make_archive()
    data = _csv(_interleaved()).encode(encoding)
    if encoding == "gb18030":
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")  # really not UTF-8
    result = _run(archive, data)
    assert result.file_format == "csv"
    _check_good_and_bad(archive, result)


def test_import_xlsx__bad_lines_reported_good_kept(make_archive: MakeArchive) -> None:
    archive = make_archive()
    book = Workbook()
    sheet = book.active
    for row in _interleaved():
        sheet.append(row)
    # Excel keeps numbers and times as such: an all-digit accession number, a float
    # amount and a datetime cell are read like their text forms.
    sheet.append([123456, "P9", "CF001", 30.5, "放射科", datetime(2026, 11, 22, 8, 0)])
    out = io.BytesIO()
    book.save(out)
    result = _run(archive, out.getvalue(), "his.xlsx")
    assert result.file_format == "xlsx" and result.kept == 4
    [*_, last] = _lines(archive)
    assert (last.accession_number, last.amount, last.line_no) == ("123456", Decimal("30.50"), 10)
    charged = last.charged_at if last.charged_at.tzinfo else last.charged_at.replace(tzinfo=UTC)
    assert charged == datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


def test_import__english_or_configured_headers(make_archive: MakeArchive) -> None:
    archive = make_archive(columns={"accession_number": ["申请单号"], "amount": ["实收"]})
    rows = [["申请单号", "患者ID", "收费项目编码", "实收", "收费时间"],
            ["R1", "P1", "CF001", "20", "2026-11-20 08:00"]]  # fmt: skip
    result = _run(archive, _csv(rows).encode())
    assert result.kept == 1 and _lines(archive)[0].accession_number == "R1"
    with pytest.raises(ImportRefused, match="金额.*amount"):
        _run(archive, _csv([HEADER, GOOD[0]]).encode(), "default-names.csv")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not CSV or XLSX"),
        (b"%PDF-1.7\n", "not CSV or XLSX"),
        ("检查号,患者ID\r\n".encode("utf-16"), "not CSV or XLSX"),
        (b"", "empty"),
        (_csv([HEADER, *GOOD]).encode()[:-25], "cut short at line 4"),
        (_csv([HEADER, GOOD[0]]).encode() + b'ACC9,"P9', "cut short or malformed at line 3"),
        ("姓名,电话\r\n张三,123\r\n".encode(), "lacks the column"),
    ],
)
def test_import__refused_whole(make_archive: MakeArchive, data: bytes, reason: str) -> None:
    archive = make_archive()
    with pytest.raises(ImportRefused, match=reason) as refused:
        _run(archive, data)
    assert " · " in str(refused.value)
    assert _lines(archive) == []


def test_import__truncated_xlsx_refused(make_archive: MakeArchive) -> None:
    archive = make_archive()
    book = Workbook()
    book.active.append(HEADER)
    book.active.append(GOOD[0])
    out = io.BytesIO()
    book.save(out)
    whole = out.getvalue()
    with pytest.raises(ImportRefused, match="XLSX.*cut short"):
        _run(archive, whole[: len(whole) // 2], "cut.xlsx")
    assert _run(archive, whole, "whole.xlsx").kept == 1


def test_import__same_file_twice_refused(make_archive: MakeArchive) -> None:
    archive = make_archive()
    data = _csv([HEADER, *GOOD]).encode()
    first = _run(archive, data)
    with pytest.raises(Conflict, match=f"batch {first.batch_id}"):
        _run(archive, data, "again.csv")
    assert len(_lines(archive)) == 3


@pytest.fixture
def listener(make_archive: MakeArchive) -> Iterator[tuple[Archive, HL7Listener]]:
    archive = make_archive()
    server = HL7Listener(archive.db, HL7Settings(port=0, idle_timeout_seconds=5))
    server.start()
    yield archive, server
    server.stop()


def _dft(control_id: str, ft1s: list[str], encoding: str = "utf-8") -> bytes:
    charset = "UNICODE UTF-8" if encoding == "utf-8" else "GB 18030-2000"
    segments = [
        f"MSH|^~\\&|HIS|人民医院|CLOUDFILM||20261120100000||DFT^P03^DFT_P03|{control_id}|P|2.5"
        f"|||AL|NE|CHN|{charset}",
        "EVN|P03|20261120100000",
        "PID|1||P100^^^HIS^PI||张三^^^^^^L",
        *ft1s,
    ]
    return ("\r".join(segments) + "\r").encode(encoding)


def test_dft_over_mllp__lines_kept_once(listener: tuple[Archive, HL7Listener]) -> None:
    archive, server = listener
    charge = ("FT1|1|T1||20261120093000|20261120093500|CG|CF001^数字影像云胶片|||1|20.00&CNY|"
              "20.00&CNY|FS^放射科||||||||||ACC100")  # fmt: skip
    refund = "FT1|2|T2||20261120110000||CD|CF001||||||FS^放射科||||||||||ACC101"
    refund = refund.replace("||||||FS", "|||1|15.00||FS")
    with MLLPClient("127.0.0.1", server.port, encoding="gb18030") as client:
        answer = client.send_message(_dft("D1", [charge, refund], "gb18030"))
        ack = hl7.parse(answer[1:-2].decode("gb18030"))
        assert str(ack.segment("MSA")[1]) == "AA"
        again = client.send_message(_dft("D1", [charge, refund], "gb18030"))  # a repeat
        assert str(hl7.parse(again[1:-2].decode("gb18030")).segment("MSA")[1]) == "AA"
        bad = client.send_message(_dft("D2", ["FT1|1|T3||20261120093000||CG|||||abc"]))
        nack = hl7.parse(bad[1:-2].decode("utf-8"))
        assert str(nack.segment("MSA")[1]) == "AE"
        assert "FT1-7" in str(nack.segment("ERR")[8])
    lines = _lines(archive)
    assert [(x.accession_number, x.patient_id, x.item_code, x.amount, x.department)
            for x in lines] == [
        ("ACC100", "P100", "CF001", Decimal("20.00"), "放射科"),
        ("ACC101", "P100", "CF001", Decimal("-15.00"), "放射科"),
    ]  # fmt: skip
    with archive.db.read_session() as session:
        [batch] = session.scalars(select(ImportBatch)).all()
        assert batch.file_format == "hl7" and batch.line_count == 2


def test_import__zip_bomb_refused(make_archive: MakeArchive) -> None:
    archive = make_archive()
    book = Workbook()
    book.active.append(HEADER)
    out = io.BytesIO()
    book.save(out)
    # The same workbook with one more member that unpacks to 200 MB of zeros.
    import zipfile

    bomb = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(out.getvalue())) as source,
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for item in source.infolist():
            target.writestr(item, source.read(item.filename))
        target.writestr("xl/media/padding.bin", b"\x00" * (200 * 1024 * 1024))
    assert len(bomb.getvalue()) < 1024 * 1024
    with pytest.raises(ImportRefused, match="unpacks to"):
        _run(archive, bomb.getvalue(), "bomb.xlsx")
