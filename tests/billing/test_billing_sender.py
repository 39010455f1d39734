"""Delivery of the charges to the HIS through the outbox: DFT^P03 over MLLP to a local
server answering AA, AE, then nothing (retry, back-off, give-up), and JSON over HTTP
(SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing_helpers import MakeArchive, charges, deliver, make_archive_fixture  # noqa: F401
from his_peers import http_his, mllp_his
from sqlalchemy import func, select, update

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.billing import service
from cloudfilm.billing.models import Charge
from cloudfilm.billing.sender import Sender, running

from conftest import free_port


def _make_due(archive: Archive) -> None:
    """Time passes: every back-off has run out."""
    with archive.db.session() as session:
        session.execute(update(Charge).values(not_before=datetime.now(UTC) - timedelta(seconds=1)))


def _audited(archive: Archive, event_type: str) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)))
        session.expunge_all()
    return rows


def test_dft__aa_ae_then_silence(make_archive: MakeArchive) -> None:
    with mllp_his(["AA", "AE", "silent"]) as (port, his):
        archive = make_archive(
            enabled=True, price="20.00", item_code="CF001", delivery="hl7", hl7_port=port,
            timeout_seconds=0.5, max_attempts=3, retry_base_seconds=30,
        )  # fmt: skip
        first = deliver(archive, "1.1", accession="ACC1", patient="P1")
        second = deliver(archive, "1.2", accession="ACC2", patient="P2")
        third = deliver(archive, "1.3", accession="ACC3", patient="P3")
        sender = Sender(archive)
        before = datetime.now(UTC)
        result = sender.run_once()
        assert (result.acknowledged, result.failed, result.retried) == (1, 1, 1)
        by_id = {c.id: c for c in charges(archive)}
        assert by_id[first].state == "acknowledged" and by_id[first].attempts == 1
        assert by_id[second].state == "failed"
        assert "AE" in (by_id[second].last_error or "")
        assert "收费项目不存在" in (by_id[second].last_error or "")
        pending = by_id[third]
        assert (pending.state, pending.attempts) == ("pending", 1)
        assert pending.last_error and pending.lease_until is None
        wait = pending.not_before.replace(tzinfo=UTC) - before
        assert timedelta(seconds=29) < wait < timedelta(seconds=32)  # base × 4**0

        # What the HIS received: one DFT^P03 per charge, in order.
        assert len(his.received) == 3
        message = hl7.parse(his.received[0])
        msh, pid, ft1 = message.segment("MSH"), message.segment("PID"), message.segment("FT1")
        assert str(msh[9]) == "DFT^P03^DFT_P03" and str(msh[18]) == "UNICODE UTF-8"
        assert str(msh[10]) == by_id[first].control_id
        assert str(pid[3][0][0]) == "P1"
        assert str(ft1[2]) == str(first) and str(ft1[6]) == "CG"
        assert str(ft1[7]) == "CF001^数字影像云胶片" and str(ft1[10]) == "1"
        assert str(ft1[11]) == "20.00&CNY" and str(ft1[12]) == "20.00&CNY"
        assert str(ft1[13]) == "放射科" and str(ft1[23]) == "ACC1"

        # Not due yet: nothing is sent.
        assert not sender.run_once().worked and len(his.received) == 3
        _make_due(archive)
        assert sender.run_once().retried == 1
        _make_due(archive)
        assert sender.run_once().given_up == 1
        assert len(his.received) == 5
        controls = {str(hl7.parse(text).segment("MSH")[10]) for text in his.received[2:]}
        assert controls == {pending.control_id}  # the same MSH-10 on every attempt
        gone = {c.id: c for c in charges(archive)}[third]
        assert (gone.state, gone.attempts) == ("given-up", 3)
        _make_due(archive)
        assert not sender.run_once().worked and len(his.received) == 5

        failures = _audited(archive, "charge-delivery-failed")
        assert sorted(e.object_id for e in failures) == sorted([str(second), str(third)])
        assert {e.detail["given_up"] for e in failures} == {True, False}

        # A resend puts the given-up charge back in the queue.
        with archive.db.session() as session:
            assert service.resend(session, charge_ids=[third]) == 1
        assert sender.pending() == 1


def test_dft__reversal_after_acknowledged_charge(make_archive: MakeArchive) -> None:
    with mllp_his(["AA", "AE", "AA"]) as (port, his):
        archive = make_archive(
            enabled=True, price="25.00", delivery="hl7", hl7_port=port, timeout_seconds=2
        )
        accepted = deliver(archive, "2.1", accession="ACC21")
        refused = deliver(archive, "2.2", accession="ACC22")
        sender = Sender(archive)
        assert sender.run_once().acknowledged == 1
        at = datetime(2026, 11, 23, tzinfo=UTC)
        with archive.db.session() as session:
            reversal = service.record_withdrawal(session, study_instance_uid="2.1", at=at)
            skipped = service.record_withdrawal(session, study_instance_uid="2.2", at=at)
        result = sender.run_once()
        assert (result.acknowledged, result.skipped) == (1, 1)
        by_id = {c.id: c for c in charges(archive)}
        assert by_id[reversal].state == "acknowledged"  # type: ignore[index]
        assert by_id[skipped].state == "skipped"  # type: ignore[index]
        assert by_id[accepted].state == "acknowledged" and by_id[refused].state == "failed"
        credit = hl7.parse(his.received[-1]).segment("FT1")
        assert str(credit[6]) == "CD" and str(credit[10]) == "-1"
        assert str(credit[11]) == "-25.00&CNY" and str(credit[23]) == "ACC21"
        assert len(his.received) == 3


def test_dft__reversal_waits_for_its_charge(make_archive: MakeArchive) -> None:
    with mllp_his(["silent"]) as (port, his):
        archive = make_archive(
            enabled=True, price="20.00", delivery="hl7", hl7_port=port, timeout_seconds=0.3
        )
        deliver(archive, "3.1")
        with archive.db.session() as session:
            service.record_withdrawal(
                session, study_instance_uid="3.1", at=datetime(2026, 11, 23, tzinfo=UTC)
            )
        result = Sender(archive).run_once()
        assert (result.retried, result.waiting) == (1, 1)
        assert len(his.received) == 1  # the reversal was not sent before its charge


def test_dft__connection_refused_is_retried(make_archive: MakeArchive) -> None:
    archive = make_archive(
        enabled=True, price="20.00", delivery="hl7", hl7_port=free_port(), timeout_seconds=0.5
    )
    deliver(archive, "4.1")
    assert Sender(archive).run_once().retried == 1
    [charge] = charges(archive)
    assert charge.state == "pending" and "ConnectionRefused" in (charge.last_error or "")


def test_http__2xx_4xx_5xx(make_archive: MakeArchive) -> None:
    with http_his([200, 422, 503]) as (url, his):
        archive = make_archive(
            enabled=True, price="20.00", item_code="CF001", delivery="http", http_url=url,
            http_token="his-token-123", max_attempts=2,
        )  # fmt: skip
        ok = deliver(archive, "5.1", accession="ACC51", modality="MR")
        refused = deliver(archive, "5.2")
        later = deliver(archive, "5.3")
        sender = Sender(archive)
        result = sender.run_once()
        assert (result.acknowledged, result.failed, result.retried) == (1, 1, 1)
        by_id = {c.id: c for c in charges(archive)}
        assert by_id[ok].state == "acknowledged" and by_id[ok].acknowledged_at is not None
        assert by_id[refused].state == "failed" and "422" in (by_id[refused].last_error or "")
        assert by_id[later].state == "pending" and "503" in (by_id[later].last_error or "")
        first = his.received[0]
        assert first["path"] == "/charges"
        assert first["headers"]["Authorization"] == "Bearer his-token-123"
        assert first["headers"]["Idempotency-Key"] == by_id[ok].control_id
        body = first["body"]
        assert (body["accession_number"], body["amount"], body["quantity"]) == ("ACC51", "20.00", 1)
        assert (body["item_code"], body["kind"], body["modality"]) == ("CF001", "charge", "MR")
        assert "state" not in body and "person_id" not in body
        _make_due(archive)
        assert sender.run_once().given_up == 1
        assert len(his.received) == 4


def test_running__sends_in_the_background(make_archive: MakeArchive) -> None:
    with http_his([200]) as (url, his):
        archive = make_archive(enabled=True, price="20.00", delivery="http", http_url=url)
        with running(archive, interval=0.05) as sender:
            assert sender is not None
            deliver(archive, "6.1")
            deadline = datetime.now(UTC) + timedelta(seconds=10)
            while charges(archive)[0].state != "acknowledged":
                assert datetime.now(UTC) < deadline
                import time

                time.sleep(0.05)
        assert len(his.received) == 1
    with running(make_archive(enabled=True, price="20.00")) as none:
        assert none is None  # delivery = none: no loop


def test_charge_delivered_counts(make_archive: MakeArchive) -> None:
    archive = make_archive(enabled=True, price="20.00")
    deliver(archive, "7.1")
    assert not Sender(archive).run_once().worked  # delivery = none: local only
    with archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Charge)) == 1
