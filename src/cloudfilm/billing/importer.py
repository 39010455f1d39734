"""Reading the HIS's charge list: CSV (UTF-8, or GB 18030 as Chinese Excel saves it) and
XLSX, with the column names of ``billing.columns``.

A file that is neither, or is cut short, is refused whole (:class:`ImportRefused`); in
a readable file each bad line is reported with its line number and the good lines are
kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.audit.service import Actor
from cloudfilm.billing.service import CENT, HisLine, ImportResult, LineError, save_import
from cloudfilm.config import BillingColumns, BillingSettings
from cloudfilm.errors import BadRequest
from cloudfilm.orders.service import LOCAL_ZONE

#: The columns every charge list needs; ``accession_number`` and ``department`` may be
#: missing from the header (then matching falls back to patient ID, day and item code).
REQUIRED = ("patient_id", "item_code", "amount", "charged_at")
COLUMNS = ("accession_number", "patient_id", "item_code", "amount", "department", "charged_at")
_LABELS = {
    "accession_number": "检查号/申请单号 accession number",
    "patient_id": "患者ID patient ID",
    "item_code": "收费项目编码 item code",
    "amount": "金额 amount",
    "department": "科室 department",
    "charged_at": "收费时间 charge time",
}
_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y-%m-%dT%H:%M:%S",
    "%Y%m%d%H%M%S",
    "%Y-%m-%d",
    "%Y/%m/%d",
    "%Y%m%d",
)


#: An XLSX may unpack to at most this many times its size (at least 1 MiB × this).
UNPACKED_FACTOR = 100


class ImportRefused(BadRequest):
    """The whole file is refused (not CSV/XLSX, truncated, no usable header, too large)."""


@dataclass(slots=True)
class ParsedList:
    file_format: str
    lines: list[HisLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)


def sniff(data: bytes) -> str:
    """``xlsx`` or ``csv``; anything else is refused."""
    if data.startswith(b"PK\x03\x04"):
        return "xlsx"
    if data.startswith((b"%PDF", b"\xd0\xcf\x11\xe0", b"\x89PNG", b"\xff\xd8", b"GIF8")):
        raise ImportRefused(
            "不是 CSV 或 XLSX 文件 · the file is not CSV or XLSX (an old .xls, a PDF or an "
            "image?); save the list from Excel as .xlsx or CSV"
        )
    if b"\x00" in data[:65536]:
        raise ImportRefused(
            "不是 CSV 或 XLSX 文件 · the file is not CSV or XLSX (binary content; UTF-16 text "
            "is not accepted: save it as CSV UTF-8)"
        )
    return "csv"


def _decode(data: bytes) -> str:
    for codec in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    raise ImportRefused(
        "文件既不是 UTF-8 也不是 GB18030 编码的文本 · the file is neither UTF-8 nor GB 18030 "
        "text (not a CSV file?)"
    )


def _norm(name: Any) -> str:
    return "".join(str(name or "").split()).lower()


def _header_map(header: list[Any], columns: BillingColumns) -> dict[str, int]:
    """Our column → its index in the file; refuses a header without the required ones."""
    positions = {_norm(name): i for i, name in reversed(list(enumerate(header)))}
    found: dict[str, int] = {}
    for column in COLUMNS:
        for name in getattr(columns, column):
            if _norm(name) in positions:
                found[column] = positions[_norm(name)]
                break
    missing = [c for c in REQUIRED if c not in found]
    if missing:
        raise ImportRefused(
            "表头缺少列：" + "、".join(_LABELS[c].split()[0] for c in missing)
            + " · the header row lacks the column(s) "
            + ", ".join(_LABELS[c].split(" ", 1)[1] for c in missing)
            + " (names in billing.columns)"
        )  # fmt: skip
    return found


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # Excel keeps an all-digit number as a number
    return str(value).strip()


def _amount(value: Any) -> Decimal:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = Decimal(repr(value))
    else:
        text = _text(value).replace(",", "").replace("¥", "").replace("￥", "")
        number = Decimal(text)
    if not number.is_finite():
        raise InvalidOperation
    if number != number.quantize(CENT):
        raise ValueError("more than two decimals")
    return number.quantize(CENT)


def _moment(value: Any) -> datetime:
    if isinstance(value, datetime):
        local = value
    elif isinstance(value, date):
        local = datetime.combine(value, time())
    else:
        text = _text(value)
        for fmt in _FORMATS:
            try:
                local = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        else:
            raise ValueError(text)
    if local.tzinfo is None:
        local = local.replace(tzinfo=LOCAL_ZONE)
    return local.astimezone(UTC)


def _row(line_no: int, cells: list[Any], where: dict[str, int]) -> HisLine:
    def cell(column: str) -> Any:
        index = where.get(column)
        return cells[index] if index is not None and index < len(cells) else None

    prefix = f"第 {line_no} 行"
    accession = _text(cell("accession_number"))
    patient = _text(cell("patient_id"))
    item = _text(cell("item_code"))
    raw_amount, raw_time = cell("amount"), cell("charged_at")
    if not accession and not patient:
        raise ValueError(
            f"{prefix}：检查号与患者ID均为空 · line {line_no}: neither accession number nor "
            "patient ID is given"
        )
    for text, name, limit in ((accession, "accession", 64), (patient, "patient ID", 64),
                              (item, "item code", 64)):  # fmt: skip
        if len(text) > limit:
            raise ValueError(
                f"{prefix}：{name} 超过 {limit} 个字符 · line {line_no}: {name} is longer "
                f"than {limit} characters"
            )
    if not item:
        raise ValueError(f"{prefix}：收费项目编码为空 · line {line_no}: the item code is empty")
    try:
        amount = _amount(raw_amount)
    except (InvalidOperation, ValueError):
        shown = _text(raw_amount)[:20]
        raise ValueError(
            f"{prefix}：金额 {shown!r} 不是有效金额 · line {line_no}: amount {shown!r} is not an "
            "amount in yuan (digits, at most two decimals)"
        ) from None
    if abs(amount) >= Decimal("1e10"):
        raise ValueError(f"{prefix}：金额过大 · line {line_no}: the amount is too large")
    try:
        charged_at = _moment(raw_time)
    except ValueError:
        shown = _text(raw_time)[:30]
        raise ValueError(
            f"{prefix}：收费时间 {shown!r} 无法识别 · line {line_no}: charge time {shown!r} is "
            "not a date/time (2026-11-28 09:30:00)"
        ) from None
    return HisLine(
        line_no=line_no,
        accession_number=accession,
        patient_id=patient,
        item_code=item,
        amount=amount,
        department=_text(cell("department"))[:64],
        charged_at=charged_at,
    )


def _rows(
    parsed: ParsedList, rows: Iterator[tuple[int, list[Any]]], columns: BillingColumns
) -> None:
    where: dict[str, int] | None = None
    for line_no, cells in rows:
        if not any(_text(c) for c in cells):
            continue
        if where is None:
            where = _header_map(cells, columns)
            continue
        try:
            parsed.lines.append(_row(line_no, cells, where))
        except ValueError as exc:
            parsed.errors.append(LineError(line_no, str(exc)))
    if where is None:
        raise ImportRefused("文件为空，没有表头 · the file is empty (no header row)")


def _csv_rows(text: str) -> Iterator[tuple[int, list[Any]]]:
    sample = text[:8192]
    delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[Any]]] = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ImportRefused(
            f"CSV 文件在第 {start} 行中断或格式错误 · the CSV file is cut short or malformed "
            f"at line {start} ({exc})"
        ) from exc
    filled = [(n, row) for n, row in rows if any(cell.strip() for cell in row)]
    # A file cut off in its last line: no line break at the end, and that line shorter
    # than the header (an export that ends mid-way is refused, not half-imported).
    if len(filled) > 1 and not text.endswith(("\n", "\r")):
        last_no, last = filled[-1]
        if len(last) < len(filled[0][1]):
            raise ImportRefused(
                f"CSV 文件在第 {last_no} 行中断（行不完整且无换行） · the CSV file is cut short "
                f"at line {last_no} (an incomplete last line without a line break)"
            )
    yield from rows


def _xlsx_rows(data: bytes) -> Iterator[tuple[int, list[Any]]]:
    import openpyxl  # type: ignore[import-untyped]  # openpyxl ships no type hints

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if "xl/workbook.xml" not in archive.namelist():
                raise zipfile.BadZipFile("no workbook")
            unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > UNPACKED_FACTOR * max(len(data), 1024 * 1024):
            # A ZIP bomb: a few kB that unpack to gigabytes. A real charge list
            # compresses about 5–10 times.
            raise ImportRefused(
                f"XLSX 文件解压后过大（{unpacked} 字节） · the XLSX file unpacks to {unpacked} "
                "bytes, far more than a charge list"
            )
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError) as exc:
        raise ImportRefused(
            "XLSX 文件已损坏或不完整 · the XLSX file is damaged or cut short (a ZIP/workbook "
            f"that cannot be read: {type(exc).__name__})"
        ) from exc
    try:
        sheet = book.worksheets[0]
        for number, row in enumerate(sheet.iter_rows(values_only=True), start=1):
            yield number, list(row)
    finally:
        book.close()


def read_charge_list(data: bytes, columns: BillingColumns) -> ParsedList:
    """The good lines and the line errors of a charge list (CSV or XLSX)."""
    kind = sniff(data)
    parsed = ParsedList(kind)
    if kind == "xlsx":
        _rows(parsed, _xlsx_rows(data), columns)
    else:
        _rows(parsed, _csv_rows(_decode(data)), columns)
    return parsed


def import_file(
    session: Session,
    *,
    data: bytes,
    file_name: str,
    billing: BillingSettings,
    actor: Actor,
    audited: bool = True,
) -> ImportResult:
    """Read and keep a charge list; flush only, audited in the same transaction (unless
    ``audited`` is false: the HTTP edge's request record says it).

    Raises
    ------
    ImportRefused
        The file is refused whole (nothing kept; the edge audits the refusal).
    Conflict
        The same file was imported before.
    """
    if len(data) > billing.import_max_bytes:
        raise ImportRefused(
            f"文件过大（上限 {billing.import_max_bytes} 字节） · the file is larger than "
            f"billing.import_max_bytes ({billing.import_max_bytes} bytes)"
        )
    if not data:
        raise ImportRefused("文件为空 · the file is empty")
    parsed = read_charge_list(data, billing.columns)
    return save_import(
        session,
        file_name=file_name,
        file_format=parsed.file_format,
        sha256=hashlib.sha256(data).hexdigest(),
        imported_by=actor.id,
        lines=parsed.lines,
        errors=parsed.errors,
        actor=actor,
        audited=audited,
    )
