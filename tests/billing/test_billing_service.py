"""The public hooks: one charge per exam, the charge event switch, per-modality prices,
reversals that never delete (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from billing_helpers import MakeArchive, charges, deliver, make_archive_fixture  # noqa: F401
from sqlalchemy import func, select

from cloudfilm.audit.models import AuditEvent
from cloudfilm.billing import service
from cloudfilm.errors import BadRequest


def test_record_delivery__one_charge_per_exam(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00", item_code="CF001")
    first = deliver(archive, "1.2.3")
    assert first is not None
    assert deliver(archive, "1.2.3") == first
    assert deliver(archive, "1.2.3", at=datetime(2026, 11, 21, tzinfo=UTC)) == first
    other = deliver(archive, "1.2.4")
    assert other not in (None, first)
    rows = charges(archive)
    assert [(r.study_instance_uid, r.quantity, r.amount) for r in rows] == [
        ("1.2.3", 1, Decimal("20.00")),
        ("1.2.4", 1, Decimal("20.00")),
    ]
    charge = rows[0]
    assert (charge.item_code, charge.item_name, charge.currency) == (
        "CF001",
        "数字影像云胶片",
        "CNY",
    )
    assert (charge.state, charge.attempts, charge.event) == ("local", 0, "released")
    assert charge.accession_number == "A1.2.3" and charge.department == "放射科"
    with archive.db.read_session() as session:
        recorded = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.event_type == "charge-recorded")
        )
    assert recorded == 2


def test_record_delivery__same_exam_in_one_transaction(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00")
    with archive.db.session() as session:
        ids = {
            service.record_delivery(
                session,
                event="released",
                study_instance_uid="9.9",
                accession_number="X",
                patient_id="P",
                person_id=None,
                department="",
                modality="MR",
                exam_name="",
                at=datetime(2026, 11, 20, tzinfo=UTC),
            )  # fmt: skip
            for _ in range(3)
        }
    assert len(ids) == 1 and len(charges(archive)) == 1


def test_record_delivery__charge_event_switch(make_archive: MakeArchive) -> None:
    released = make_archive(enabled=True, price="20.00", charge_event="released")
    assert deliver(released, "1.1", event="first-view") is None
    assert deliver(released, "1.1", event="released") is not None
    assert [c.event for c in charges(released)] == ["released"]

    viewed = make_archive(enabled=True, price="20.00", charge_event="first-view")
    assert deliver(viewed, "2.1", event="released") is None
    charge_id = deliver(viewed, "2.1", event="first-view")
    assert charge_id is not None
    assert deliver(viewed, "2.1", event="released") is None
    assert [(c.study_instance_uid, c.event) for c in charges(viewed)][-1] == ("2.1", "first-view")


def test_record_delivery__disabled_and_unknown_event(make_archive: MakeArchive) -> None:
    archive = make_archive()
    assert deliver(archive, "3.1") is None
    assert charges(archive) == []
    with pytest.raises(BadRequest, match="unknown delivery event"):
        deliver(archive, "3.1", event="printed")


def test_record_delivery__price_per_modality(make_archive: MakeArchive) -> None:
    archive = make_archive(
        enabled=True, price="20.00", price_by_modality={"ct": "25.50", "MR": "30"}
    )
    deliver(archive, "4.1", modality="CT")
    deliver(archive, "4.2", modality="mr")
    deliver(archive, "4.3", modality="US")
    assert [(c.modality, c.unit_price, c.amount) for c in charges(archive)] == [
        ("CT", Decimal("25.50"), Decimal("25.50")),
        ("MR", Decimal("30.00"), Decimal("30.00")),
        ("US", Decimal("20.00"), Decimal("20.00")),
    ]


def test_settings__enabled_needs_a_price_and_delivery_its_target() -> None:
    from pydantic import ValidationError

    from cloudfilm.config import BillingSettings

    with pytest.raises(ValidationError, match="needs billing.price"):
        BillingSettings(enabled=True)
    with pytest.raises(ValidationError, match="needs billing.hl7_port"):
        BillingSettings(delivery="hl7")
    with pytest.raises(ValidationError, match="needs billing.http_url"):
        BillingSettings(delivery="http")
    with pytest.raises(ValidationError, match="two decimals"):
        BillingSettings(price_by_modality={"CT": "1.005"})
    assert BillingSettings().item_code == ""  # no official code is assumed


def test_record_withdrawal__reversal_never_delete(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00", delivery="http", http_url="http://x")
    charge_id = deliver(archive, "5.1")
    at = datetime(2026, 11, 22, tzinfo=UTC)
    with archive.db.session() as session:
        reversal_id = service.record_withdrawal(session, study_instance_uid="5.1", at=at)
    with archive.db.session() as session:
        again = service.record_withdrawal(session, study_instance_uid="5.1", at=at)
        assert service.record_withdrawal(session, study_instance_uid="none", at=at) is None
    assert reversal_id is not None and again == reversal_id
    charge, reversal = charges(archive)
    assert charge.id == charge_id and charge.amount == Decimal("20.00")
    assert (reversal.kind, reversal.reverses_id, reversal.quantity) == ("reversal", charge_id, -1)
    assert reversal.amount == Decimal("-20.00") and reversal.event == "withdrawn"
    assert reversal.state == "pending"
    # Delivered again after the withdrawal (report reissued): a new charge, seq 2.
    new_id = deliver(archive, "5.1")
    assert new_id not in (None, charge_id)
    assert deliver(archive, "5.1") == new_id
    assert [(c.kind, c.seq) for c in charges(archive)] == [
        ("charge", 1), ("reversal", 1), ("charge", 2)
    ]  # fmt: skip


def test_record_delivery__concurrent_deliveries_one_charge(make_archive: MakeArchive) -> None:
    """Eight processes' worth of simultaneous deliveries of one exam (the portal's first
    views racing): one charge, the same id for all."""
    import threading

    archive = make_archive(enabled=True, price="20.00", charge_event="first-view")
    barrier = threading.Barrier(8)
    found: list[int | None] = []
    errors: list[BaseException] = []

    def view() -> None:
        try:
            barrier.wait(timeout=10)
            found.append(deliver(archive, "8.1", event="first-view"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=view) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(found) == 8 and len(set(found)) == 1 and found[0] is not None
    assert len(charges(archive)) == 1
