"""DFT^P03 (post detail financial transaction) from the HIS → a charge list of one
message for the reconciliation (:mod:`cloudfilm.billing`).

References are to HL7 v2.5.1: 6.4.3 DFT^P03, 6.5.1 FT1, 3.4.2 PID; data types 2.A.19
CP, 2.A.41 MO, 2.A.28 EI. Each FT1 becomes one HIS charge line:

* accession number: FT1-23 filler order number (EI.1), else ORC-3, else ORC-2;
* patient ID: PID-3 (CX.1, first repetition);
* item code: FT1-7 (CE.1); charge time: FT1-4 (DR.1), else EVN-2;
* amount: FT1-11 extended amount (CP.1 MO.1), else FT1-12 unit amount × FT1-10
  quantity; negative for transaction type (FT1-6) ``CD`` credit or ``RF`` refund;
* department: FT1-13 (CE.2 text, else CE.1).

One message is one import batch, keyed by the stored message: a replay of the message
adds nothing. A message with a bad FT1 is answered AE and kept for replay.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.audit.service import Actor
from cloudfilm.billing import service as billing
from cloudfilm.billing.models import ImportBatch
from cloudfilm.hl7 import handlers
from cloudfilm.hl7.adt import _field, _part, _Reader, _segments
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError
from cloudfilm.hl7.models import HL7Message
from cloudfilm.hl7.orm import parse_ts

CREDIT_TYPES = frozenset({"CD", "RF"})
CENT = Decimal("0.01")


def _first(reader: _Reader, segment: Any, number: int, component: int = 1) -> str:
    if segment is None:
        return ""
    reps = reader.repetitions(segment, number)
    return _part(reps[0], component) if reps else ""


def _decimal(text: str, where: str) -> Decimal | None:
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise MessageError(
            AckCode.ERROR, ErrorCode.DATA_TYPE_ERROR,
            f"{where.replace('^', '-')} 不是数字 · not a number: {text[:20]!r}", where,
        )  # fmt: skip
    return value


@handlers.register("DFT^P03")
def on_dft(*, session: Session, message: Any, record: HL7Message) -> None:
    """Keep the FT1 lines of a DFT^P03 as one HIS charge list."""
    key = hashlib.sha256(f"hl7-message:{record.id}".encode()).hexdigest()
    if session.scalar(select(ImportBatch.id).where(ImportBatch.sha256 == key)) is not None:
        return  # a replay of a message already taken in
    reader = _Reader(message)
    pids = _segments(message, "PID")
    ft1s = _segments(message, "FT1")
    orcs = _segments(message, "ORC")
    evns = _segments(message, "EVN")
    if not ft1s:
        raise MessageError(
            AckCode.ERROR, ErrorCode.SEGMENT_SEQUENCE, "缺少 FT1 段 · FT1 segment missing", "FT1"
        )
    patient = _first(reader, pids[0], 3) if pids else ""
    lines: list[billing.HisLine] = []
    for n, ft1 in enumerate(ft1s, start=1):
        accession = (
            _first(reader, ft1, 23)
            or (_first(reader, orcs[0], 3) if orcs else "")
            or (_first(reader, orcs[0], 2) if orcs else "")
        )
        if not accession and not patient:
            raise MessageError(
                AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING,
                "FT1-23 检查号与 PID-3 患者ID均为空 · neither FT1-23 filler order number nor "
                "PID-3 patient ID is given", f"FT1^{n}^23",
            )  # fmt: skip
        item = _first(reader, ft1, 7)
        if not item:
            raise MessageError(
                AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING,
                "FT1-7 收费项目编码为空 · FT1-7 transaction code is empty", f"FT1^{n}^7",
            )  # fmt: skip
        charged_at = parse_ts(_first(reader, ft1, 4), f"FT1^{n}^4") or (
            parse_ts(reader.text(_field(evns[0], 2)), "EVN^1^2") if evns else None
        )
        if charged_at is None:
            raise MessageError(
                AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING,
                "FT1-4 收费时间为空 · FT1-4 transaction date is empty", f"FT1^{n}^4",
            )  # fmt: skip
        quantity = _decimal(reader.text(_field(ft1, 10)), f"FT1^{n}^10") or Decimal(1)
        # CP.1 is an MO whose first subcomponent is the quantity (20.00&CNY).
        extended = _decimal(_field(ft1, 11).split("^")[0].split("&")[0].strip(), f"FT1^{n}^11")
        unit = _decimal(_field(ft1, 12).split("^")[0].split("&")[0].strip(), f"FT1^{n}^12")
        if extended is None and unit is None:
            raise MessageError(
                AckCode.ERROR, ErrorCode.REQUIRED_FIELD_MISSING,
                "FT1-11/FT1-12 金额为空 · FT1-11 and FT1-12 amounts are empty", f"FT1^{n}^11",
            )  # fmt: skip
        amount = extended if extended is not None else (unit or Decimal(0)) * quantity
        credit = reader.text(_field(ft1, 6)).upper() in CREDIT_TYPES
        if credit and amount > 0:
            amount = -amount
        lines.append(
            billing.HisLine(
                line_no=n,
                accession_number=accession[:64],
                patient_id=patient[:64],
                item_code=item[:64],
                amount=amount.quantize(CENT),
                department=(_first(reader, ft1, 13, 2) or _first(reader, ft1, 13, 1))[:64],
                charged_at=charged_at,
            )
        )
    billing.save_import(
        session,
        file_name=f"HL7 DFT^P03 #{record.id} ({record.control_id})"[:255],
        file_format="hl7",
        sha256=key,
        imported_by=f"hl7:{record.sending_application}"[:128],
        lines=lines,
        errors=[],
        actor=Actor.system(f"hl7:#{record.id}"),
    )
