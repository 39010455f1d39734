"""The way back (回传): bring a study from the archive into a hospital node.

A send-back job is a row in the gateway's own database, committed before any work starts.
It runs in two steps, each announced by a committed state before it starts:

1. ``fetching``: WADO-RS Retrieve Study from the archive with the gateway's client
   credentials and ``transfer-syntax=*`` (the objects as archived). Each part is written
   to the send-back spool (``data_dir/spool-back``, temporary file → fsync → rename → fsync
   directory) and only then gets its row; an instance already held is not written again.
2. ``sending``: C-STORE of the spooled instances to the destination (``gateway.destinations``),
   one association per batch, each object proposed in its own transfer syntax. An instance
   the destination stored leaves the spool; a refused one keeps the destination's status.

A failed step waits out the same capped exponential back-off as the upload queue and goes to
the dead letter (``dead``) after ``gateway.dead_letter_attempts``; ``retry`` puts it back. After
a crash :meth:`SendBackQueue.recover` puts interrupted steps back in line and removes spool
files no row names. Sending an instance twice is harmless: a PACS stores the same SOP Instance
UID once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from cloudfilm.errors import NotFound
from cloudfilm.gateway.delivery import ArchiveClient, CStoreClient, DeliveryError
from cloudfilm.gateway.messages import message
from cloudfilm.gateway.models import SendBackInstance, SendBackJob, SendBackState
from cloudfilm.gateway.queue import GatewayQueue
from cloudfilm.storage import new_key
from cloudfilm.storage.filesystem import FilesystemBackend

logger = logging.getLogger(__name__)

_STEPS = {
    "fetch": (SendBackState.QUEUED, SendBackState.FETCHING),
    "send": (SendBackState.FETCHED, SendBackState.SENDING),
}


@dataclass(frozen=True, slots=True)
class SendBackTask:
    """One step of one send-back job to run now."""

    job_id: int
    step: str
    study_instance_uid: str
    destination: str


class SendBackQueue:
    """Send-back jobs in the gateway's database; each public method is one transaction."""

    def __init__(self, queue: GatewayQueue) -> None:
        self.queue = queue
        self.gw = queue.gw
        self.db = queue.db
        self.clock = queue.clock
        self.spool = FilesystemBackend((self.gw.data_dir / "spool-back").resolve().as_uri())

    def request(self, study_instance_uid: str, destination: str) -> dict[str, Any]:
        """Queue ``study_instance_uid`` for ``destination``; an unfinished job for the same
        study and destination is reused (and woken from a back-off or the dead letter)."""
        if destination not in self.gw.destinations:
            names = ", ".join(self.gw.destinations) or "none configured"
            raise NotFound(
                f"no send-back destination named {destination!r} ({names}); add it under "
                f"[gateway.destinations.{destination}]"
            )
        now = self.clock.now()
        with self.db.session() as session:
            job = session.scalars(
                select(SendBackJob).where(
                    SendBackJob.study_instance_uid == study_instance_uid,
                    SendBackJob.destination == destination,
                    SendBackJob.state != SendBackState.SENT,
                )
            ).first()
            if job is None:
                job = SendBackJob(
                    study_instance_uid=study_instance_uid,
                    destination=destination,
                    state=SendBackState.QUEUED,
                    step="fetch",
                    attempts=0,
                    requested_at=now,
                    updated_at=now,
                )
                session.add(job)
            elif job.state in (SendBackState.FAILED, SendBackState.DEAD):
                job.state, job.attempts = _STEPS[job.step][0], 0
                job.next_attempt_at, job.updated_at = None, now
            session.flush()
            return _row(session, job)

    def recover(self) -> int:
        """After a (re)start: interrupted steps back in line, orphan spool files removed."""
        now = self.clock.now()
        with self.db.session() as session:
            count = 0
            for _step, (pending, running) in _STEPS.items():
                result = session.execute(
                    update(SendBackJob)
                    .where(SendBackJob.state == running)
                    .values(state=pending, updated_at=now)
                )
                count += int(getattr(result, "rowcount", 0) or 0)
            keys = set(
                session.scalars(
                    select(SendBackInstance.spool_key).where(
                        SendBackInstance.spool_key.is_not(None)
                    )
                )
            )
        for info in list(self.spool.iter_objects()):
            if info.key not in keys:
                self.spool.delete(info.key)
        return count

    def next_task(self) -> SendBackTask | None:
        """Claim the next due step (pending, or failed and past its back-off)."""
        now = self.clock.now()
        with self.db.session() as session:
            job = session.scalars(
                select(SendBackJob)
                .where(
                    or_(
                        SendBackJob.state.in_([SendBackState.QUEUED, SendBackState.FETCHED]),
                        (SendBackJob.state == SendBackState.FAILED)
                        & (SendBackJob.next_attempt_at <= now),
                    )
                )
                .order_by(SendBackJob.next_attempt_at.is_not(None), SendBackJob.id)
                .limit(1)
            ).first()
            if job is None:
                return None
            step = "send" if job.state == SendBackState.FETCHED else job.step
            job.state, job.step, job.updated_at = _STEPS[step][1], step, now
            return SendBackTask(job.id, step, job.study_instance_uid, job.destination)

    def failed(self, task: SendBackTask, reason: str) -> SendBackState:
        """The step failed: back-off, or the dead letter after ``dead_letter_attempts``."""
        now = self.clock.now()
        with self.db.session() as session:
            job = session.get_one(SendBackJob, task.job_id)
            job.attempts += 1
            job.last_error, job.updated_at = reason[:2000], now
            if job.attempts >= self.gw.dead_letter_attempts:
                job.state, job.next_attempt_at = SendBackState.DEAD, None
            else:
                job.state = SendBackState.FAILED
                job.next_attempt_at = now + self.queue.backoff(job.attempts)
            logger.warning(
                "gateway: send-back #%d %s failed (attempt %d): %s",
                task.job_id,
                task.step,
                job.attempts,
                reason,
            )
            return SendBackState(job.state)

    def keep(self, task: SendBackTask, data: bytes, header: Dataset) -> None:
        """Spool one fetched instance (durable), then its row; nothing when already held."""
        uid = str(header.SOPInstanceUID)
        if str(header.get("StudyInstanceUID", "")) != task.study_instance_uid:
            raise DeliveryError(f"the archive answered with an object of another study ({uid})")
        with self.db.read_session() as session:
            if self._held(session, task.job_id, uid):
                return
        key = new_key()
        self.spool.put(key, data)
        try:
            with self.db.session() as session:
                session.add(
                    SendBackInstance(
                        job_id=task.job_id,
                        sop_instance_uid=uid,
                        spool_key=key,
                        size=len(data),
                        state="fetched",
                    )
                )
        except BaseException:
            self.spool.delete(key)
            raise

    def fetched(self, task: SendBackTask, count: int) -> None:
        """The fetch ended; on to sending (or failed when the archive sent nothing)."""
        if count == 0:
            self.failed(task, "the archive sent no instance of the study")
            return
        with self.db.session() as session:
            job = session.get_one(SendBackJob, task.job_id)
            job.state, job.step, job.attempts = SendBackState.FETCHED, "send", 0
            job.next_attempt_at, job.last_error = None, None
            job.updated_at = self.clock.now()

    def pending(self, task: SendBackTask) -> list[tuple[int, str, str]]:
        """(row id, SOP Instance UID, spool key) of the instances still to send."""
        with self.db.read_session() as session:
            rows = session.execute(
                select(
                    SendBackInstance.id,
                    SendBackInstance.sop_instance_uid,
                    SendBackInstance.spool_key,
                )
                .where(SendBackInstance.job_id == task.job_id, SendBackInstance.state == "fetched")
                .order_by(SendBackInstance.id)
            ).all()
        return [(r[0], r[1], r[2]) for r in rows if r[2]]

    def results(self, *, sent: list[int], refused: dict[int, str]) -> None:
        """Record one batch; sent instances leave the spool after the commit."""
        keys: list[str] = []
        with self.db.session() as session:
            for row in session.scalars(
                select(SendBackInstance).where(SendBackInstance.id.in_([*sent, *refused]))
            ):
                if row.id in refused:
                    row.state, row.last_error = "refused", refused[row.id][:2000]
                    continue
                if row.spool_key:
                    keys.append(row.spool_key)
                row.state, row.spool_key, row.last_error = "sent", None, None
        for key in keys:
            self.spool.delete(key)

    def done(self, task: SendBackTask) -> SendBackState:
        """After the last batch: sent, or failed while some instances are still to send."""
        now = self.clock.now()
        with self.db.session() as session:
            states = list(
                session.scalars(
                    select(SendBackInstance.state).where(SendBackInstance.job_id == task.job_id)
                )
            )
        if "fetched" in states:
            return self.failed(task, f"{states.count('fetched')} instance(s) not stored yet")
        with self.db.session() as session:
            job = session.get_one(SendBackJob, task.job_id)
            refused = states.count("refused")
            job.state, job.attempts, job.next_attempt_at = SendBackState.SENT, 0, None
            job.sent_at = job.updated_at = now
            job.last_error = (
                f"{refused} instance(s) refused by {task.destination}" if refused else None
            )
            return SendBackState.SENT

    def retry(self, job_id: int | None = None) -> int:
        """Put failed and dead-lettered jobs (and refused instances) back in line."""
        now = self.clock.now()
        with self.db.session() as session:
            query = select(SendBackJob).where(
                SendBackJob.state.in_([SendBackState.FAILED, SendBackState.DEAD])
            )
            if job_id is not None:
                query = query.where(SendBackJob.id == job_id)
            jobs = session.scalars(query).all()
            for job in jobs:
                session.execute(
                    update(SendBackInstance)
                    .where(
                        SendBackInstance.job_id == job.id,
                        SendBackInstance.state == "refused",
                        SendBackInstance.spool_key.is_not(None),
                    )
                    .values(state="fetched")
                )
                job.state, job.attempts = _STEPS[job.step][0], 0
                job.next_attempt_at, job.updated_at = None, now
            return len(jobs)

    def summary(self) -> dict[str, int]:
        """Send-back jobs by state."""
        with self.db.read_session() as session:
            return {
                str(state): int(count)
                for state, count in session.execute(
                    select(SendBackJob.state, func.count()).group_by(SendBackJob.state)
                )
            }

    def jobs(self, *, limit: int = 200) -> list[dict[str, Any]]:
        """Send-back jobs, newest first, with their instance counts."""
        with self.db.read_session() as session:
            rows = session.scalars(
                select(SendBackJob).order_by(SendBackJob.id.desc()).limit(limit)
            ).all()
            return [_row(session, job) for job in rows]

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self.db.read_session() as session:
            row = session.get(SendBackJob, job_id)
            return _row(session, row) if row else None

    @staticmethod
    def _held(session: Session, job_id: int, uid: str) -> bool:
        return (
            session.scalar(
                select(SendBackInstance.id).where(
                    SendBackInstance.job_id == job_id, SendBackInstance.sop_instance_uid == uid
                )
            )
            is not None
        )


class SendBack:
    """Runs the send-back steps: WADO-RS from the archive, C-STORE to the destination."""

    def __init__(self, queue: GatewayQueue, archive: ArchiveClient) -> None:
        self.jobs = SendBackQueue(queue)
        self.gw = queue.gw
        self.archive = archive

    def run_next(self) -> SendBackTask | None:
        """Run one due step; the task, or None when nothing was due."""
        task = self.jobs.next_task()
        if task is None:
            return None
        try:
            if task.step == "fetch":
                count = self.archive.fetch_study(
                    task.study_instance_uid, lambda data, header: self.jobs.keep(task, data, header)
                )
                self.jobs.fetched(task, count)
            else:
                self._send(task)
        except DeliveryError as exc:
            self.jobs.failed(task, str(exc))
        except Exception as exc:  # a broken peer must not stop the loop
            logger.exception("gateway: send-back #%d", task.job_id)
            self.jobs.failed(task, f"{type(exc).__name__}: {exc}")
        return task

    def _send(self, task: SendBackTask) -> None:
        node = self.gw.destinations.get(task.destination)
        if node is None:
            raise DeliveryError(
                f"destination {task.destination!r} is no longer in gateway.destinations"
            )
        client = CStoreClient(
            self.gw,
            aet=node.aet,
            host=node.host,
            port=node.port,
            hint=f"the node must accept C-STORE from {self.gw.ae_title}",
            decompress_fallback=True,
        )
        pending = self.jobs.pending(task)
        size = self.gw.batch_size
        for first in range(0, len(pending), size):
            batch = pending[first : first + size]
            parts = [(uid, self.jobs.spool.read(key)) for _, uid, key in batch]
            outcome = client.send(task.study_instance_uid, parts)
            ids = {uid: row_id for row_id, uid, _ in batch}
            self.jobs.results(
                sent=[ids[u] for u in outcome.delivered if u in ids],
                refused={ids[u]: r for u, r in outcome.refused.items() if u in ids},
            )
        state = self.jobs.done(task)
        message(
            "SEND-BACK",
            direction="out",
            peer=task.destination,
            study_uid=task.study_instance_uid,
            instances=len(pending),
            state=str(state),
        )


def _row(session: Session, job: SendBackJob) -> dict[str, Any]:
    states = list(
        session.scalars(select(SendBackInstance.state).where(SendBackInstance.job_id == job.id))
    )
    return {
        "id": job.id,
        "study_instance_uid": job.study_instance_uid,
        "destination": job.destination,
        "state": job.state,
        "step": job.step,
        "attempts": job.attempts,
        "next_attempt_at": _iso(job.next_attempt_at),
        "fetched": len(states),
        "sent": states.count("sent"),
        "refused": states.count("refused"),
        "last_error": job.last_error,
        "requested_at": _iso(job.requested_at),
        "sent_at": _iso(job.sent_at),
    }


def _iso(moment: datetime | None) -> str | None:
    from cloudfilm.clock import as_utc

    return as_utc(moment).isoformat(timespec="seconds") if moment else None
