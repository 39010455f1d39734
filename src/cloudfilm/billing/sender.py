"""Sending the charges to the HIS (``billing.delivery``): the charge rows are the outbox.

A charge is committed with the delivery that caused it (state ``pending``); this sender
takes due charges under a lease (several server processes can share the queue), marks
them ``sent`` in a committed step before the network call (a crash then sends them
again under the same MSH-10, which the HIS can recognise), and records the answer:

* HL7 (DFT^P03 over MLLP): ACK AA → ``acknowledged``; AE/AR → ``failed`` with the ERR or
  MSA text; no answer (refused, timeout, closed, not an ACK) → retried;
* HTTP (JSON POST with a bearer token): 2xx → ``acknowledged``; another 4xx → ``failed``;
  5xx, 408, 429 or no answer → retried.

Retries back off (``billing.retry_base_seconds``, ×4 each time, at most an hour); after
``billing.max_attempts`` the charge is ``given-up``. Refusals and give-ups are audited.
A reversal waits until the HIS has accepted the charge it takes back; a reversal of a
charge the HIS never accepted is ``skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import aliased

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.billing.dft import Answer, NoAnswer, build_dft, read_ack, send_dft
from cloudfilm.billing.models import Charge, ChargeKind, ChargeState
from cloudfilm.billing.service import charge_dict
from cloudfilm.config import ChargeDelivery

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

logger = logging.getLogger(__name__)

LEASE = timedelta(minutes=2)
MAX_BACKOFF = 3600.0
_ACTOR = Actor.system("billing-sender")
_DUE = (ChargeState.PENDING.value, ChargeState.SENT.value)
_CLOSED = (
    ChargeState.FAILED.value,
    ChargeState.GIVEN_UP.value,
    ChargeState.SKIPPED.value,
    ChargeState.LOCAL.value,
)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class PassResult:
    """What one :meth:`Sender.run_once` did."""

    acknowledged: int = 0
    failed: int = 0
    """Refused by the HIS."""
    retried: int = 0
    given_up: int = 0
    skipped: int = 0
    waiting: int = 0
    """Reversals waiting for the HIS's answer to their charge."""

    @property
    def worked(self) -> bool:
        return bool(self.acknowledged or self.failed or self.retried or self.given_up
                    or self.skipped)  # fmt: skip


class _Refused(Exception):
    """The HIS answered and refused the charge: not retried."""


class Sender:
    """Sends due charges (:meth:`run_once`, from a background loop or the CLI)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.settings = archive.settings.billing

    def run_once(self, limit: int = 50) -> PassResult:
        result = PassResult()
        if self.settings.delivery is ChargeDelivery.NONE:
            return result
        now = _now()
        original = aliased(Charge)
        with self.archive.db.read_session() as session:
            due = session.execute(
                select(Charge.id, Charge.kind, original.state)
                .outerjoin(original, Charge.reverses_id == original.id)
                .where(
                    Charge.state.in_(_DUE),
                    Charge.not_before <= now,
                    or_(Charge.lease_until.is_(None), Charge.lease_until < now),
                )
                .order_by(Charge.id)
                .limit(limit)
            ).all()
        for charge_id, kind, original_state in due:
            if kind == ChargeKind.REVERSAL.value:
                if original_state in _CLOSED:
                    self._close(charge_id, ChargeState.SKIPPED, "the HIS never accepted the charge")
                    result.skipped += 1
                    continue
                if original_state != ChargeState.ACKNOWLEDGED.value:
                    self._postpone(charge_id)
                    result.waiting += 1
                    continue
            charge = self._lease(charge_id)
            if charge is not None:
                self._deliver(charge, result)
        return result

    def pending(self) -> int:
        with self.archive.db.read_session() as session:
            count = session.scalar(
                select(func.count()).select_from(Charge).where(Charge.state.in_(_DUE))
            )
        return int(count or 0)

    # -- one charge ------------------------------------------------------------------------

    def _deliver(self, charge: Charge, result: PassResult) -> None:
        try:
            if self.settings.delivery is ChargeDelivery.HL7:
                self._send_hl7(charge)
            else:
                self._send_http(charge)
        except _Refused as exc:
            result.failed += 1
            self._refused(charge, str(exc))
        except NoAnswer as exc:
            self._retry(charge, str(exc), result)
        else:
            result.acknowledged += 1
            self._close(charge.id, ChargeState.ACKNOWLEDGED, None)

    def _send_hl7(self, charge: Charge) -> None:
        settings = self.settings
        assert settings.hl7_port is not None  # checked by BillingSettings
        message = build_dft(charge, settings, self.archive.settings.hl7.application, _now())
        raw = send_dft(message, settings.hl7_host, settings.hl7_port, settings.timeout_seconds)
        answer: Answer = read_ack(raw, charge.control_id)
        if answer.code in ("AE", "AR", "CE", "CR"):
            raise _Refused(f"ACK {answer.code}: {answer.text or '(no text)'}")

    def _send_http(self, charge: Charge) -> None:
        settings = self.settings
        assert settings.http_url is not None  # checked by BillingSettings
        headers = {"Idempotency-Key": charge.control_id}
        if settings.http_token is not None:
            headers["Authorization"] = f"Bearer {settings.http_token.get_secret_value()}"
        body: dict[str, Any] = charge_dict(charge)
        for private in ("state", "attempts", "last_error"):
            body.pop(private)
        try:
            response = httpx.post(
                settings.http_url, json=body, headers=headers, timeout=settings.timeout_seconds
            )
        except httpx.HTTPError as exc:
            raise NoAnswer(f"{type(exc).__name__}: {exc}"[:300]) from exc
        if 200 <= response.status_code < 300:
            return
        text = f"HTTP {response.status_code}: {response.text[:200]}"
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise NoAnswer(text)
        raise _Refused(text)

    # -- bookkeeping -----------------------------------------------------------------------

    def _lease(self, charge_id: int) -> Charge | None:
        """Take the charge: leased, ``sent``, one more attempt (committed before sending)."""
        now = _now()
        with self.archive.db.session() as session:
            taken = session.execute(
                update(Charge)
                .where(
                    Charge.id == charge_id,
                    Charge.state.in_(_DUE),
                    or_(Charge.lease_until.is_(None), Charge.lease_until < now),
                )
                .values(
                    lease_until=now + LEASE,
                    state=ChargeState.SENT.value,
                    attempts=Charge.attempts + 1,
                    sent_at=now,
                )
            )
            if int(getattr(taken, "rowcount", 0)) != 1:
                return None
            charge = session.get(Charge, charge_id)
            if charge is not None:
                session.expunge(charge)
            return charge

    def _close(self, charge_id: int, state: ChargeState, error: str | None) -> None:
        values: dict[str, Any] = {"state": state.value, "lease_until": None, "last_error": error}
        if state is ChargeState.ACKNOWLEDGED:
            values["acknowledged_at"] = _now()
        with self.archive.db.session() as session:
            session.execute(update(Charge).where(Charge.id == charge_id).values(**values))

    def _postpone(self, charge_id: int) -> None:
        later = _now() + timedelta(seconds=self.settings.retry_base_seconds)
        with self.archive.db.session() as session:
            session.execute(update(Charge).where(Charge.id == charge_id).values(not_before=later))

    def _refused(self, charge: Charge, error: str) -> None:
        logger.warning("charge %d refused by the HIS", charge.id)
        with self.archive.db.session() as session:
            session.execute(
                update(Charge)
                .where(Charge.id == charge.id)
                .values(state=ChargeState.FAILED.value, lease_until=None, last_error=error[:500])
            )
            self._audit(session, charge, error, given_up=False)

    def _retry(self, charge: Charge, error: str, result: PassResult) -> None:
        with self.archive.db.session() as session:
            if charge.attempts >= self.settings.max_attempts:
                result.given_up += 1
                logger.error("charge %d given up after %d attempts", charge.id, charge.attempts)
                session.execute(
                    update(Charge)
                    .where(Charge.id == charge.id)
                    .values(
                        state=ChargeState.GIVEN_UP.value, lease_until=None, last_error=error[:500]
                    )
                )
                self._audit(session, charge, error, given_up=True)
                return
            result.retried += 1
            wait = min(MAX_BACKOFF, self.settings.retry_base_seconds * 4 ** (charge.attempts - 1))
            session.execute(
                update(Charge)
                .where(Charge.id == charge.id)
                .values(
                    state=ChargeState.PENDING.value,
                    lease_until=None,
                    not_before=_now() + timedelta(seconds=wait),
                    last_error=error[:500],
                )
            )

    def _audit(self, session: Any, charge: Charge, error: str, *, given_up: bool) -> None:
        audit.record(
            session=session,
            actor=_ACTOR,
            event_type=AuditEventType.CHARGE_DELIVERY_FAILED,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SERIOUS_FAILURE,
            object_type="charge",
            object_id=str(charge.id),
            patient_id=charge.patient_id or None,
            study_instance_uid=charge.study_instance_uid,
            message=(
                f"收费消息 {charge.attempts} 次发送均无应答，已放弃 · charge message given up "
                f"after {charge.attempts} attempt(s)"
                if given_up
                else "HIS 拒收收费消息 · the HIS refused the charge message"
            ),
            detail={
                "charge_id": charge.id,
                "delivery": self.settings.delivery.value,
                "attempts": charge.attempts,
                "error": error[:500],
                "given_up": given_up,
            },
        )


@contextmanager
def running(archive: Archive, interval: float | None = None) -> Iterator[Sender | None]:
    """A background loop sending due charges while the block runs (``None`` when billing
    is off or ``billing.delivery`` is ``none``)."""
    from cloudfilm.storage.mirror import PeriodicLoop

    settings = archive.settings.billing
    if not settings.enabled or settings.delivery is ChargeDelivery.NONE:
        yield None
        return
    sender = Sender(archive)

    def step() -> None:
        for _ in range(16):  # then look at the stop flag again
            if not sender.run_once().worked:
                return

    loop = PeriodicLoop("billing", step, interval or settings.interval_seconds)
    loop.start()
    try:
        yield sender
    finally:
        loop.stop(timeout=60)
