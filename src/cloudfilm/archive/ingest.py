"""The ingest pipeline: the one function every door (C-STORE, import, STOW-RS, gateway) calls.

Order of work, so that a crash at any point loses nothing that was acknowledged and
leaves no index row without bytes:

1. parse and validate (:mod:`cloudfilm.archive.parsing`); refusals are audited;
2. an identical object already indexed → done, nothing written;
2a. uncompressed images are re-encoded losslessly and verified bit-exact
    (:mod:`cloudfilm.archive.compression`); on any doubt the object is stored as received;
3. write the blob under a fresh key (temporary file → fsync → rename → fsync directory);
4. in one transaction: index rows, counters, audit event; commit;
5. only then answer the sender. A crash between 3 and 4 leaves an orphan blob that
   :func:`sweep_orphans` removes; never a row without bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from cloudfilm.archive import service
from cloudfilm.archive.compression import compress_for_storage
from cloudfilm.archive.models import CompressionJob, Instance, Study
from cloudfilm.archive.parsing import IngestLimits, ParsedInstance, parse_instance
from cloudfilm.archive.tiering import Tiering
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import Codec, Settings
from cloudfilm.db import Database
from cloudfilm.errors import InvalidDicom, StorageFull, StorageUnavailable
from cloudfilm.storage import StorageBackend, codecs, new_key, open_storage
from cloudfilm.storage.alarms import ALARM_HOOKS
from cloudfilm.storage.mirror import MirroredBackend
from cloudfilm.storage.monitor import ArchiveTotals, StorageMonitor
from cloudfilm.storage.tiers import ONLINE, TieredStorage, online_backend

logger = logging.getLogger(__name__)

_RETRIES = 5
# Compared with the checksum of the object as received, which is the stored one's unless
# the object was compressed at ingest.
_KNOWN_CHECKSUM = select(Instance.original_checksum).where(
    Instance.sop_instance_uid == bindparam("uid")
)


class IngestStatus(StrEnum):
    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class IngestResult:
    status: IngestStatus
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    reason: str | None = None
    """Why the object was rejected, or a note about a duplicate."""
    notes: list[str] = field(default_factory=list)
    sop_class_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not IngestStatus.REJECTED


_OUTCOMES: dict[service.StoreOutcome, tuple[IngestStatus, str | None]] = {
    service.StoreOutcome.STORED: (IngestStatus.STORED, None),
    service.StoreOutcome.REPLACED: (IngestStatus.REPLACED, None),
    service.StoreOutcome.DUPLICATE: (IngestStatus.DUPLICATE, "identical object already stored"),
    service.StoreOutcome.DUPLICATE_KEPT_FIRST: (
        IngestStatus.DUPLICATE,
        "a different object with this SOP Instance UID is already stored; kept that one",
    ),
}


class Archive:
    """The archive of one process: index database, storage and the ingest pipeline."""

    def __init__(
        self, settings: Settings, db: Database | None = None, storage: StorageBackend | None = None
    ) -> None:
        self.settings = settings
        self.db = db or Database(settings)
        self.storage = storage or open_storage(settings, db=self.db)
        # Domain code running in a session (HL7 handlers storing a report's PDF) finds it.
        self.db.info.setdefault("storage", self.storage)
        online = online_backend(self.storage)
        if isinstance(online, MirroredBackend):
            online.attach(self.db)  # the copy journal and alarms live in the index
        self.storage_name = "primary"
        devices: dict[str, tuple[StorageBackend, str]] = {self.storage_name: (online, "online")}
        if isinstance(self.storage, TieredStorage):
            for name, tier in self.storage.tiers.items():
                if name != ONLINE:
                    devices[name] = (tier.backend, name)
        self.monitor = StorageMonitor(self.db, settings.monitoring, devices, self.totals)
        """Free-space guard before every write, usage, alarms (:mod:`cloudfilm.storage.monitor`)."""
        if settings.notify.alarm_recipients:
            from cloudfilm.notify.alarms import notify_alarm

            self.monitor.on_raised.append(notify_alarm)
        # Integrity alarms (mirror, scrub) raised outside the monitor run the same hooks.
        self.db.info[ALARM_HOOKS] = self.monitor.on_raised
        self.limits = IngestLimits(
            max_object_bytes=settings.ingest.max_object_bytes,
            max_frame_pixels=settings.ingest.max_frame_pixels,
        )
        self.tiering = Tiering(self)
        """Tier migration and recall jobs, pins (:mod:`cloudfilm.archive.tiering`)."""

    def close(self) -> None:
        self.db.dispose()

    def ingest(
        self,
        data: bytes,
        *,
        actor: Actor,
        transfer_syntax_uid: str | None = None,
        study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Validate, store and index one object. Never raises for bad input.

        ``study_instance_uid``, when given, is the study the sender says the object belongs
        to (STOW-RS ``POST /studies/{study}``); an object of another study is refused.

        Raises
        ------
        StorageUnavailable
            When the bytes cannot be written or the index cannot be reached; the sender
            should try again later (C-STORE 0xA700, HTTP 503/507).
        """
        try:
            parsed = parse_instance(data, self.limits, transfer_syntax_uid=transfer_syntax_uid)
            if study_instance_uid and parsed.study_instance_uid != study_instance_uid:
                raise InvalidDicom(
                    f"the object belongs to study {parsed.study_instance_uid}, "
                    f"not to {study_instance_uid} named in the request"
                )
        except InvalidDicom as exc:
            self._record_rejection(actor, str(exc), data)
            return IngestResult(IngestStatus.REJECTED, reason=str(exc))

        algorithm = self.settings.storage.checksum.value
        digest = service.checksum(parsed.blob, algorithm)
        later = self._compress_later(parsed)
        inline = not later and self.settings.compression.at_ingest
        # A resent object is recognised by the index transaction anyway; look it up first
        # only when compressing it now would be wasted work.
        if inline and self._known_checksum(parsed.sop_instance_uid) == digest:
            self._record_duplicate(parsed, actor)
            return self._result(
                IngestStatus.DUPLICATE, parsed, _OUTCOMES[service.StoreOutcome.DUPLICATE][1]
            )

        # Lossless compression (settings.compression): ``parsed`` becomes the form we store,
        # now or (deferred) by a background job queued with the index rows.
        received, received_digest = parsed, digest
        if inline:
            parsed = compress_for_storage(received, self.settings.compression)
        if parsed is not received:
            digest = service.checksum(parsed.blob, algorithm)
        record = service.describe(parsed)
        key = new_key()
        try:
            # Refused before the disk is full (reserve), or by the device itself (ENOSPC):
            # either way nothing is indexed and the sender is told to retry (0xA700, 507).
            self.monitor.check_space(self.storage_name, len(parsed.blob))
            self.storage.put(key, parsed.blob)
        except StorageFull as exc:
            self.monitor.note_refusal(self.storage_name, len(parsed.blob))
            self._record_refusal(parsed, actor, str(exc))
            raise
        stored = service.StoredObject(
            key,
            self.storage_name,
            len(parsed.blob),
            digest,
            original_size=len(received.blob),
            original_checksum=received_digest,
            original_transfer_syntax_uid=received.transfer_syntax_uid,
            compress_after=self.settings.compression.deferred_delay_seconds if later else None,
        )
        try:
            result = self._index(record, stored, actor)
        except BaseException:
            self.storage.delete(key)
            raise
        if result.outcome in (
            service.StoreOutcome.DUPLICATE,
            service.StoreOutcome.DUPLICATE_KEPT_FIRST,
        ):
            self.storage.delete(key)
        if result.replaced_key:
            self.storage.delete(result.replaced_key)
        status, reason = _OUTCOMES[result.outcome]
        return self._result(status, parsed, reason)

    def _compress_later(self, parsed: ParsedInstance) -> bool:
        settings = self.settings.compression
        if not settings.deferred:
            return False
        modality = str(parsed.ds.get("Modality", "") or "")
        if settings.codec_for(modality) is Codec.NONE:
            return False
        return codecs.suitable(parsed.ds, parsed.transfer_syntax_uid, settings.min_pixel_bytes)

    @staticmethod
    def _result(
        status: IngestStatus, parsed: ParsedInstance, reason: str | None = None
    ) -> IngestResult:
        return IngestResult(
            status,
            parsed.sop_instance_uid,
            parsed.study_instance_uid,
            reason,
            parsed.notes,
            str(parsed.ds.SOPClassUID),
        )

    def _known_checksum(self, sop_instance_uid: str) -> str | None:
        with self.db.read_connection() as conn:
            return conn.execute(_KNOWN_CHECKSUM, {"uid": sop_instance_uid}).scalar()

    def _index(
        self, record: service.IndexRecord, stored: service.StoredObject, actor: Actor
    ) -> service.StoreResult:
        """Run :func:`service.store_instance` in its own transaction, retrying races."""
        delay = 0.01
        for attempt in range(1, _RETRIES + 1):
            try:
                with self.db.session() as session:
                    return service.store_instance(
                        session=session,
                        record=record,
                        stored=stored,
                        actor=actor,
                        policy=self.settings.ingest.duplicate_policy,
                    )
            except (IntegrityError, OperationalError) as exc:
                # A concurrent ingest created the same row first, a deadlock was broken,
                # or the database is briefly unavailable: the retry sees the new state.
                if attempt == _RETRIES:
                    raise StorageUnavailable(
                        f"the index could not record {record.sop_instance_uid}: {exc.orig}"
                    ) from exc
                time.sleep(delay)
                delay *= 4
            except DBAPIError as exc:
                raise StorageUnavailable(f"the index database failed: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def _record_duplicate(self, parsed: ParsedInstance, actor: Actor) -> None:
        self._audit(
            actor,
            event_type=AuditEventType.INSTANCE_DUPLICATE,
            outcome=AuditOutcome.SUCCESS,
            object_id=parsed.sop_instance_uid,
            study_instance_uid=parsed.study_instance_uid,
            message=_OUTCOMES[service.StoreOutcome.DUPLICATE][1],
        )

    def _record_refusal(self, parsed: ParsedInstance, actor: Actor, reason: str) -> None:
        try:
            self._audit(
                actor,
                event_type=AuditEventType.INSTANCE_REFUSED,
                outcome=AuditOutcome.MAJOR_FAILURE,
                object_id=parsed.sop_instance_uid,
                study_instance_uid=parsed.study_instance_uid,
                message=reason,
            )
        except StorageUnavailable:
            # The index may share the full disk; the refusal still reaches the sender.
            logger.warning("could not audit an ingest refused for lack of space")

    def totals(self) -> ArchiveTotals:
        """Bytes and objects per storage name, and studies (for the storage monitor)."""
        with self.db.read_session() as session:
            rows = session.execute(
                select(
                    Instance.storage_name,
                    func.coalesce(func.sum(Instance.byte_size), 0),
                    func.count(),
                ).group_by(Instance.storage_name)
            ).all()
            studies = session.scalar(select(func.count()).select_from(Study)) or 0
        by_storage = {str(name): (int(size), int(count)) for name, size, count in rows}
        return ArchiveTotals(by_storage, int(studies), self._ingested_since)

    def _ingested_since(self, since: datetime) -> dict[str, int]:
        with self.db.read_session() as session:
            rows = session.execute(
                select(Instance.storage_name, func.coalesce(func.sum(Instance.byte_size), 0))
                .where(Instance.created_at >= since)
                .group_by(Instance.storage_name)
            ).all()
        return {str(name): int(size) for name, size in rows}

    def _record_rejection(self, actor: Actor, reason: str, data: bytes) -> None:
        self._audit(
            actor,
            event_type=AuditEventType.INSTANCE_REJECTED,
            outcome=AuditOutcome.SERIOUS_FAILURE,
            message=reason,
            detail={"bytes": len(data)},
        )

    def _audit(self, actor: Actor, **fields: Any) -> None:
        """An audit event in a transaction of its own (nothing else changes)."""
        try:
            with self.db.session() as session:
                audit.record(
                    session=session,
                    actor=actor,
                    action=AuditAction.CREATE,
                    object_type="instance",
                    **fields,
                )
        except DBAPIError as exc:
            raise StorageUnavailable(f"the index database failed: {exc.orig}") from exc

    def sweep(self, *, orphan_age: timedelta = timedelta(hours=1)) -> tuple[int, int]:
        """Remove abandoned temporary files and orphan blobs; return (temporary, orphans)."""
        temporary = self.storage.sweep_temporary(self.settings.storage.temp_max_age_seconds)
        return temporary, sweep_orphans(self, older_than=orphan_age)


def sweep_orphans(archive: Archive, *, older_than: timedelta) -> int:
    """Delete blobs that no index row points to and that are older than ``older_than``.

    Such blobs are what a crash between the storage write and the index commit leaves.
    The age guard keeps blobs of ingests that are in flight right now.
    """
    cutoff = datetime.now(UTC) - older_than
    removed = 0
    batch: list[str] = []

    def flush() -> int:
        from cloudfilm.archive.deletion import DeletedInstance
        from cloudfilm.reports.models import Document

        with archive.db.read_session() as session:
            known = set(
                session.scalars(select(Instance.storage_key).where(Instance.storage_key.in_(batch)))
            )
            # Bytes of deleted instances wait in the recycle bin: referenced, not orphans.
            known.update(
                session.scalars(
                    select(DeletedInstance.storage_key).where(
                        DeletedInstance.storage_key.in_(batch)
                    )
                )
            )
            # Received objects replaced by their compressed form, kept for a grace period.
            known.update(
                session.scalars(
                    select(CompressionJob.old_key).where(CompressionJob.old_key.in_(batch))
                )
            )
            # Report PDFs, labels and RIS documents of the document registry.
            known.update(
                session.scalars(select(Document.storage_key).where(Document.storage_key.in_(batch)))
            )
        count = 0
        for key in batch:
            if key not in known:
                archive.storage.delete(key)
                count += 1
        batch.clear()
        return count

    for info in archive.storage.iter_objects():
        if info.modified < cutoff:
            batch.append(info.key)
            if len(batch) >= 500:
                removed += flush()
    if batch:
        removed += flush()
    if removed:
        logger.warning("removed %d orphan storage objects older than %s", removed, older_than)
    return removed
