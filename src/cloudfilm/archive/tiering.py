"""Tier migration and recall: durable jobs that move a study's objects between tiers.

The storage layer (:mod:`cloudfilm.storage.tiers`) knows tiers and keys; this module knows
studies. A job (:class:`~cloudfilm.archive.models.StorageJob`) goes through steps that are
each committed before the next and each safe to repeat, so a crash (kill -9) at any point
resumes where it stopped and never loses the only copy:

1. ``copying`` — every object of the study still on the source tier is written to the
   target (skipped when the target already holds it with the recorded checksum) and read
   back there; a copy that does not match the checksum recorded at ingest fails the step;
2. ``switching`` — every such object is confirmed on the target (size), then ONE index
   transaction points the instances at the target tier and moves the job on; an object
   that arrived meanwhile sends the job back to copying;
3. ``cleaning`` — the source copies of objects the index now places on the target are
   deleted (absent ones are fine);
4. ``done``.

The source copy is never deleted before the index points at a verified target copy.
Failures are retried with back-off (``tiers.max_attempts``), then the job is ``failed``
until retried. A runner holds a job with a lease renewed after every object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time as time_module
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import and_, case, exists, false, func, or_, select, update
from sqlalchemy.orm import Session

from cloudfilm.archive.access import AccessLog
from cloudfilm.archive.models import (
    CompressionJob,
    Instance,
    Patient,
    Series,
    StorageJob,
    Study,
)
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import TierPolicy
from cloudfilm.errors import CloudFilmError, Conflict, NotFound, RecallNeeded, StorageUnavailable
from cloudfilm.storage.tiers import ONLINE, TieredStorage, storage_name_of, tier_of

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.archive.recompress import Compressor

logger = logging.getLogger(__name__)

ANY = "*"
_UNCOMPRESSED = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
_MAX_BACKOFF = timedelta(minutes=10)


class JobKind(StrEnum):
    MIGRATE = "migrate"
    RECALL = "recall"


class JobState(StrEnum):
    QUEUED = "queued"
    COPYING = "copying"
    SWITCHING = "switching"
    CLEANING = "cleaning"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.COPYING, JobState.SWITCHING, JobState.CLEANING)


class _LostLease(Exception):
    """Another runner took the job over (our lease ran out): stop without touching it."""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timezone-aware columns back naive (they were stored as UTC).
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def job_view(job: StorageJob, study_uid: str | None = None) -> dict[str, Any]:
    """What the console and the viewer show of a job."""
    next_at = _aware(job.next_attempt_at)
    return {
        "id": job.id,
        "kind": job.kind,
        "study": study_uid,
        "source": job.source_tier,
        "target": job.target_tier,
        "state": job.state,
        "objects_total": job.objects_total,
        "objects_done": job.objects_done,
        "attempts": job.attempts,
        "next_attempt_at": next_at.isoformat() if next_at else None,
        "last_error": job.last_error,
        "requested_by": job.requested_by,
        "created_at": _aware(job.created_at).isoformat(),  # type: ignore[union-attr]
        "updated_at": _aware(job.updated_at).isoformat(),  # type: ignore[union-attr]
    }


def actor_of(requested_by: str) -> Actor:
    """Who a job's ``requested_by`` names, for the audit trail when the caller gave no
    actor: a read (recall on access), a policy (the planner), the CLI, else a user."""
    if requested_by == "read":
        return Actor.system("storage-recall")
    if requested_by.startswith("policy") or not requested_by:
        return Actor.system("storage-tiers")
    if requested_by == "cli":
        return Actor.cli("storage")
    return Actor(ActorType.USER, requested_by)


def _audit_job(
    session: Session,
    job: StorageJob,
    event: AuditEventType,
    actor: Actor,
    *,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
) -> None:
    """One audit record of ``job`` in ``session``'s transaction (call it last)."""
    row = session.execute(
        select(Study.study_instance_uid, Patient.patient_id)
        .join(Patient, Patient.id == Study.patient_pk)
        .where(Study.id == job.study_pk)
    ).one_or_none()
    study_uid, patient_id = (row[0], row[1]) if row is not None else (None, None)
    what = {
        AuditEventType.STORAGE_JOB_QUEUED: "queued",
        AuditEventType.STORAGE_JOB_DONE: "done",
        AuditEventType.STORAGE_JOB_FAILED: "failed",
    }[event]
    message = f"storage job {job.id} ({job.kind} {job.source_tier} → {job.target_tier}) {what}"
    if event is AuditEventType.STORAGE_JOB_FAILED and job.last_error:
        message += f": {job.last_error}"
    audit.record(
        session=session,
        actor=actor,
        event_type=event,
        action=AuditAction.CREATE
        if event is AuditEventType.STORAGE_JOB_QUEUED
        else (AuditAction.UPDATE),
        outcome=outcome,
        object_type="storage-job",
        object_id=str(job.id),
        patient_id=patient_id or None,
        study_instance_uid=study_uid,
        message=message,
        detail={
            "job": job.id,
            "kind": job.kind,
            "source": job.source_tier,
            "target": job.target_tier,
            "state": job.state,
            "objects_total": job.objects_total,
            "objects_done": job.objects_done,
            "attempts": job.attempts,
            "requested_by": job.requested_by,
            "last_error": job.last_error,
        },
    )


def in_window(window: str | None, local: time) -> bool:
    """``local`` falls in ``HH:MM-HH:MM`` (which may cross midnight); no window: always."""
    if not window:
        return True
    start_text, end_text = window.split("-")
    start, end = time.fromisoformat(start_text), time.fromisoformat(end_text)
    if start <= end:
        return start <= local < end
    return local >= start or local < end


@dataclass(frozen=True, slots=True)
class Planned:
    study_instance_uid: str
    policy: int
    source: str
    target: str
    job_id: int | None


def _verified(backend: Any, key: str, size: int, checksum: str) -> bool:
    """``backend`` holds ``key`` with ``size`` bytes hashing to ``checksum``."""
    try:
        if backend.stat(key).size != size:
            return False
        data = backend.read(key)
    except NotFound:
        return False
    return _matches(data, checksum)


def _matches(data: bytes, checksum: str) -> bool:
    algorithm, _, expected = checksum.partition(":")
    return hashlib.new(algorithm, data).hexdigest() == expected


class Tiering:
    """Jobs, planner, pins and locations of one archive's tiered storage."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.db = archive.db
        self.settings = archive.settings.tiers
        storage = archive.storage
        self.storage: TieredStorage | None = storage if isinstance(storage, TieredStorage) else None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        """Set when a recall is requested, so the runner thread starts at once."""
        self.access = AccessLog(self.db)
        """Last retrieval of studies (``not_accessed_days`` of the tier policies)."""
        self._compressor: Compressor | None = None
        if self.storage is not None:
            self.storage.attach(self.locate, self.recall_for_key)

    @property
    def compressor(self) -> Compressor:
        """The background compression's runner, for ``compression.at_migration``."""
        if self._compressor is None:
            from cloudfilm.archive.recompress import Compressor

            compressor = Compressor(self.archive)
            # The codec choice applies here even when images are kept as received at
            # ingest (``at_ingest = false``: ``codec_for`` would say ``none``).
            compressor.settings = compressor.settings.model_copy(update={"at_ingest": True})
            self._compressor = compressor
        return self._compressor

    def close(self) -> None:
        if self._compressor is not None:
            self._compressor.close()
            self._compressor = None

    # ------------------------------------------------------------------ index lookups

    def tiers(self) -> dict[str, bool]:
        """Tier name → read on request."""
        if self.storage is None:
            return {ONLINE: True}
        return {name: t.online_reads for name, t in self.storage.tiers.items()}

    def _require_tiers(self) -> TieredStorage:
        if self.storage is None:
            raise Conflict("no storage tiers configured (tiers.backends) · 未配置分级存储")
        return self.storage

    def locate(self, key: str) -> str | None:
        """``instance.storage_name`` of the object ``key`` (``None``: not indexed)."""
        rows = self.db.read_once(
            select(Instance.storage_name).where(Instance.storage_key == key), {}
        )
        return str(rows[0][0]) if rows else None

    def _study(self, session: Session, study_uid: str) -> Study:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_uid)
        ).one_or_none()
        if study is None:
            raise NotFound(f"no study {study_uid}")
        return study

    @staticmethod
    def _active_job(session: Session, study_pk: int) -> StorageJob | None:
        return session.scalars(
            select(StorageJob)
            .where(StorageJob.study_pk == study_pk, StorageJob.state.in_(ACTIVE))
            .order_by(StorageJob.id)
            .limit(1)
        ).one_or_none()

    @staticmethod
    def _tier_counts(session: Session, study_pk: int) -> dict[str, int]:
        rows = session.execute(
            select(Instance.storage_name, Instance.id)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk)
        ).all()
        counts: dict[str, int] = {}
        for name, _ in rows:
            counts[tier_of(name)] = counts.get(tier_of(name), 0) + 1
        return counts

    # ------------------------------------------------------------------ requests

    def enqueue(
        self,
        session: Session,
        study: Study,
        kind: JobKind,
        source: str,
        target: str,
        requested_by: str = "",
        *,
        actor: Actor | None = None,
    ) -> StorageJob:
        """A job for ``study`` (flushed, audited); the study's active job when it already
        has one.

        A queued migration gives way to a recall; a migration under way is left to finish
        (the reader asks again and then starts the recall)."""
        storage = self._require_tiers()
        for name in (source, target):
            if name != ANY and name not in storage.tiers:
                raise NotFound(f"no storage tier {name!r}; configured: {', '.join(storage.tiers)}")
        active = self._active_job(session, study.id)
        if active is not None:
            if not (
                kind is JobKind.RECALL
                and active.kind == JobKind.MIGRATE
                and active.state == JobState.QUEUED
            ):
                return active
            active.state = JobState.CANCELLED
            active.last_error = "cancelled: the study was recalled"
            active.updated_at = _now()
        now = _now()
        job = StorageJob(
            kind=kind.value,
            study_pk=study.id,
            source_tier=source,
            target_tier=target,
            state=JobState.QUEUED.value,
            attempts=0,
            next_attempt_at=now,
            objects_total=0,
            objects_done=0,
            requested_by=requested_by[:64],
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        _audit_job(session, job, AuditEventType.STORAGE_JOB_QUEUED, actor or actor_of(requested_by))
        if kind is JobKind.RECALL:
            self.wake.set()
        return job

    def request_recall(
        self, study_uid: str, requested_by: str = "", *, actor: Actor | None = None
    ) -> dict[str, Any] | None:
        """Recall every object of the study that is not online; ``None`` when all are."""
        with self.db.session() as session:
            study = self._study(session, study_uid)
            counts = self._tier_counts(session, study.id)
            if not any(n != ONLINE for n in counts):
                return None
            job = self.enqueue(
                session, study, JobKind.RECALL, ANY, ONLINE, requested_by, actor=actor
            )
            return job_view(job, study_uid)

    def migrate(
        self,
        study_uid: str,
        source: str,
        target: str,
        requested_by: str = "",
        *,
        actor: Actor | None = None,
    ) -> dict[str, Any]:
        """Queue a migration of one study (administrator, CLI); pinned studies stay online."""
        with self.db.session() as session:
            study = self._study(session, study_uid)
            if study.pinned and source == ONLINE:
                raise Conflict(f"study {study_uid} is pinned online · 该检查已固定在在线存储")
            job = self.enqueue(
                session, study, JobKind.MIGRATE, source, target, requested_by, actor=actor
            )
            return job_view(job, study_uid)

    def recall_for_key(self, key: str, tier: str) -> tuple[str | None, int | None]:
        """A read found ``key`` on the offline ``tier``: recall its study (idempotent)."""
        try:
            with self.db.session() as session:
                row = session.execute(
                    select(Study)
                    .join(Series, Series.study_pk == Study.id)
                    .join(Instance, Instance.series_pk == Series.id)
                    .where(Instance.storage_key == key)
                ).one_or_none()
                if row is None:
                    return None, None
                study: Study = row[0]
                job = self.enqueue(session, study, JobKind.RECALL, ANY, ONLINE, "read")
                return study.study_instance_uid, job.id
        except CloudFilmError:
            logger.exception("could not start the recall of an offline object (tier %s)", tier)
            return None, None

    def ensure_rows_readable(self, rows: list[Instance]) -> None:
        """Raise :class:`RecallNeeded` before a stream starts when an object is offline
        (a streamed response cannot change its status afterwards); starts the recall."""
        if self.storage is None:
            return
        offline = {storage_name_of(t) for t in self.storage.offline_tiers()}
        for row in rows:
            if row.storage_name in offline:
                raise self.storage.recall_error(row.storage_key, tier_of(row.storage_name))

    def offline_studies(self, keys: list[str]) -> dict[int, str]:
        """Study pk → Study Instance UID of the studies that have one of the objects
        ``keys`` on a tier that is not read on request."""
        if self.storage is None:
            return {}
        offline = [storage_name_of(t) for t in self.storage.offline_tiers()]
        if not offline:
            return {}
        studies: dict[int, str] = {}
        with self.db.read_session() as session:
            for start in range(0, len(keys), 500):
                rows = session.execute(
                    select(Study.id, Study.study_instance_uid)
                    .join(Series, Series.study_pk == Study.id)
                    .join(Instance, Instance.series_pk == Series.id)
                    .where(
                        Instance.storage_key.in_(keys[start : start + 500]),
                        Instance.storage_name.in_(offline),
                    )
                    .distinct()
                ).all()
                studies.update({r[0]: r[1] for r in rows})
        return studies

    def recall_for_retrieve(
        self, keys: list[str], *, wait: float, actor: Actor, requested_by: str = "retrieve"
    ) -> list[int]:
        """Before a C-MOVE / C-GET sends ``keys``: recall the studies that have some of them
        offline and wait up to ``wait`` seconds for that; the recall jobs still running
        (empty: everything can be read now)."""
        studies = self.offline_studies(keys)
        if not studies:
            return []
        jobs: list[int] = []
        with self.db.session() as session:
            for study_pk in studies:
                study = session.get(Study, study_pk)
                if study is not None:
                    job = self.enqueue(
                        session, study, JobKind.RECALL, ANY, ONLINE, requested_by, actor=actor
                    )
                    jobs.append(job.id)
        deadline = time_module.monotonic() + wait
        while True:
            if not self.offline_studies(keys):
                return []
            if time_module.monotonic() >= deadline:
                return jobs
            time_module.sleep(min(0.2, max(0.0, deadline - time_module.monotonic())))

    def set_pinned(
        self, study_uid: str, pinned: bool, requested_by: str = "", *, actor: Actor | None = None
    ) -> dict[str, Any]:
        """Pin (keep online; recall what is not) or unpin a study; audited."""
        actor = actor or actor_of(requested_by)
        with self.db.session() as session:
            study = self._study(session, study_uid)
            was = study.pinned
            study.pinned = pinned
            job = None
            if pinned and self.storage is not None:
                active = self._active_job(session, study.id)
                if (
                    active is not None
                    and active.kind == JobKind.MIGRATE
                    and active.state == JobState.QUEUED
                ):
                    active.state = JobState.CANCELLED
                    active.last_error = "cancelled: the study was pinned"
                    active.updated_at = _now()
                if any(n != ONLINE for n in self._tier_counts(session, study.id)):
                    job = self.enqueue(
                        session, study, JobKind.RECALL, ANY, ONLINE, requested_by, actor=actor
                    )
            patient_id = session.scalar(
                select(Patient.patient_id).where(Patient.id == study.patient_pk)
            )
            audit.record(
                session=session,
                actor=actor,
                event_type=AuditEventType.STUDY_PINNED if pinned else AuditEventType.STUDY_UNPINNED,
                action=AuditAction.UPDATE,
                object_type="study",
                object_id=study_uid,
                patient_id=patient_id or None,
                study_instance_uid=study_uid,
                message=f"study {'pinned to' if pinned else 'unpinned from'} the online tier"
                + ("" if was != pinned else " (no change)"),
                detail={"pinned": pinned, "was": was, "recall_job": job.id if job else None},
            )
            return {
                "study": study_uid,
                "pinned": pinned,
                "job": job_view(job, study_uid) if job is not None else None,
            }

    def location(self, study_uid: str) -> dict[str, Any]:
        """Tier of each series (instance counts), pin, and the study's current job."""
        with self.db.read_session() as session:
            study = self._study(session, study_uid)
            rows = session.execute(
                select(Series.series_instance_uid, Instance.storage_name)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk == study.id)
            ).all()
            series: dict[str, dict[str, int]] = {}
            totals: dict[str, int] = {}
            for series_uid, name in rows:
                tier = tier_of(name)
                series.setdefault(series_uid, {})
                series[series_uid][tier] = series[series_uid].get(tier, 0) + 1
                totals[tier] = totals.get(tier, 0) + 1
            job = self._active_job(session, study.id)
            if job is None:
                job = session.scalars(
                    select(StorageJob)
                    .where(StorageJob.study_pk == study.id)
                    .order_by(StorageJob.id.desc())
                    .limit(1)
                ).one_or_none()
            reads = self.tiers()
            offline = sum(c for t, c in totals.items() if not reads.get(t, True))
            recalling = job is not None and job.kind == JobKind.RECALL and job.state in ACTIVE
            if recalling:
                status = "recalling"
            elif offline:
                status = "offline"
            else:
                status = "available"
            return {
                "study": study_uid,
                "pinned": study.pinned,
                "status": status,
                "message": {
                    "recalling": "正在调取 · recalling from offline storage",
                    "offline": "离线存储，打开时调取 · offline, recalled when opened",
                    "available": "可用 · available",
                }[status],
                "tiers": totals,
                "series": [{"series": uid, "tiers": t} for uid, t in sorted(series.items())],
                "job": job_view(job, study_uid) if job is not None else None,
            }

    def jobs(self, *, states: list[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.read_session() as session:
            query = (
                select(StorageJob, Study.study_instance_uid)
                .join(Study, Study.id == StorageJob.study_pk)
                .order_by(StorageJob.id.desc())
                .limit(limit)
            )
            if states:
                query = query.where(StorageJob.state.in_(states))
            return [job_view(job, uid) for job, uid in session.execute(query).all()]

    def retry(self, job_id: int | None = None) -> int:
        """Failed job(s) back to their last step with a fresh attempt count."""
        with self.db.session() as session:
            query = update(StorageJob).where(StorageJob.state == JobState.FAILED)
            if job_id is not None:
                query = query.where(StorageJob.id == job_id)
            # A failed job resumes from copying: every step is safe to repeat.
            result = session.execute(
                query.values(
                    state=JobState.COPYING.value,
                    attempts=0,
                    next_attempt_at=_now(),
                    lease_owner=None,
                    lease_until=None,
                    updated_at=_now(),
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ planner

    def plan(
        self, *, apply: bool, now: datetime | None = None, respect_windows: bool = False
    ) -> list[Planned]:
        """Studies the policies would move (and with ``apply`` the jobs queued for them)."""
        now = now or _now()
        local = now.astimezone().time()
        planned: list[Planned] = []
        if self.storage is None:
            return planned
        for index, policy in enumerate(self.settings.policies):
            if respect_windows and not in_window(policy.window, local):
                continue
            for study_pk, study_uid, modalities in self._candidates(policy, now):
                if policy.modalities and not set(modalities.split("\\")) & set(policy.modalities):
                    continue
                job_id = None
                if apply:
                    with self.db.session() as session:
                        study = session.get(Study, study_pk)
                        if study is None or study.pinned:
                            continue
                        job = self.enqueue(
                            session, study, JobKind.MIGRATE, policy.source, policy.target,
                            f"policy {index}",
                        )  # fmt: skip
                        job_id = job.id
                planned.append(Planned(study_uid, index, policy.source, policy.target, job_id))
        return planned

    def _candidates(self, policy: TierPolicy, now: datetime) -> list[tuple[int, str, str]]:
        cutoff = now - timedelta(days=policy.older_than_days)
        source = storage_name_of(policy.source)
        on_source = exists().where(
            Series.study_pk == Study.id,
            Instance.series_pk == Series.id,
            Instance.storage_name == source,
        )
        busy = exists().where(StorageJob.study_pk == Study.id, StorageJob.state.in_(ACTIVE))
        query = select(Study.id, Study.study_instance_uid, Study.modalities_in_study).where(
            Study.pinned == false(),
            on_source,
            ~busy,
            Study.total_bytes >= policy.min_study_bytes,
            or_(
                and_(Study.study_date != "", Study.study_date < cutoff.strftime("%Y%m%d")),
                and_(Study.study_date == "", Study.created_at < cutoff),
            ),
        )
        if policy.not_accessed_days is not None:
            unread = now - timedelta(days=policy.not_accessed_days)
            query = query.where(
                or_(
                    Study.last_accessed_at < unread,
                    and_(Study.last_accessed_at.is_(None), Study.created_at < unread),
                )
            )
        if policy.institutions:
            query = query.where(Study.institution_name.in_(policy.institutions))
        with self.db.read_session() as session:
            return [(r[0], r[1], r[2]) for r in session.execute(query.limit(10_000)).all()]

    # ------------------------------------------------------------------ runner

    def due_count(self) -> int:
        """Active jobs due now, held by a runner or not (``jobs run`` waits for these)."""
        with self.db.read_session() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(StorageJob)
                    .where(StorageJob.state.in_(ACTIVE), StorageJob.next_attempt_at <= _now())
                )
                or 0
            )

    def run_due(self, *, limit: int = 100) -> int:
        """Work through due jobs (at most ``limit``); the number of jobs finished."""
        finished = 0
        for _ in range(limit):
            job_id = self._claim()
            if job_id is None:
                break
            if self.run_job(job_id):
                finished += 1
        return finished

    def _claim(self) -> int | None:
        now = _now()
        free = or_(StorageJob.lease_until.is_(None), StorageJob.lease_until < now)
        with self.db.session() as session:
            candidates = session.scalars(
                select(StorageJob.id)
                .where(StorageJob.state.in_(ACTIVE), StorageJob.next_attempt_at <= now, free)
                .order_by(
                    case((StorageJob.kind == JobKind.RECALL.value, 0), else_=1), StorageJob.id
                )
                .limit(10)
            ).all()
            for job_id in candidates:
                claimed = session.execute(
                    update(StorageJob)
                    .where(StorageJob.id == job_id, StorageJob.state.in_(ACTIVE), free)
                    .values(
                        lease_owner=self.owner,
                        lease_until=now + timedelta(seconds=self.settings.job_lease_seconds),
                    )
                )
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return int(job_id)
        return None

    def _renew(self, job_id: int, *, _event: AuditEventType | None = None, **values: Any) -> None:
        """Extend our lease (and set ``values``); :class:`_LostLease` when it is not ours.
        With ``_event``, the job's audit record of that type in the same transaction."""
        now = _now()
        with self.db.session() as session:
            result = session.execute(
                update(StorageJob)
                .where(StorageJob.id == job_id, StorageJob.lease_owner == self.owner)
                .values(
                    {
                        "lease_until": now + timedelta(seconds=self.settings.job_lease_seconds),
                        "updated_at": now,
                        **values,
                    }
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise _LostLease
            if _event is not None:
                job = session.get(StorageJob, job_id)
                if job is not None:
                    _audit_job(session, job, _event, Actor.system("storage-tiers"))

    def run_job(self, job_id: int) -> bool:
        """Run one claimed job through its remaining steps; ``True`` when it ended."""
        try:
            while True:
                with self.db.read_session() as session:
                    job = session.get(StorageJob, job_id)
                    if job is None:
                        return True  # the study was deleted (cascade)
                    state = JobState(job.state)
                    kind, source, target = JobKind(job.kind), job.source_tier, job.target_tier
                    study_pk = job.study_pk
                    pinned = bool(session.scalar(select(Study.pinned).where(Study.id == study_pk)))
                if state is JobState.QUEUED:
                    if kind is JobKind.MIGRATE and pinned and source == ONLINE:
                        self._renew(job_id, state=JobState.CANCELLED.value, lease_owner=None,
                                    last_error="cancelled: the study is pinned online")  # fmt: skip
                        return True
                    if (
                        kind is JobKind.MIGRATE
                        and source == ONLINE
                        and self.archive.settings.compression.at_migration
                    ):
                        self._compress_first(job_id, study_pk)
                    self._renew(job_id, state=JobState.COPYING.value)
                elif state is JobState.COPYING:
                    self._copy(job_id, study_pk, source, target)
                    self._renew(job_id, state=JobState.SWITCHING.value)
                elif state is JobState.SWITCHING:
                    self._switch(job_id, study_pk, source, target)
                elif state is JobState.CLEANING:
                    self._clean(job_id, study_pk, source, target)
                    self._renew(
                        job_id, state=JobState.DONE.value, lease_owner=None, lease_until=None,
                        last_error=None, _event=AuditEventType.STORAGE_JOB_DONE,
                    )  # fmt: skip
                    logger.info("storage job %d (%s %s → %s) done", job_id, kind, source, target)
                    return True
                else:
                    return True
        except _LostLease:
            logger.warning("storage job %d was taken over by another runner", job_id)
            return False
        except Exception as exc:  # one bad job must not stop the runner
            logger.exception("storage job %d failed", job_id)
            self._failed(job_id, f"{type(exc).__name__}: {exc}")
            return False

    def _failed(self, job_id: int, error: str) -> None:
        with self.db.session() as session:
            job = session.get(StorageJob, job_id)
            if job is None or job.lease_owner != self.owner:
                return
            job.attempts += 1
            job.last_error = error[:512]
            delay = min(_MAX_BACKOFF, timedelta(seconds=2 ** min(job.attempts, 20)))
            job.next_attempt_at = _now() + delay
            job.lease_owner = None
            job.lease_until = None
            job.updated_at = _now()
            if job.attempts >= self.settings.max_attempts:
                job.state = JobState.FAILED.value
                session.flush()
                _audit_job(
                    session, job, AuditEventType.STORAGE_JOB_FAILED,
                    Actor.system("storage-tiers"), outcome=AuditOutcome.SERIOUS_FAILURE,
                )  # fmt: skip

    def _compress_first(self, job_id: int, study_pk: int) -> None:
        """``compression.at_migration``: the study's uncompressed online images without a
        compression job get one, and the study's queued compression jobs run now (verified
        lossless, :mod:`cloudfilm.archive.recompress`), before the objects are copied. A
        job that fails (storage) waits for its back-off; the migration goes on with the
        object as it is."""
        from cloudfilm.archive.recompress import QUEUED

        now = _now()
        of_study = (
            select(Instance.id)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk, Instance.storage_name == storage_name_of(ONLINE))
        )
        with self.db.session() as session:
            candidates = session.scalars(
                of_study.where(
                    Instance.transfer_syntax_uid.in_(_UNCOMPRESSED),
                    Instance.rows.is_not(None),
                    ~exists().where(CompressionJob.instance_pk == Instance.id),
                )
            ).all()
            for instance_pk in candidates:
                session.add(
                    CompressionJob(
                        instance_pk=instance_pk,
                        state=QUEUED,
                        attempts=0,
                        not_before=now,
                        created_at=now,
                    )
                )
            session.flush()
            jobs = list(
                session.scalars(
                    select(CompressionJob.id)
                    .where(
                        CompressionJob.state == QUEUED,
                        CompressionJob.instance_pk.in_(of_study.scalar_subquery()),
                    )
                    .order_by(CompressionJob.id)
                ).all()
            )
        if jobs:
            logger.info("storage job %d: compressing %d object(s) first", job_id, len(jobs))
        for start in range(0, len(jobs), 8):
            self.compressor.run_jobs(jobs[start : start + 8])
            self._renew(job_id)

    def _sources(self, source: str, target: str) -> list[str]:
        storage = self._require_tiers()
        if source == ANY:
            return [storage_name_of(t) for t in storage.tiers if t != target]
        return [storage_name_of(source)]

    def _objects(self, study_pk: int, names: list[str]) -> list[tuple[int, str, str, int, str]]:
        with self.db.read_session() as session:
            rows = session.execute(
                select(
                    Instance.id,
                    Instance.storage_key,
                    Instance.storage_name,
                    Instance.byte_size,
                    Instance.checksum,
                )
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk == study_pk, Instance.storage_name.in_(names))
                .order_by(Instance.id)
            ).all()
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def _copy(self, job_id: int, study_pk: int, source: str, target: str) -> None:
        storage = self._require_tiers()
        destination = storage.backend(target)
        objects = self._objects(study_pk, self._sources(source, target))
        self._renew(job_id, objects_total=len(objects), objects_done=0)
        for done, (_, key, name, size, checksum) in enumerate(objects, start=1):
            if not _verified(destination, key, size, checksum):
                data = storage.backend(tier_of(name)).read(key)
                if len(data) != size or not _matches(data, checksum):
                    raise StorageUnavailable(
                        f"the {tier_of(name)} copy of {key} does not match its recorded "
                        "checksum; not copied (run `cloudfilm storage scrub`)"
                    )
                destination.put(key, data)
                if not _verified(destination, key, size, checksum):
                    raise StorageUnavailable(f"the copy of {key} on {target} did not verify")
            self._renew(job_id, objects_done=done)

    def _switch(self, job_id: int, study_pk: int, source: str, target: str) -> None:
        storage = self._require_tiers()
        destination = storage.backend(target)
        names = self._sources(source, target)
        present: set[int] = set()
        for instance_id, key, _, size, _ in self._objects(study_pk, names):
            try:
                if destination.stat(key).size == size:
                    present.add(instance_id)
            except NotFound:
                pass
        now = _now()
        with self.db.session() as session:
            job = session.get(StorageJob, job_id)
            if job is None or job.lease_owner != self.owner or job.state != JobState.SWITCHING:
                raise _LostLease
            ids = set(
                session.scalars(
                    select(Instance.id)
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.study_pk == study_pk, Instance.storage_name.in_(names))
                ).all()
            )
            if not ids <= present:
                # Objects arrived (or went missing on the target) since copying: copy again.
                job.state = JobState.COPYING.value
                job.updated_at = now
                return
            if ids:
                session.execute(
                    update(Instance)
                    .where(Instance.id.in_(ids), Instance.storage_name.in_(names))
                    .values(storage_name=storage_name_of(target), updated_at=now)
                )
            job.state = JobState.CLEANING.value
            job.updated_at = now

    def _clean(self, job_id: int, study_pk: int, source: str, target: str) -> None:
        storage = self._require_tiers()
        sources = [tier_of(n) for n in self._sources(source, target)]
        for _, key, _, _, _ in self._objects(study_pk, [storage_name_of(target)]):
            for tier in sources:
                storage.backend(tier).delete(key)
            self._renew(job_id)


class TierRunner:
    """The job runner thread of ``cloudfilm serve``: due jobs every
    ``tiers.job_interval_seconds`` (at once when a recall is requested), and the planner
    inside each policy's window."""

    def __init__(self, tiering: Tiering) -> None:
        self.tiering = tiering
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="storage-tiers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.tiering.wake.set()
        self._thread.join(timeout=30)
        self.tiering.close()

    def _loop(self) -> None:
        interval = self.tiering.settings.job_interval_seconds
        while not self._stop.is_set():
            self.tiering.wake.clear()
            try:
                self.tiering.plan(apply=True, respect_windows=True)
                self.tiering.run_due()
                compression = self.tiering.archive.settings.compression
                if compression.at_migration and not (
                    compression.deferred and compression.at_ingest
                ):
                    # No background compressor in this process: delete the received objects
                    # that compression before migration replaced, once their grace is over.
                    self.tiering.compressor.run_once()
            except Exception:
                logger.exception("storage tier runner pass failed")
            self.tiering.wake.wait(interval)


__all__ = [
    "ACTIVE",
    "ANY",
    "JobKind",
    "JobState",
    "Planned",
    "RecallNeeded",
    "TierRunner",
    "Tiering",
    "in_window",
    "job_view",
]
