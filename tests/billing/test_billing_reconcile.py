"""Reconciliation on a few hundred generated charges with planted differences: it finds
exactly those, and nothing else; the XLSX export holds the same (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

from billing_helpers import MakeArchive, deliver, make_archive_fixture  # noqa: F401
from openpyxl import load_workbook

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor
from cloudfilm.billing import service
from cloudfilm.billing.importer import import_file
from cloudfilm.billing.reconcile import Category, reconcile, to_xlsx

CST = timezone(timedelta(hours=8))
PRICES = {"CT": Decimal("25.00"), "MR": Decimal("30.00"), "DR": Decimal("20.00")}
DEPARTMENTS = ["放射科", "超声科", "急诊科"]
ITEM = "CF001"
FIRST, LAST = date(2026, 11, 10), date(2026, 11, 16)


@dataclass
class World:
    """What the test planted: accession number (or patient ID for HIS-only lines) per
    expected category, and the HIS list as CSV rows."""

    expected: dict[Category, set[str]] = field(default_factory=lambda: {c: set() for c in Category})
    rows: list[list[str]] = field(default_factory=list)
    system_total: Decimal = Decimal("0.00")
    by_department: dict[str, Decimal] = field(default_factory=dict)


def _his(world: World, accession: str, patient: str, amount: Decimal, dept: str,
         at: datetime, item: str = ITEM) -> None:  # fmt: skip
    local = at.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S")
    world.rows.append([accession, patient, item, f"{amount:.2f}", dept, local])


def build(archive: Archive, count: int = 300) -> World:
    rng = random.Random(20261128)
    world = World()
    exams = []
    for n in range(count):
        day = FIRST + timedelta(days=n % 7)
        at = datetime(day.year, day.month, day.day, 8 + n % 9, n % 60, tzinfo=CST)
        modality = rng.choice(sorted(PRICES))
        dept = DEPARTMENTS[n % 3]
        exams.append((f"ACC{n:04d}", f"P{n:04d}", modality, dept, at.astimezone(UTC)))
    kinds = ["match"] * count
    planted = rng.sample(range(count), 25)
    plan = (["mismatch"] * 5 + ["missing"] * 6 + ["fallback"] * 5 + ["refunded"] * 2
            + ["withdrawn"] * 3 + ["split"] * 4)  # fmt: skip
    for index, kind in zip(planted, plan, strict=True):
        kinds[index] = kind
    for (acc, patient, modality, dept, at), kind in zip(exams, kinds, strict=True):
        deliver(archive, f"1.2.{acc}", accession=acc, patient=patient, department=dept,
                modality=modality, at=at)  # fmt: skip
        price = PRICES[modality]
        later = at + timedelta(minutes=10)
        if kind == "withdrawn":
            with archive.db.session() as session:
                service.record_withdrawal(
                    session, study_instance_uid=f"1.2.{acc}", at=at + timedelta(hours=1)
                )
            _his(world, acc, patient, price, dept, later)
            world.expected[Category.CHARGED_NOT_DELIVERED].add(acc)
            continue
        world.system_total += price
        world.by_department[dept] = world.by_department.get(dept, Decimal(0)) + price
        if kind == "mismatch":
            _his(world, acc, patient, price + Decimal("5.00"), dept, later)
            world.expected[Category.AMOUNT_MISMATCH].add(acc)
        elif kind == "missing":
            world.expected[Category.DELIVERED_NOT_CHARGED].add(acc)
        elif kind == "refunded":
            _his(world, acc, patient, price, dept, later)
            _his(world, acc, patient, -price, dept, later + timedelta(hours=2))
            world.expected[Category.DELIVERED_NOT_CHARGED].add(acc)
        elif kind == "fallback":
            _his(world, "", patient, price, dept, later)  # no accession number: by patient/day
            world.expected[Category.MATCHED].add(acc)
        elif kind == "split":
            # Two lines of one exam (charged in two parts) that sum to the price.
            _his(world, acc, patient, price - Decimal("5.00"), dept, later)
            _his(world, acc, patient, Decimal("5.00"), dept, later + timedelta(minutes=1))
            world.expected[Category.MATCHED].add(acc)
        else:
            _his(world, acc, patient, price, dept, later)
            world.expected[Category.MATCHED].add(acc)
        # Other items of the same exam (the scan itself) are not the cloud film's.
        _his(world, acc, patient, Decimal("300.00"), dept, later, item="CT0001")
    # Charged by the HIS, never delivered: unknown exams, with and without accession.
    for n in range(4):
        at = datetime(2026, 11, 12, 9, n, tzinfo=CST)
        _his(world, f"HIS{n}", f"Q{n}", Decimal("20.00"), "放射科", at)
        world.expected[Category.CHARGED_NOT_DELIVERED].add(f"HIS{n}")
    _his(world, "", "Q9", Decimal("20.00"), "超声科", datetime(2026, 11, 13, 9, 0, tzinfo=CST))
    world.expected[Category.CHARGED_NOT_DELIVERED].add("Q9")
    # Outside the range on both sides: left out.
    outside = datetime(2026, 11, 17, 0, 30, tzinfo=CST)
    deliver(archive, "1.2.late", accession="LATE", patient="PL", at=outside.astimezone(UTC))
    _his(world, "EARLY", "PE", Decimal("20.00"), "放射科", datetime(2026, 11, 9, 23, 59,
         tzinfo=CST))  # fmt: skip
    return world


def _import(archive: Archive, world: World) -> None:
    header = "检查号,患者ID,收费项目编码,金额,科室,收费时间"
    text = header + "\r\n" + "\r\n".join(",".join(row) for row in world.rows) + "\r\n"
    with archive.db.session() as session:
        result = import_file(
            session, data=text.encode("gb18030"), file_name="his-2026-11.csv",
            billing=archive.settings.billing, actor=Actor.cli("pytest"),
        )  # fmt: skip
    assert result.errors == [] and result.kept == len(world.rows)


def _keys(rows: list) -> set[str]:  # type: ignore[type-arg]
    return {r.accession_number or r.patient_id for r in rows}


def test_reconcile__finds_exactly_the_planted_differences(make_archive: MakeArchive) -> None:
    archive = make_archive(
        enabled=True, price="20.00", item_code=ITEM,
        price_by_modality={k: str(v) for k, v in PRICES.items()},
    )  # fmt: skip
    world = build(archive)
    _import(archive, world)
    with archive.db.read_session() as session:
        result = reconcile(
            session, billing=archive.settings.billing, first_day=FIRST, last_day=LAST
        )
    for category in Category:
        assert _keys(result.of(category)) == world.expected[category], category
    counts = result.counts()
    assert counts == {c.value: len(world.expected[c]) for c in Category}
    # Every exam once (a withdrawn one as HIS-only), and the five unknown HIS charges.
    assert sum(counts.values()) == 300 + 5
    fallback = [r for r in result.of(Category.MATCHED) if r.matched_by == "patient-day-item"]
    assert len(fallback) == 5
    totals = result.totals()
    system = sum((t.system_amount for t in totals.values()), Decimal(0))
    assert system == world.system_total
    mismatch = totals[Category.AMOUNT_MISMATCH]
    assert mismatch.his_amount - mismatch.system_amount == Decimal("25.00")  # 5 × 5.00
    by_department = result.by("department")
    assert {k: v.system_amount for k, v in by_department.items() if v.system_amount} == (
        world.by_department
    )
    by_day = result.by("day")
    assert sorted(by_day) == [(FIRST + timedelta(days=n)).isoformat() for n in range(7)]
    assert sum(v.count for v in by_day.values()) == sum(counts.values())
    body = result.as_dict()
    assert body["totals"]["matched"]["count"] == len(world.expected[Category.MATCHED])
    assert len(body["rows"]["delivered-not-charged"]) == 8

    # One department: only its rows.
    with archive.db.read_session() as session:
        one = reconcile(
            session, billing=archive.settings.billing, first_day=FIRST, last_day=LAST,
            department="超声科",
        )  # fmt: skip
    assert one.rows and {r.department for r in one.rows} == {"超声科"}
    for category in Category:
        same = [r for r in result.of(category) if r.department == "超声科"]
        assert _keys(one.of(category)) == _keys(same), category

    # The workbook: a summary, then one sheet per category with the same rows.
    book = load_workbook(io.BytesIO(to_xlsx(result)), read_only=True)
    assert book.sheetnames == ["汇总 Summary", *(c.label for c in Category)]
    for category in Category:
        rows = list(book[category.label].iter_rows(values_only=True))
        assert rows[0][0] == "日期 Day"
        assert {r[2] or r[3] for r in rows[1:]} == world.expected[category]
    summary = list(book["汇总 Summary"].iter_rows(values_only=True))
    assert summary[0][:3] == ("对账期间 Period", "2026-11-10", "2026-11-16")
    listed = {row[0]: row[1] for row in summary if row and row[0] in {c.label for c in Category}}
    assert listed == {c.label: len(world.expected[c]) for c in Category}


def test_reconcile__empty_item_code_takes_every_line(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00")
    deliver(archive, "9.1", accession="A1", at=datetime(2026, 11, 10, 2, tzinfo=UTC))
    world = World()
    _his(world, "A1", "P1", Decimal("20.00"), "放射科", datetime(2026, 11, 10, 10, tzinfo=CST),
         item="ANY")  # fmt: skip
    _import(archive, world)
    with archive.db.read_session() as session:
        result = reconcile(
            session, billing=archive.settings.billing, first_day=FIRST, last_day=FIRST
        )
    assert result.counts()["matched"] == 1 and len(result.rows) == 1


def test_to_xlsx__his_text_is_never_a_formula(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00")
    deliver(archive, "9.2", accession="=1+1", department='=HYPERLINK("http://x","y")',
            at=datetime(2026, 11, 10, 2, tzinfo=UTC))  # fmt: skip
    with archive.db.read_session() as session:
        result = reconcile(
            session, billing=archive.settings.billing, first_day=FIRST, last_day=FIRST
        )
    book = load_workbook(io.BytesIO(to_xlsx(result)))
    sheet = book["已交付未收费 Delivered not charged"]
    assert sheet["C2"].value == "=1+1" and sheet["C2"].data_type == "s"
    assert sheet["B2"].data_type == "s"
