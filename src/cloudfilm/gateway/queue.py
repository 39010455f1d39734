"""The gateway's durable queue: study and instance states, attempts, back-off, the spool.

Every state change is committed *before* the step it announces runs (a study is
``retrieving`` on disk before the C-MOVE is sent, its instances ``uploading`` before the
STOW-RS request leaves), so after a crash :meth:`GatewayQueue.recover` knows exactly which
steps were interrupted and puts them back in line. Re-running a step is harmless: a
received instance is kept once per SOP Instance UID, and the archive answers an identical
instance sent again as a success without storing it twice.

Received instances are written to the spool with :class:`FilesystemBackend` (temporary
file → fsync → rename → fsync directory) before their row is committed and before the
C-STORE is acknowledged; a crash in between leaves an orphan file that :meth:`recover`
removes, never a row without bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from cloudfilm.clock import Clock, as_utc
from cloudfilm.config import DatabaseSettings, Settings
from cloudfilm.db import Database
from cloudfilm.errors import NotFound
from cloudfilm.gateway.models import (
    Attempt,
    GatewayInstance,
    GatewayStudy,
    InstanceState,
    RemoteFile,
    SourceState,
    Step,
    StudyState,
    create_schema,
)
from cloudfilm.storage import new_key
from cloudfilm.storage.filesystem import FilesystemBackend

logger = logging.getLogger(__name__)

_PENDING = {Step.RETRIEVE: StudyState.DISCOVERED, Step.DELIVER: StudyState.RETRIEVED}
_RUNNING = {Step.RETRIEVE: StudyState.RETRIEVING, Step.DELIVER: StudyState.UPLOADING}


@dataclass(frozen=True, slots=True)
class FoundStudy:
    """A study as a PACS described it (a C-FIND answer)."""

    study_instance_uid: str
    accession_number: str | None = None
    study_date: str | None = None
    modalities: str | None = None
    expected_instances: int | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One step of one study to run now."""

    study_id: int
    attempt_id: int
    step: Step
    source: str
    study_instance_uid: str
    expected_instances: int | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    instance_id: int
    sop_instance_uid: str
    spool_key: str


class Rejected(Exception):
    """A received instance the gateway does not take (unknown study)."""


def gateway_database(settings: Settings) -> Database:
    """The gateway's own database (``gateway.database_url``, default SQLite in its folder)."""
    own = settings.model_copy(
        update={"database": DatabaseSettings(url=settings.gateway.state_url, pool_size=5)}
    )
    return Database(own)


class GatewayQueue:
    """Queue operations; each public method is one committed transaction."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.gw = settings.gateway
        self.clock = clock or Clock()
        self.gw.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = gateway_database(settings)
        create_schema(self.db.engine)
        self.spool = FilesystemBackend((self.gw.data_dir / "spool").resolve().as_uri())

    def close(self) -> None:
        self.db.dispose()

    # ----------------------------------------------------------------- back-off

    def backoff(self, attempts: int) -> timedelta:
        """Capped exponential back-off: initial × 2^(attempts-1), at most the maximum."""
        seconds = self.gw.backoff_initial_seconds * 2 ** max(0, min(attempts - 1, 40))
        return timedelta(seconds=min(seconds, self.gw.backoff_max_seconds))

    # ----------------------------------------------------------------- discovery

    def discover(self, source: str, found: FoundStudy, *, manual: bool = False) -> bool:
        """Queue ``found`` unless it is queued already; True when it is new or reopened.

        A delivered study the PACS now announces with more instances than were received is
        reopened (the modality sent late images).
        """
        now = self.clock.now()
        with self.db.session() as session:
            study = session.scalars(
                select(GatewayStudy).where(
                    GatewayStudy.study_instance_uid == found.study_instance_uid
                )
            ).one_or_none()
            if study is None:
                session.add(
                    GatewayStudy(
                        source=source,
                        study_instance_uid=found.study_instance_uid,
                        accession_number=found.accession_number,
                        study_date=found.study_date,
                        modalities=found.modalities,
                        expected_instances=found.expected_instances,
                        state=StudyState.DISCOVERED,
                        step=Step.RETRIEVE,
                        manual=manual,
                        attempts=0,
                        discovered_at=now,
                        updated_at=now,
                    )
                )
                return True
            if manual:
                study.manual = True
            grown = (
                found.expected_instances is not None
                and found.expected_instances > self._received(session, study.id)
            )
            if study.state == StudyState.DELIVERED and grown:
                study.expected_instances = found.expected_instances
                study.state, study.step, study.attempts = StudyState.DISCOVERED, Step.RETRIEVE, 0
                study.next_attempt_at, study.updated_at = None, now
                return True
            if (
                study.state in (StudyState.DISCOVERED, StudyState.FAILED)
                and study.step == "retrieve"
            ):
                study.expected_instances = found.expected_instances or study.expected_instances
            return False

    def expedite(self, study_instance_uid: str) -> None:
        """Asked for now (a trigger): outside the schedule, and a study waiting out a
        back-off after a failure runs at once (a dead-lettered one is put back in line)."""
        now = self.clock.now()
        with self.db.session() as session:
            study = session.scalars(
                select(GatewayStudy).where(GatewayStudy.study_instance_uid == study_instance_uid)
            ).one_or_none()
            if study is None:
                return
            study.manual = True
            if study.state in (StudyState.FAILED, StudyState.DEAD):
                study.state = StudyState.FAILED
                study.next_attempt_at, study.updated_at = now, now

    def polled(self, source: str, *, through: str | None, error: str | None = None) -> None:
        """Record the outcome of one poll of ``source`` (the high-water mark on success)."""
        now = self.clock.now()
        with self.db.session() as session:
            row = session.get(SourceState, source)
            if row is None:
                row = SourceState(name=source)
                session.add(row)
            row.last_poll_at = now
            if error is None:
                if through is not None:
                    row.polled_through = max(through, row.polled_through or "")
            else:
                row.last_error, row.last_error_at = error, now

    def source_state(self, source: str) -> SourceState | None:
        with self.db.read_session() as session:
            return session.get(SourceState, source)

    # ----------------------------------------------------------------- running steps

    def recover(self) -> int:
        """After a (re)start: put interrupted steps back in line, drop orphan spool files.

        Returns how many studies were put back.
        """
        now = self.clock.now()
        with self.db.session() as session:
            session.execute(
                update(Attempt)
                .where(Attempt.outcome.is_(None))
                .values(outcome="interrupted", finished_at=now)
            )
            session.execute(
                update(GatewayInstance)
                .where(GatewayInstance.state == InstanceState.UPLOADING)
                .values(state=InstanceState.RETRIEVED)
            )
            count = 0
            for step in Step:
                result = session.execute(
                    update(GatewayStudy)
                    .where(GatewayStudy.state == _RUNNING[step])
                    .values(state=_PENDING[step], updated_at=now)
                )
                count += int(getattr(result, "rowcount", 0) or 0)
            known = set(session.scalars(select(GatewayInstance.spool_key)).all())
        for info in list(self.spool.iter_objects()):
            if info.key not in known:
                self.spool.delete(info.key)
        self.spool.sweep_temporary(0)
        return count

    def next_job(self, step: Step, *, in_schedule: bool = True) -> Job | None:
        """Claim the next study due for ``step``: its running state and an attempt row are
        committed before the caller starts the step."""
        now = self.clock.now()
        with self.db.session() as session:
            due = or_(
                GatewayStudy.state == _PENDING[step],
                (GatewayStudy.state == StudyState.FAILED)
                & (GatewayStudy.step == step)
                & (GatewayStudy.next_attempt_at <= now),
            )
            query = select(GatewayStudy).where(due)
            if not in_schedule:
                query = query.where(GatewayStudy.manual.is_(True))
            study = session.scalars(
                query.order_by(GatewayStudy.next_attempt_at.is_not(None), GatewayStudy.id).limit(1)
            ).first()
            if study is None:
                return None
            study.state, study.step, study.updated_at = _RUNNING[step], step, now
            if step == Step.DELIVER:
                session.execute(
                    update(GatewayInstance)
                    .where(
                        GatewayInstance.study_id == study.id,
                        GatewayInstance.state.in_([InstanceState.RETRIEVED, InstanceState.FAILED]),
                    )
                    .values(state=InstanceState.UPLOADING)
                )
            attempt = Attempt(study_id=study.id, step=step, started_at=now)
            session.add(attempt)
            session.flush()
            return Job(
                study.id,
                attempt.id,
                step,
                study.source,
                study.study_instance_uid,
                study.expected_instances,
            )

    def step_failed(self, job: Job, reason: str) -> StudyState:
        """The step failed: back-off, or dead letter after ``dead_letter_attempts``."""
        now = self.clock.now()
        with self.db.session() as session:
            study = session.get_one(GatewayStudy, job.study_id)
            study.attempts += 1
            study.last_error = reason[:2000]
            study.updated_at = now
            if study.attempts >= self.gw.dead_letter_attempts:
                study.state, study.next_attempt_at = StudyState.DEAD, None
            else:
                study.state = StudyState.FAILED
                study.next_attempt_at = now + self.backoff(study.attempts)
            session.execute(
                update(GatewayInstance)
                .where(
                    GatewayInstance.study_id == job.study_id,
                    GatewayInstance.state == InstanceState.UPLOADING,
                )
                .values(state=InstanceState.RETRIEVED)
            )
            self._finish_attempt(session, job, "failed", reason)
            logger.warning(
                "gateway: %s of study #%d failed (attempt %d): %s",
                job.step,
                job.study_id,
                study.attempts,
                reason,
            )
            return StudyState(study.state)

    def retrieved(self, job: Job, *, received_by_move: int | None = None) -> StudyState:
        """The retrieval ended: check completeness and move on to delivery, or fail."""
        with self.db.session() as session:
            received = self._received(session, job.study_id)
        expected = job.expected_instances
        if expected is None:
            expected = received_by_move
        if expected is not None and received < expected:
            return self.step_failed(
                job, f"incomplete: {received} of {expected} instances announced by the PACS"
            )
        if received == 0:
            return self.step_failed(job, "the PACS sent no instance")
        now = self.clock.now()
        with self.db.session() as session:
            study = session.get_one(GatewayStudy, job.study_id)
            study.state, study.step, study.attempts = StudyState.RETRIEVED, Step.DELIVER, 0
            study.next_attempt_at, study.last_error, study.updated_at = None, None, now
            self._finish_attempt(session, job, "ok", f"{received} instance(s)")
            return StudyState.RETRIEVED

    def outgoing(self, job: Job) -> list[Outgoing]:
        """The instances claimed for this delivery attempt."""
        with self.db.read_session() as session:
            rows = session.execute(
                select(
                    GatewayInstance.id, GatewayInstance.sop_instance_uid, GatewayInstance.spool_key
                )
                .where(
                    GatewayInstance.study_id == job.study_id,
                    GatewayInstance.state == InstanceState.UPLOADING,
                )
                .order_by(GatewayInstance.id)
            ).all()
        return [Outgoing(r[0], r[1], r[2]) for r in rows if r[2]]

    def delivery_results(
        self,
        *,
        delivered: Sequence[int],
        refused: dict[int, str],
        transient: dict[int, str],
    ) -> None:
        """Record one STOW-RS answer; delivered instances leave the spool after the commit."""
        now = self.clock.now()
        keys: list[str] = []
        with self.db.session() as session:
            if delivered:
                for row in session.scalars(
                    select(GatewayInstance).where(GatewayInstance.id.in_(delivered))
                ):
                    if row.spool_key:
                        keys.append(row.spool_key)
                    row.state, row.delivered_at, row.spool_key = (
                        InstanceState.DELIVERED,
                        now,
                        None,
                    )
                    row.last_error = None
            for instance_id, reason in refused.items():
                row = session.get_one(GatewayInstance, instance_id)
                row.state, row.last_error = InstanceState.DEAD, reason[:2000]
                row.attempts += 1
            for instance_id, reason in transient.items():
                row = session.get_one(GatewayInstance, instance_id)
                row.attempts += 1
                row.last_error = reason[:2000]
                dead = row.attempts >= self.gw.dead_letter_attempts
                row.state = InstanceState.DEAD if dead else InstanceState.FAILED
        for key in keys:
            self.spool.delete(key)

    def delivery_done(self, job: Job) -> StudyState:
        """After the last batch: delivered, or failed when some instances must be resent."""
        now = self.clock.now()
        with self.db.session() as session:
            counts = self._instance_counts(session, job.study_id)
        pending = counts.get(InstanceState.FAILED, 0) + counts.get(InstanceState.RETRIEVED, 0)
        if pending:
            return self.step_failed(job, f"{pending} instance(s) not accepted yet; retrying")
        with self.db.session() as session:
            study = session.get_one(GatewayStudy, job.study_id)
            dead = counts.get(InstanceState.DEAD, 0)
            study.state, study.attempts, study.next_attempt_at = StudyState.DELIVERED, 0, None
            study.delivered_at = study.updated_at = now
            study.last_error = (
                f"{dead} instance(s) refused by the archive (dead letter)" if dead else None
            )
            delivered = counts.get(InstanceState.DELIVERED, 0)
            self._finish_attempt(session, job, "ok", f"{delivered} delivered, {dead} refused")
            return StudyState.DELIVERED

    def _finish_attempt(self, session: Session, job: Job, outcome: str, detail: str) -> None:
        attempt = session.get_one(Attempt, job.attempt_id)
        attempt.outcome, attempt.detail = outcome, detail[:2000]
        attempt.finished_at = self.clock.now()

    # ----------------------------------------------------------------- receiving

    def accept(self, data: bytes, *, study_instance_uid: str, sop_instance_uid: str,
               sop_class_uid: str) -> bool:  # fmt: skip
        """Keep one received instance: spool first (durable), then its row. False when the
        SOP Instance UID is already held (nothing written).

        Raises
        ------
        Rejected
            When the study is not in the queue (nobody asked for it).
        """
        with self.db.read_session() as session:
            study_id = session.scalar(
                select(GatewayStudy.id).where(GatewayStudy.study_instance_uid == study_instance_uid)
            )
            known = session.scalar(
                select(GatewayInstance.id).where(
                    GatewayInstance.sop_instance_uid == sop_instance_uid
                )
            )
        if study_id is None:
            raise Rejected(f"study {study_instance_uid} was not requested by the gateway")
        if known is not None:
            return False
        key = new_key()
        self.spool.put(key, data)
        try:
            with self.db.session() as session:
                if session.scalar(
                    select(GatewayInstance.id).where(
                        GatewayInstance.sop_instance_uid == sop_instance_uid
                    )
                ):
                    self.spool.delete(key)
                    return False
                session.add(
                    GatewayInstance(
                        study_id=study_id,
                        sop_instance_uid=sop_instance_uid,
                        sop_class_uid=sop_class_uid,
                        spool_key=key,
                        size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                        state=InstanceState.RETRIEVED,
                        attempts=0,
                        received_at=self.clock.now(),
                    )
                )
        except BaseException:
            self.spool.delete(key)
            raise
        return True

    def held(self, study_id: int) -> set[str]:
        """SOP Instance UIDs already received for the study (not to be fetched again)."""
        with self.db.read_session() as session:
            return set(
                session.scalars(
                    select(GatewayInstance.sop_instance_uid).where(
                        GatewayInstance.study_id == study_id
                    )
                )
            )

    def arrived_late(self, study_instance_uid: str) -> None:
        """A new instance of a delivered study came in (a file dropped later): deliver again."""
        now = self.clock.now()
        with self.db.session() as session:
            study = session.scalars(
                select(GatewayStudy).where(GatewayStudy.study_instance_uid == study_instance_uid)
            ).one_or_none()
            if study is not None and study.state == StudyState.DELIVERED:
                study.state, study.step, study.attempts = StudyState.RETRIEVED, Step.DELIVER, 0
                study.next_attempt_at, study.updated_at = None, now

    # ----------------------------------------------------------------- remote files (FTP)

    def remote_files(self, source: str) -> dict[str, int]:
        """Path → size of the files taken (or refused) from an FTP source and still there."""
        with self.db.read_session() as session:
            return dict(
                session.execute(
                    select(RemoteFile.path, RemoteFile.size).where(
                        RemoteFile.source == source, RemoteFile.state != "removed"
                    )
                ).all()
            )

    def remote_taken(
        self,
        source: str,
        path: str,
        size: int,
        *,
        sop_instance_uid: str | None,
        error: str | None = None,
    ) -> None:
        """Record a file taken from (or refused on) an FTP source."""
        now = self.clock.now()
        with self.db.session() as session:
            row = session.scalars(
                select(RemoteFile).where(RemoteFile.source == source, RemoteFile.path == path)
            ).one_or_none()
            if row is None:
                row = RemoteFile(source=source, path=path)
                session.add(row)
            row.size, row.sop_instance_uid, row.taken_at = size, sop_instance_uid, now
            row.state = "failed" if error else "taken"
            row.last_error = error[:2000] if error else None

    def remote_delivered(self, source: str) -> list[str]:
        """Paths of taken files whose instance has reached the archive."""
        with self.db.read_session() as session:
            return list(
                session.scalars(
                    select(RemoteFile.path)
                    .join(
                        GatewayInstance,
                        GatewayInstance.sop_instance_uid == RemoteFile.sop_instance_uid,
                    )
                    .where(
                        RemoteFile.source == source,
                        RemoteFile.state == "taken",
                        GatewayInstance.state == InstanceState.DELIVERED,
                    )
                    .order_by(RemoteFile.id)
                )
            )

    def remote_removed(self, source: str, path: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(RemoteFile)
                .where(RemoteFile.source == source, RemoteFile.path == path)
                .values(state="removed")
            )

    # ----------------------------------------------------------------- manual retry, status

    def retry(self, study_instance_uid: str | None = None) -> int:
        """Put dead-lettered studies (and refused instances) back in line; how many."""
        now = self.clock.now()
        with self.db.session() as session:
            query = select(GatewayStudy)
            if study_instance_uid:
                query = query.where(GatewayStudy.study_instance_uid == study_instance_uid)
            else:
                dead_instances = select(GatewayInstance.study_id).where(
                    GatewayInstance.state == InstanceState.DEAD
                )
                query = query.where(
                    or_(
                        GatewayStudy.state.in_([StudyState.DEAD, StudyState.FAILED]),
                        GatewayStudy.id.in_(dead_instances),
                    )
                )
            studies = session.scalars(query).all()
            if study_instance_uid and not studies:
                raise NotFound(f"study {study_instance_uid} is not in the gateway's queue")
            count = 0
            for study in studies:
                revived = session.execute(
                    update(GatewayInstance)
                    .where(
                        GatewayInstance.study_id == study.id,
                        GatewayInstance.state.in_([InstanceState.DEAD, InstanceState.FAILED]),
                        GatewayInstance.spool_key.is_not(None),
                    )
                    .values(state=InstanceState.RETRIEVED, attempts=0)
                )
                has_revived = bool(getattr(revived, "rowcount", 0))
                if study.state in (StudyState.DEAD, StudyState.FAILED) or has_revived:
                    step = Step(study.step)
                    if study.state == StudyState.DELIVERED:
                        step = Step.DELIVER
                    study.state, study.step = _PENDING[step], step
                    study.attempts, study.next_attempt_at, study.updated_at = 0, None, now
                    study.manual = True
                    count += 1
            return count

    def studies(self, *, limit: int = 200, state: str | None = None) -> list[dict[str, Any]]:
        """Per-study state, received/delivered/refused counts and last error (newest first),
        optionally only the studies in ``state``."""
        with self.db.read_session() as session:
            query = select(GatewayStudy)
            if state is not None:
                query = query.where(GatewayStudy.state == state)
            rows = session.scalars(query.order_by(GatewayStudy.id.desc()).limit(limit)).all()
            out = []
            for study in rows:
                counts = self._instance_counts(session, study.id)
                out.append(
                    {
                        "source": study.source,
                        "study_instance_uid": study.study_instance_uid,
                        "accession_number": study.accession_number,
                        "study_date": study.study_date,
                        "state": study.state,
                        "step": study.step,
                        "attempts": study.attempts,
                        "next_attempt_at": _iso(study.next_attempt_at),
                        "expected": study.expected_instances,
                        "received": sum(counts.values()),
                        "delivered": counts.get(InstanceState.DELIVERED, 0),
                        "refused": counts.get(InstanceState.DEAD, 0),
                        "last_error": study.last_error,
                        "updated_at": _iso(study.updated_at),
                    }
                )
            return out

    def summary(self) -> dict[str, Any]:
        """Backlog per state, per source, and each source's last poll and error."""
        with self.db.read_session() as session:
            by_state = dict(
                session.execute(
                    select(GatewayStudy.state, func.count()).group_by(GatewayStudy.state)
                ).all()
            )
            instances = dict(
                session.execute(
                    select(GatewayInstance.state, func.count()).group_by(GatewayInstance.state)
                ).all()
            )
            per_source: dict[str, dict[str, int]] = {}
            for source, state, count in session.execute(
                select(GatewayStudy.source, GatewayStudy.state, func.count()).group_by(
                    GatewayStudy.source, GatewayStudy.state
                )
            ):
                per_source.setdefault(source, {})[state] = count
            sources = []
            names = set(self.gw.sources) | set(per_source)
            for name in sorted(names):
                row = session.get(SourceState, name)
                sources.append(
                    {
                        "name": name,
                        "studies": per_source.get(name, {}),
                        "polled_through": row.polled_through if row else None,
                        "last_poll_at": _iso(row.last_poll_at) if row else None,
                        "last_error": row.last_error if row else None,
                        "last_error_at": _iso(row.last_error_at) if row else None,
                    }
                )
        backlog = sum(
            n for s, n in by_state.items() if s not in (StudyState.DELIVERED, StudyState.DEAD)
        )
        return {
            "studies": by_state,
            "instances": instances,
            "backlog": backlog,
            "sources": sources,
        }

    def throughput(self, *, hours: float = 1.0) -> dict[str, dict[str, float]]:
        """Per source: studies completed, instances and bytes delivered in the last ``hours``."""
        since = self.clock.now() - timedelta(hours=hours)
        out: dict[str, dict[str, float]] = {}
        with self.db.read_session() as session:
            for source, count, size in session.execute(
                select(
                    GatewayStudy.source,
                    func.count(),
                    func.coalesce(func.sum(GatewayInstance.size), 0),
                )
                .select_from(GatewayInstance)
                .join(GatewayStudy, GatewayStudy.id == GatewayInstance.study_id)
                .where(GatewayInstance.delivered_at >= since)
                .group_by(GatewayStudy.source)
            ):
                out[source] = {"instances": int(count), "bytes": int(size), "studies": 0}
            for source, count in session.execute(
                select(GatewayStudy.source, func.count())
                .where(GatewayStudy.delivered_at >= since)
                .group_by(GatewayStudy.source)
            ):
                row = out.setdefault(source, {"instances": 0, "bytes": 0, "studies": 0})
                row["studies"] = int(count)
        for row in out.values():
            row["mb_per_hour"] = round(row["bytes"] / 1e6 / hours, 3)
        return out

    def attempts(self, study_instance_uid: str) -> list[Attempt]:
        with self.db.read_session() as session:
            return list(
                session.scalars(
                    select(Attempt)
                    .join(GatewayStudy, GatewayStudy.id == Attempt.study_id)
                    .where(GatewayStudy.study_instance_uid == study_instance_uid)
                    .order_by(Attempt.id)
                )
            )

    def instances(self, study_instance_uid: str) -> list[GatewayInstance]:
        with self.db.read_session() as session:
            return list(
                session.scalars(
                    select(GatewayInstance)
                    .join(GatewayStudy, GatewayStudy.id == GatewayInstance.study_id)
                    .where(GatewayStudy.study_instance_uid == study_instance_uid)
                    .order_by(GatewayInstance.id)
                )
            )

    def study(self, study_instance_uid: str) -> GatewayStudy | None:
        with self.db.read_session() as session:
            return session.scalars(
                select(GatewayStudy).where(GatewayStudy.study_instance_uid == study_instance_uid)
            ).one_or_none()

    def spooled(self) -> Iterator[str]:
        return (info.key for info in self.spool.iter_objects())

    @staticmethod
    def _received(session: Session, study_id: int) -> int:
        return int(
            session.scalar(select(func.count()).where(GatewayInstance.study_id == study_id)) or 0
        )

    @staticmethod
    def _instance_counts(session: Session, study_id: int) -> dict[str, int]:
        return dict(
            session.execute(
                select(GatewayInstance.state, func.count())
                .where(GatewayInstance.study_id == study_id)
                .group_by(GatewayInstance.state)
            ).all()
        )


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat(timespec="seconds") if moment else None
