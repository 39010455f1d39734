"""Background lossless compression (``compression.deferred``): the jobs ingest queues in
the transaction that indexes an object, run after the sender has had its answer.

One job goes through steps, each committed before the next and each safe to repeat, so
a crash at any point leaves the instance on the received object or on its verified
compressed form, never on neither:

1. ``queued`` — read the stored object and check it against its recorded checksum;
   re-encode it losslessly and verify the decoded pixels bit for bit
   (:func:`cloudfilm.storage.codecs.compress_verified`, in a separate process so that the
   server's own threads keep the interpreter); write the result under a new key;
2. one transaction — the instance points at the new object (transfer syntax, size,
   checksum, frame index; series and study byte totals), provided it still points at the
   object that was read (otherwise the new object is deleted: the instance was replaced
   or deleted meanwhile); the job moves to ``cleanup`` with the received object's key,
   due ``compression.deferred_grace_seconds`` later, so that a reader that looked the
   key up just before the switch can still read it;
3. ``cleanup`` — delete the received object, then the job.

An object that is not worth compressing (nothing gained, a format the codec cannot
carry, a verification that failed) stays as received and the job ends. A storage
failure is retried with back-off, up to :data:`MAX_ATTEMPTS` times. Runners hold jobs
with a lease, so several server processes can share the queue.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, delete, func, or_, select, update

from cloudfilm.archive import frames
from cloudfilm.archive.models import CompressionJob, Instance, Series, Study
from cloudfilm.archive.parsing import part10_header
from cloudfilm.archive.service import checksum
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.service import Actor
from cloudfilm.config import Codec
from cloudfilm.errors import NotFound, StorageFull, StorageUnavailable
from cloudfilm.storage import codecs, new_key
from cloudfilm.storage.tiers import ONLINE, tier_of

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

logger = logging.getLogger(__name__)

QUEUED = "queued"
CLEANUP = "cleanup"
MAX_ATTEMPTS = 8
LEASE = timedelta(minutes=5)
_JOB = cast(Table, CompressionJob.__table__)
_ACTOR = Actor.system("compression")


def _now() -> datetime:
    return datetime.now(UTC)


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def encode(blob: bytes, target: str, min_pixel_bytes: int) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of ``blob`` re-encoded in ``target`` and verified;
    runs in a worker process."""
    out = codecs.compress_verified(blob, target, min_pixel_bytes=min_pixel_bytes)
    return out.transfer_syntax_uid, out.dataset


@dataclass(slots=True)
class PassResult:
    """What one :meth:`Compressor.run_once` did."""

    compressed: int = 0
    kept: int = 0
    """Objects left as received (not worth it, or gone meanwhile)."""
    cleaned: int = 0
    failed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    uids: list[str] = field(default_factory=list)

    @property
    def worked(self) -> bool:
        return bool(self.compressed or self.kept or self.cleaned or self.failed)


class Compressor:
    """Runs due compression jobs (:meth:`run_once`, from a background loop)."""

    def __init__(self, archive: Archive, executor: Executor | None = None) -> None:
        self.archive = archive
        self.settings = archive.settings.compression
        self._executor = executor

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.settings.processes, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def pending(self) -> int:
        with self.archive.db.read_session() as session:
            count = session.scalar(
                select(func.count()).select_from(_JOB).where(_JOB.c.state == QUEUED)
            )
        return int(count or 0)

    def run_once(self, limit: int = 64) -> PassResult:
        """Run up to ``limit`` due jobs; one audit record for the pass when it changed
        anything."""
        result = PassResult()
        now = _now()
        with self.archive.db.read_session() as session:
            due = session.execute(
                select(_JOB.c.id, _JOB.c.instance_pk, _JOB.c.state, _JOB.c.old_key)
                .where(
                    _JOB.c.not_before <= now,
                    or_(_JOB.c.lease_until.is_(None), _JOB.c.lease_until < now),
                )
                .order_by(_JOB.c.id)
                .limit(limit)
            ).all()
        for job_id, instance_pk, state, old_key in due:
            if self._lease(job_id):
                self._run(job_id, instance_pk, state, old_key, result)
        if result.compressed:
            self._audit(result)
        return result

    def run_jobs(self, job_ids: list[int]) -> PassResult:
        """Run the queued jobs ``job_ids`` now, due or not (compression before a tier
        migration, :mod:`cloudfilm.archive.tiering`); the same steps as :meth:`run_once`."""
        result = PassResult()
        for job_id in job_ids:
            with self.archive.db.read_session() as session:
                row = session.execute(
                    select(_JOB.c.instance_pk).where(_JOB.c.id == job_id, _JOB.c.state == QUEUED)
                ).one_or_none()
            if row is not None and self._lease(job_id):
                self._run(job_id, row[0], QUEUED, None, result)
        if result.compressed:
            self._audit(result)
        return result

    # -- steps ---------------------------------------------------------------------------

    def _run(
        self,
        job_id: int,
        instance_pk: int,
        state: str,
        old_key: str | None,
        result: PassResult,
    ) -> None:
        """One leased job's next step; a storage failure schedules a retry."""
        try:
            if state == CLEANUP and old_key is not None:
                self.archive.storage.delete(old_key)
                self._finish(job_id)
                result.cleaned += 1
            else:
                self._compress(job_id, instance_pk, result)
        except (StorageUnavailable, NotFound, OSError) as exc:
            result.failed += 1
            self._retry(job_id, str(exc))

    def _compress(self, job_id: int, instance_pk: int, result: PassResult) -> None:
        with self.archive.db.read_session() as session:
            row = session.execute(
                select(
                    Instance.storage_key,
                    Instance.storage_name,
                    Instance.checksum,
                    Instance.byte_size,
                    Instance.transfer_syntax_uid,
                    Instance.sop_class_uid,
                    Instance.sop_instance_uid,
                    Series.modality,
                )
                .join(Series, Instance.series_pk == Series.id)
                .where(Instance.id == instance_pk)
            ).one_or_none()
        if row is None or tier_of(row.storage_name) != ONLINE:
            self._finish(job_id)  # deleted meanwhile, or already moved to a slower tier
            result.kept += 1
            return
        codec = self.settings.codec_for(row.modality or "")
        if codec is Codec.NONE:
            self._finish(job_id)
            result.kept += 1
            return
        blob = self.archive.storage.read(row.storage_key)
        algorithm = row.checksum.split(":", 1)[0]
        if checksum(blob, algorithm) != row.checksum:
            # Never re-encode damaged bytes: the scrub reports and repairs them.
            logger.warning("compression skipped: stored object does not match its checksum")
            self._finish(job_id, "stored object does not match its checksum")
            result.kept += 1
            return
        try:
            syntax, dataset = self.executor.submit(
                encode, blob, codecs.CODEC_SYNTAX[codec], self.settings.min_pixel_bytes
            ).result()
        except (codecs.NotCompressible, codecs.CodecFailed, codecs.CodecUnavailable) as exc:
            self._finish(job_id, str(exc)[:500])
            result.kept += 1
            return
        new_blob = part10_header(syntax, row.sop_class_uid, row.sop_instance_uid) + dataset
        if len(new_blob) >= len(blob):
            self._finish(job_id, "no smaller than received")
            result.kept += 1
            return
        key = new_key()
        monitor = self.archive.monitor
        try:
            monitor.check_space(self.archive.storage_name, len(new_blob))
            self.archive.storage.put(key, new_blob)
        except StorageFull:
            monitor.note_refusal(self.archive.storage_name, len(new_blob))
            raise
        switched = self._switch(
            job_id,
            instance_pk,
            row.storage_key,
            key,
            {
                "transfer_syntax_uid": syntax,
                "byte_size": len(new_blob),
                "checksum": checksum(new_blob, algorithm),
                "frame_index": frames.locate(new_blob),
                "verified_at": _now(),
            },
            len(new_blob) - row.byte_size,
        )
        if not switched:
            self.archive.storage.delete(key)
            result.kept += 1
            return
        result.compressed += 1
        result.bytes_before += row.byte_size
        result.bytes_after += len(new_blob)
        result.uids.append(row.sop_instance_uid)

    def _switch(
        self,
        job_id: int,
        instance_pk: int,
        old_key: str,
        key: str,
        columns: dict[str, Any],
        delta: int,
    ) -> bool:
        now = _now()
        with self.archive.db.session() as session:
            changed = session.execute(
                update(Instance)
                .where(Instance.id == instance_pk, Instance.storage_key == old_key)
                .values(storage_key=key, updated_at=now, **columns)
            )
            if _rowcount(changed) != 1:
                session.execute(delete(_JOB).where(_JOB.c.id == job_id))
                return False
            series_pk = session.scalar(select(Instance.series_pk).where(Instance.id == instance_pk))
            study_pk = session.scalar(select(Series.study_pk).where(Series.id == series_pk))
            session.execute(
                update(Series)
                .where(Series.id == series_pk)
                .values(total_bytes=Series.total_bytes + delta)
            )
            session.execute(
                update(Study)
                .where(Study.id == study_pk)
                .values(total_bytes=Study.total_bytes + delta)
            )
            grace = timedelta(seconds=self.settings.deferred_grace_seconds)
            session.execute(
                update(_JOB)
                .where(_JOB.c.id == job_id)
                .values(state=CLEANUP, old_key=old_key, not_before=now + grace, lease_until=None)
            )
        return True

    # -- bookkeeping -----------------------------------------------------------------------

    def _lease(self, job_id: int) -> bool:
        now = _now()
        with self.archive.db.session() as session:
            taken = session.execute(
                update(_JOB)
                .where(
                    _JOB.c.id == job_id,
                    or_(_JOB.c.lease_until.is_(None), _JOB.c.lease_until < now),
                )
                .values(lease_until=now + LEASE)
            )
            return _rowcount(taken) == 1

    def _finish(self, job_id: int, reason: str | None = None) -> None:
        if reason:
            logger.info("object kept as received: %s", reason)
        with self.archive.db.session() as session:
            session.execute(delete(_JOB).where(_JOB.c.id == job_id))

    def _retry(self, job_id: int, error: str) -> None:
        with self.archive.db.session() as session:
            attempts = session.scalar(select(_JOB.c.attempts).where(_JOB.c.id == job_id)) or 0
            if attempts + 1 >= MAX_ATTEMPTS:
                logger.error("compression job given up after %d attempts: %s", attempts + 1, error)
                session.execute(delete(_JOB).where(_JOB.c.id == job_id))
                return
            backoff = timedelta(seconds=min(3600, 10 * 4**attempts))
            session.execute(
                update(_JOB)
                .where(_JOB.c.id == job_id)
                .values(
                    attempts=attempts + 1,
                    not_before=_now() + backoff,
                    lease_until=None,
                    last_error=error[:500],
                )
            )

    def _audit(self, result: PassResult) -> None:
        saved = result.bytes_before - result.bytes_after
        with self.archive.db.session() as session:
            audit.record(
                session=session,
                actor=_ACTOR,
                event_type=AuditEventType.INSTANCES_COMPRESSED,
                action=AuditAction.UPDATE,
                object_type="instance",
                object_id=result.uids[0] if len(result.uids) == 1 else None,
                message=f"{result.compressed} stored object(s) replaced by their verified "
                f"lossless compression, {saved} bytes saved",
                detail={
                    "compressed": result.compressed,
                    "kept": result.kept,
                    "bytes_before": result.bytes_before,
                    "bytes_after": result.bytes_after,
                    "sop_instance_uids": result.uids[:100],
                },
            )


@contextmanager
def running(archive: Archive, interval: float = 2.0) -> Iterator[Compressor | None]:
    """A background loop running the compressor while the block runs (``None`` when
    compression is not deferred)."""
    from cloudfilm.storage.mirror import PeriodicLoop

    if not (archive.settings.compression.deferred and archive.settings.compression.at_ingest):
        yield None
        return
    compressor = Compressor(archive)

    def step() -> None:
        for _ in range(16):  # then look at the stop flag again
            if not compressor.run_once().worked:
                return

    loop = PeriodicLoop("compression", step, interval)
    loop.start()
    try:
        yield compressor
    finally:
        loop.stop(timeout=60)
        compressor.close()
