"""Reconciliation (对账): the archive's charges against the HIS's charge lines, for a
date range and optionally one department.

System side: the charges whose delivery time falls in the range and that no reversal
took back (a withdrawn exam was not delivered). HIS side: the imported lines charged in
the range, of the cloud film's item code (every item when ``billing.item_code`` is
empty), summed per exam; an exam whose lines sum to zero (charged and refunded) counts as
not charged. Each system charge is matched

1. by accession number to the HIS lines of that accession number; else
2. by patient ID, day (China Standard Time) and item code to HIS lines not matched
   by accession number,

and falls in one of four categories: ``matched`` (same amount), ``amount-mismatch``,
``delivered-not-charged`` (no HIS charge); HIS charges left over are
``charged-not-delivered``. Totals come per category, per department and per day.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.billing.models import Charge, ChargeKind, HisChargeLine
from cloudfilm.config import BillingSettings
from cloudfilm.orders.service import LOCAL_ZONE

ZERO = Decimal("0.00")


class Category(StrEnum):
    MATCHED = "matched"
    AMOUNT_MISMATCH = "amount-mismatch"
    CHARGED_NOT_DELIVERED = "charged-not-delivered"
    DELIVERED_NOT_CHARGED = "delivered-not-charged"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Category.MATCHED: "已匹配 Matched",
    Category.AMOUNT_MISMATCH: "金额不符 Amount mismatch",
    Category.CHARGED_NOT_DELIVERED: "已收费未交付 Charged not delivered",
    Category.DELIVERED_NOT_CHARGED: "已交付未收费 Delivered not charged",
}


@dataclass(slots=True)
class Row:
    """One exam of the reconciliation."""

    category: Category
    day: date
    department: str
    accession_number: str
    patient_id: str
    item_code: str
    system_amount: Decimal
    his_amount: Decimal
    matched_by: str = ""
    """``accession`` or ``patient-day-item`` (empty when nothing matched)."""
    charge_id: int | None = None
    study_instance_uid: str = ""
    his_line_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "category": self.category.value,
            "day": self.day.isoformat(),
            "department": self.department,
            "accession_number": self.accession_number,
            "patient_id": self.patient_id,
            "item_code": self.item_code,
            "system_amount": str(self.system_amount),
            "his_amount": str(self.his_amount),
            "difference": str(self.his_amount - self.system_amount),
            "matched_by": self.matched_by,
            "charge_id": self.charge_id,
            "study_instance_uid": self.study_instance_uid,
            "his_line_ids": self.his_line_ids,
        }


@dataclass(slots=True)
class Totals:
    count: int = 0
    system_amount: Decimal = ZERO
    his_amount: Decimal = ZERO

    def add(self, row: Row) -> None:
        self.count += 1
        self.system_amount += row.system_amount
        self.his_amount += row.his_amount

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "system_amount": str(self.system_amount),
            "his_amount": str(self.his_amount),
            "difference": str(self.his_amount - self.system_amount),
        }


@dataclass(slots=True)
class Reconciliation:
    first_day: date
    last_day: date
    department: str | None
    item_code: str
    rows: list[Row]

    def of(self, category: Category) -> list[Row]:
        return [r for r in self.rows if r.category is category]

    def totals(self) -> dict[Category, Totals]:
        found = {c: Totals() for c in Category}
        for row in self.rows:
            found[row.category].add(row)
        return found

    def by(self, key: str) -> dict[str, Totals]:
        """Totals per ``department`` or per ``day`` (ISO date)."""
        found: dict[str, Totals] = defaultdict(Totals)
        for row in self.rows:
            name = row.department if key == "department" else row.day.isoformat()
            found[name].add(row)
        return dict(sorted(found.items()))

    def counts(self) -> dict[str, int]:
        return {c.value: t.count for c, t in self.totals().items()}

    def as_dict(self) -> dict[str, Any]:
        grand = Totals()
        for row in self.rows:
            grand.add(row)
        return {
            "from": self.first_day.isoformat(),
            "to": self.last_day.isoformat(),
            "department": self.department,
            "item_code": self.item_code,
            "totals": {c.value: t.as_dict() for c, t in self.totals().items()},
            "total": grand.as_dict(),
            "by_department": {k: v.as_dict() for k, v in self.by("department").items()},
            "by_day": {k: v.as_dict() for k, v in self.by("day").items()},
            "rows": {c.value: [r.as_dict() for r in self.of(c)] for c in Category},
        }


def _local_day(moment: datetime) -> date:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(LOCAL_ZONE).date()


def day_range(first_day: date, last_day: date) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the local days ``first_day`` .. ``last_day``."""
    start = datetime.combine(first_day, time(), LOCAL_ZONE).astimezone(UTC)
    end = datetime.combine(last_day + timedelta(days=1), time(), LOCAL_ZONE).astimezone(UTC)
    return start, end


@dataclass(slots=True)
class _HisGroup:
    key: tuple[str, ...]
    accession_number: str
    patient_id: str
    item_code: str
    department: str
    day: date
    amount: Decimal = ZERO
    line_ids: list[int] = field(default_factory=list)


def reconcile(
    session: Session,
    *,
    billing: BillingSettings,
    first_day: date,
    last_day: date,
    department: str | None = None,
) -> Reconciliation:
    """Match the range's charges to the HIS's lines (see the module's description)."""
    start, end = day_range(first_day, last_day)
    reversed_ids = select(Charge.reverses_id).where(Charge.reverses_id.is_not(None))
    query = select(Charge).where(
        Charge.kind == ChargeKind.CHARGE.value,
        Charge.event_at >= start,
        Charge.event_at < end,
        Charge.id.not_in(reversed_ids),
    )
    lines_query = select(HisChargeLine).where(
        HisChargeLine.charged_at >= start, HisChargeLine.charged_at < end
    )
    if billing.item_code:
        query = query.where(Charge.item_code == billing.item_code)
        lines_query = lines_query.where(HisChargeLine.item_code == billing.item_code)
    if department:
        query = query.where(Charge.department == department)
        lines_query = lines_query.where(HisChargeLine.department == department)
    charges = list(session.scalars(query.order_by(Charge.event_at, Charge.id)))
    lines = list(session.scalars(lines_query.order_by(HisChargeLine.charged_at, HisChargeLine.id)))

    by_accession: dict[str, _HisGroup] = {}
    loose: list[HisChargeLine] = []
    for line in lines:
        if line.accession_number:
            group = by_accession.get(line.accession_number)
            if group is None:
                group = by_accession[line.accession_number] = _HisGroup(
                    ("accession", line.accession_number),
                    line.accession_number,
                    line.patient_id,
                    line.item_code,
                    line.department,
                    _local_day(line.charged_at),
                )
            group.amount += line.amount
            group.line_ids.append(line.id)
        else:
            loose.append(line)

    rows: list[Row] = []
    unmatched: list[Charge] = []
    used: set[tuple[str, ...]] = set()
    for charge in charges:
        group = by_accession.get(charge.accession_number) if charge.accession_number else None
        if group is None or group.amount == ZERO:
            unmatched.append(charge)
            continue
        used.add(group.key)
        rows.append(_row(charge, group, "accession"))

    # Fallback: patient ID + day + item code, over the HIS charges no accession number
    # matched (lines without one, and accession numbers the archive does not know).
    fallback: dict[tuple[str, ...], _HisGroup] = {}
    leftovers = [g for g in by_accession.values() if g.key not in used]
    for line in loose:
        key = ("patient-day-item", line.patient_id, _local_day(line.charged_at).isoformat(),
               line.item_code)  # fmt: skip
        group = fallback.get(key)
        if group is None:
            group = fallback[key] = _HisGroup(
                key, "", line.patient_id, line.item_code, line.department,
                _local_day(line.charged_at),
            )  # fmt: skip
        group.amount += line.amount
        group.line_ids.append(line.id)
    for group in leftovers:
        key = ("patient-day-item", group.patient_id, group.day.isoformat(), group.item_code)
        if key not in fallback:
            fallback[key] = group
    for charge in unmatched:
        key = ("patient-day-item", charge.patient_id, _local_day(charge.event_at).isoformat(),
               charge.item_code)  # fmt: skip
        group = fallback.get(key)
        if group is None or group.amount == ZERO or group.key in used:
            rows.append(_row(charge, None, ""))
            continue
        used.add(group.key)
        rows.append(_row(charge, group, "patient-day-item"))

    seen: set[tuple[str, ...]] = set()
    for group in [*by_accession.values(), *fallback.values()]:
        if group.key in used or group.key in seen or group.amount == ZERO:
            continue
        seen.add(group.key)
        rows.append(
            Row(
                Category.CHARGED_NOT_DELIVERED,
                group.day,
                group.department,
                group.accession_number,
                group.patient_id,
                group.item_code,
                ZERO,
                group.amount,
                his_line_ids=group.line_ids,
            )
        )
    rows.sort(key=lambda r: (r.day, r.category.value, r.accession_number, r.patient_id))
    return Reconciliation(first_day, last_day, department, billing.item_code, rows)


def _row(charge: Charge, group: _HisGroup | None, matched_by: str) -> Row:
    his = group.amount if group is not None else ZERO
    if group is None:
        category = Category.DELIVERED_NOT_CHARGED
    elif his == charge.amount:
        category = Category.MATCHED
    else:
        category = Category.AMOUNT_MISMATCH
    return Row(
        category,
        _local_day(charge.event_at),
        charge.department,
        charge.accession_number,
        charge.patient_id,
        charge.item_code,
        charge.amount,
        his,
        matched_by,
        charge.id,
        charge.study_instance_uid,
        group.line_ids if group is not None else [],
    )


_HEADER = ["日期 Day", "科室 Department", "检查号 Accession", "患者ID Patient ID",
           "收费项目编码 Item code", "系统金额 System amount", "HIS金额 HIS amount",
           "差额 Difference", "匹配方式 Matched by", "收费记录 Charge id",
           "检查实例UID Study Instance UID"]  # fmt: skip


def to_xlsx(result: Reconciliation) -> bytes:
    """The reconciliation as a workbook: a summary sheet, then one sheet per category."""
    from openpyxl import Workbook  # type: ignore[import-untyped]

    book = Workbook()
    summary = book.active
    summary.title = "汇总 Summary"
    summary.append(["对账期间 Period", result.first_day.isoformat(), result.last_day.isoformat()])
    summary.append(["科室 Department", result.department or "全部 all"])
    summary.append(["收费项目编码 Item code", result.item_code or "全部 all"])
    summary.append([])
    summary.append(["类别 Category", "笔数 Count", "系统金额 System amount",
                    "HIS金额 HIS amount", "差额 Difference"])  # fmt: skip
    for category, totals in result.totals().items():
        summary.append([category.label, totals.count, float(totals.system_amount),
                        float(totals.his_amount),
                        float(totals.his_amount - totals.system_amount)])  # fmt: skip
    for title, key in (("按科室 By department", "department"), ("按日 By day", "day")):
        summary.append([])
        summary.append([title, "笔数 Count", "系统金额 System amount", "HIS金额 HIS amount",
                        "差额 Difference"])  # fmt: skip
        for name, totals in result.by(key).items():
            summary.append([name, totals.count, float(totals.system_amount),
                            float(totals.his_amount),
                            float(totals.his_amount - totals.system_amount)])  # fmt: skip
    for category in Category:
        sheet = book.create_sheet(category.label)
        sheet.append(_HEADER)
        for row in result.of(category):
            sheet.append(
                [
                    row.day.isoformat(),
                    row.department,
                    row.accession_number,
                    row.patient_id,
                    row.item_code,
                    float(row.system_amount),
                    float(row.his_amount),
                    float(row.his_amount - row.system_amount),
                    row.matched_by,
                    row.charge_id,
                    row.study_instance_uid,
                ]
            )
    # Text from the HIS (a department, an accession number) that starts with "=" would
    # become a formula: every cell we write is a value.
    for sheet in book.worksheets:
        for row in sheet.iter_rows():
            for cell in row:
                if cell.data_type == "f":
                    cell.data_type = "s"
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
