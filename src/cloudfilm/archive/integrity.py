"""Integrity of the stored objects: the mirror copier, the scrub and the orphan report.

The storage layer knows bytes and keys; the index knows which keys matter and what their
checksums are. This module joins the two:

* :func:`mirror_sync` — the copier of a mirrored storage, checking each copy against the
  checksum recorded at ingest (:class:`cloudfilm.storage.mirror.MirrorSync`).
* :func:`scrub` — re-reads the least recently verified share of the objects from every
  copy, recomputes the recorded checksum (SHA-256 or SM3), rewrites a bad copy from a good
  one and verifies it again; with no good copy left: a critical alarm, an audit record and
  ``instance.integrity_error``. It never deletes anything.
* :func:`find_orphans` / :func:`remove_orphans` — bytes without index rows (per backend,
  older than a grace period) and index rows without bytes. The clean-up deletes only
  unreferenced bytes past the grace period, never an index row: rows without bytes raise
  an alarm for a human (restore from a backup).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from cloudfilm.archive.models import Instance, Series, Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.errors import NotFound, StorageUnavailable
from cloudfilm.storage.alarms import (
    INTEGRITY_SUBJECT,
    IntegrityAlarm,
    clear_alarm,
    copy_subject,
    raise_alarm,
)
from cloudfilm.storage.base import ObjectInfo, StorageBackend
from cloudfilm.storage.mirror import MirroredBackend, MirrorJournal, MirrorSync, digest_matches
from cloudfilm.storage.monitor import Severity
from cloudfilm.storage.tiers import PRIMARY, online_backend

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

logger = logging.getLogger(__name__)

_SYSTEM = Actor.system("storage-scrub")
_BATCH = 500


def copies(archive: Archive) -> list[tuple[str, StorageBackend]]:
    """(name, backend) of every copy of the online tier: ``primary`` and maybe ``mirror``.
    Read directly, not through the tier wrapper, which would start recalls."""
    storage = online_backend(archive.storage)
    if isinstance(storage, MirroredBackend):
        return storage.sides()
    return [("primary", storage)]


def mirror_sync(archive: Archive) -> MirrorSync | None:
    """The copier of the archive's mirrored storage (``None`` without a mirror)."""
    storage = online_backend(archive.storage)  # the online tier is the mirrored one
    if not isinstance(storage, MirroredBackend):
        return None
    storage.attach(archive.db)
    assert storage.journal is not None
    journal: MirrorJournal = storage.journal

    def expected(key: str) -> str | None:
        with archive.db.read_session() as session:
            return session.scalar(select(Instance.checksum).where(Instance.storage_key == key))

    return MirrorSync(storage, journal, expected)


# -- scrub


@dataclass(slots=True)
class ScrubResult:
    """What one scrub pass found and did."""

    started_at: datetime
    finished_at: datetime | None = None
    checked: int = 0
    sound: int = 0
    """Objects whose every copy matched the checksum."""
    repaired: int = 0
    """Copies rewritten from a good copy and verified."""
    damaged: int = 0
    """Objects with no good copy anywhere (critical alarm; nothing deleted)."""
    unreachable: int = 0
    """Objects not judged: a copy could not be read (device down); checked next pass."""
    bytes_read: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return data


@dataclass(frozen=True, slots=True)
class _Object:
    id: int
    key: str
    checksum: str
    sop_instance_uid: str
    study_instance_uid: str


def _objects_query() -> Any:
    return (
        select(
            Instance.id,
            Instance.storage_key,
            Instance.checksum,
            Instance.sop_instance_uid,
            Study.study_instance_uid,
        )
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
    )


def scrub(
    archive: Archive,
    *,
    share: float | None = None,
    limit: int | None = None,
    actor: Actor = _SYSTEM,
) -> ScrubResult:
    """Verify ``limit`` objects, or ``share`` of all (None and None: every object), least
    recently verified first; repair bad copies from good ones; audit a summary.

    Only objects on the online tier: lower tiers are verified when a migration copies to
    them (read back against the recorded checksum) and may be offline by design."""
    result = ScrubResult(started_at=datetime.now(UTC))
    online = Instance.storage_name == PRIMARY
    with archive.db.read_session() as session:
        total = int(session.scalar(select(func.count()).select_from(Instance).where(online)) or 0)
        if limit is None:
            limit = total if share is None else math.ceil(total * share)
        rows = session.execute(
            _objects_query()
            .where(online)
            .order_by(Instance.verified_at.asc().nulls_first(), Instance.id)
            .limit(limit)
        ).all()
    sides = copies(archive)
    for row in rows:
        item = _Object(*row)
        try:
            _check(archive, sides, item, result)
        except Exception as exc:
            # One object (or a briefly unreachable index) must not end the pass.
            logger.exception("scrub of %s failed", item.key)
            result.unreachable += 1
            result.problems.append({"key": item.key, "problem": f"check failed: {exc}"})
    result.finished_at = datetime.now(UTC)
    with archive.db.read_session() as session:
        damaged_total = int(
            session.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.integrity_error.is_not(None))
            )
            or 0
        )
    if damaged_total == 0:
        clear_alarm(archive.db, IntegrityAlarm.OBJECT_DAMAGED, INTEGRITY_SUBJECT)
    summary = result.as_dict()
    summary["problems"] = result.problems[:100]
    summary["objects_total"] = total
    summary["damaged_total"] = damaged_total
    outcome = AuditOutcome.SUCCESS
    if result.damaged or damaged_total:
        outcome = AuditOutcome.SERIOUS_FAILURE
    elif result.repaired or result.unreachable:
        outcome = AuditOutcome.MINOR_FAILURE
    with archive.db.session() as session:
        audit.record(
            session=session,
            actor=actor,
            event_type=AuditEventType.STORAGE_SCRUBBED,
            action=AuditAction.EXECUTE,
            outcome=outcome,
            object_type="storage",
            object_id="scrub",
            message=(
                f"checked {result.checked}, sound {result.sound}, repaired {result.repaired}, "
                f"damaged {result.damaged}, unreachable {result.unreachable}"
            ),
            detail=summary,
        )
    logger.info("scrub pass: %s", summary)
    return result


def _check(
    archive: Archive, sides: list[tuple[str, StorageBackend]], item: _Object, result: ScrubResult
) -> None:
    states: dict[str, str] = {}
    good: bytes | None = None
    for name, backend in sides:
        try:
            data = backend.read(item.key)
        except NotFound:
            states[name] = "missing"
            continue
        except StorageUnavailable as exc:
            states[name] = f"unreachable: {exc}"
            continue
        result.bytes_read += len(data)
        if digest_matches(data, item.checksum):
            states[name] = "ok"
            good = good if good is not None else data
        else:
            states[name] = "corrupt"
    result.checked += 1
    bad = [name for name, state in states.items() if state in ("missing", "corrupt")]
    unreachable = [name for name, state in states.items() if state.startswith("unreachable")]
    if good is None:
        if unreachable:
            result.unreachable += 1
            result.problems.append({"key": item.key, "problem": "; ".join(states.values())})
            return
        _damaged(archive, item, states, result)
        return
    for name in bad:
        _repair(archive, dict(sides)[name], name, item, good, states[name], result)
    if unreachable:
        result.unreachable += 1
        return
    if all(states[name] == "ok" for name in states):
        result.sound += 1
    with archive.db.session() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == item.id)
            .values(verified_at=datetime.now(UTC), integrity_error=None)
        )


def _repair(
    archive: Archive,
    backend: StorageBackend,
    name: str,
    item: _Object,
    good: bytes,
    state: str,
    result: ScrubResult,
) -> None:
    """Rewrite the ``name`` copy from ``good`` under the same key, then read it back."""
    try:
        backend.put(item.key, good)
        if not digest_matches(backend.read(item.key), item.checksum):
            raise StorageUnavailable("the rewritten copy does not match its checksum")
    except (NotFound, StorageUnavailable) as exc:
        logger.error("could not repair the %s copy of %s: %s", name, item.key, exc)
        result.problems.append({"key": item.key, "problem": f"{name} {state}, repair: {exc}"})
        storage = archive.storage
        if isinstance(storage, MirroredBackend) and storage.journal is not None:
            storage.journal.enqueue(item.key, name)  # the copier tries again later
        return
    result.repaired += 1
    result.problems.append({"key": item.key, "problem": f"{name} {state}, repaired"})
    with archive.db.session() as session:
        audit.record(
            session=session,
            actor=_SYSTEM,
            event_type=AuditEventType.OBJECT_REPAIRED,
            action=AuditAction.UPDATE,
            outcome=AuditOutcome.MINOR_FAILURE,
            object_type="instance",
            object_id=item.sop_instance_uid,
            study_instance_uid=item.study_instance_uid,
            message=f"{name} copy was {state}; rewritten from a good copy and verified",
            detail={"key": item.key, "copy": name, "state": state},
        )
    raise_alarm(
        archive.db,
        IntegrityAlarm.COPY_DAMAGED,
        Severity.WARNING,
        copy_subject(name),
        f"巡检发现 {name} 副本对象缺失或损坏，已从完好副本修复 · the scrub found objects "
        f"missing or corrupt on the {name} copy (first: {item.key}, {state}); repaired from "
        "the good copy",
    )


def _damaged(archive: Archive, item: _Object, states: dict[str, str], result: ScrubResult) -> None:
    error = "; ".join(f"{name}: {state}" for name, state in states.items())
    result.damaged += 1
    result.problems.append({"key": item.key, "problem": f"no good copy ({error})"})
    _mark_damaged(archive, item, error, source="scrub")


def _mark_damaged(archive: Archive, item: _Object, error: str, *, source: str) -> None:
    """Record an object with no good copy: the row keeps pointing at its key (a restored
    copy heals it), the critical alarm tells a human, the audit trail keeps the case."""
    logger.error("object %s has no good copy: %s", item.key, error)
    with archive.db.session() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == item.id)
            .values(verified_at=datetime.now(UTC), integrity_error=error[:256])
        )
        audit.record(
            session=session,
            actor=_SYSTEM,
            event_type=AuditEventType.OBJECT_DAMAGED,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.MAJOR_FAILURE,
            object_type="instance",
            object_id=item.sop_instance_uid,
            study_instance_uid=item.study_instance_uid,
            message=f"no good copy of the stored object ({source}): {error}",
            detail={"key": item.key, "error": error, "found_by": source},
        )
    raise_alarm(
        archive.db,
        IntegrityAlarm.OBJECT_DAMAGED,
        Severity.CRITICAL,
        INTEGRITY_SUBJECT,
        f"影像对象无完好副本，须从备份恢复 · stored objects have no good copy (first: "
        f"{item.sop_instance_uid}, {error}); restore them from a backup, see "
        "`cloudfilm storage integrity`",
    )


def last_scrub(archive: Archive) -> dict[str, Any] | None:
    """The summary of the newest scrub pass (from the audit trail), or ``None``."""
    with archive.db.read_session() as session:
        event = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event_type == AuditEventType.STORAGE_SCRUBBED.value)
            .order_by(AuditEvent.occurred_at.desc())
            .limit(1)
        ).first()
        if event is None:
            return None
        return dict(event.detail or {}) | {"occurred_at": _aware(event.occurred_at).isoformat()}


def scrub_if_due(archive: Archive) -> ScrubResult | None:
    """The daily background pass: scrub ``storage.scrub_share_per_day`` of the objects when
    the last pass (any process's) is a day old. A crash resumes with the objects it had not
    verified yet: they are still the least recently verified."""
    share = archive.settings.storage.scrub_share_per_day
    if share <= 0:
        return None
    last = last_scrub(archive)
    if last is not None:
        when = datetime.fromisoformat(str(last["occurred_at"]))
        if datetime.now(UTC) - when < timedelta(days=1):
            return None
    return scrub(archive, share=share)


# -- orphans


@dataclass(frozen=True, slots=True)
class MissingObject:
    sop_instance_uid: str
    study_instance_uid: str
    key: str


@dataclass(slots=True)
class OrphanReport:
    older_than: timedelta
    unreferenced: list[tuple[str, ObjectInfo]] = field(default_factory=list)
    """(copy, object) of stored objects no index row points to, older than the grace."""
    missing: list[MissingObject] = field(default_factory=list)
    """Index rows whose object is on no copy."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "older_than_seconds": self.older_than.total_seconds(),
            "unreferenced": [
                {"copy": c, "key": i.key, "size": i.size, "modified": i.modified.isoformat()}
                for c, i in self.unreferenced
            ],
            "missing": [asdict(m) for m in self.missing],
        }


def _referenced(archive: Archive, keys: list[str]) -> set[str]:
    """The keys an index table points to: instances, and any other table with a
    ``storage_key`` column (the recycle bin keeps the bytes of deleted instances)."""
    import cloudfilm.models as every_table

    found: set[str] = set()
    with archive.db.read_session() as session:
        for table in every_table.Base.metadata.tables.values():
            if "storage_key" in table.c:
                column = table.c.storage_key
                found.update(session.scalars(select(column).where(column.in_(keys))))
    return found


def _unreferenced(
    archive: Archive, backend: StorageBackend, older_than: timedelta
) -> Iterator[ObjectInfo]:
    cutoff = datetime.now(UTC) - older_than
    batch: list[ObjectInfo] = []

    def flush() -> list[ObjectInfo]:
        known = _referenced(archive, [i.key for i in batch])
        found = [i for i in batch if i.key not in known]
        batch.clear()
        return found

    for info in backend.iter_objects():
        if info.modified < cutoff:
            batch.append(info)
            if len(batch) >= _BATCH:
                yield from flush()
    if batch:
        yield from flush()


def find_orphans(archive: Archive, *, older_than: timedelta = timedelta(hours=1)) -> OrphanReport:
    """Bytes without rows (per copy, older than ``older_than``) and rows without bytes.

    Rows without bytes get ``integrity_error`` and a critical alarm; nothing is deleted."""
    report = OrphanReport(older_than)
    sides = copies(archive)
    listed: dict[str, set[str]] = {}
    for name, backend in sides:
        listed[name] = set()
        for info in backend.iter_objects():
            listed[name].add(info.key)
        report.unreferenced += [(name, i) for i in _unreferenced(archive, backend, older_than)]
    last_id = 0
    while True:
        with archive.db.read_session() as session:
            rows = session.execute(
                _objects_query().where(Instance.id > last_id).order_by(Instance.id).limit(_BATCH)
            ).all()
        if not rows:
            break
        last_id = rows[-1][0]
        for row in rows:
            item = _Object(*row)
            if any(item.key in keys for keys in listed.values()):
                continue
            # Not listed: written after the listing began, or really gone. Ask each copy.
            if _present_anywhere(sides, item.key):
                continue
            report.missing.append(
                MissingObject(item.sop_instance_uid, item.study_instance_uid, item.key)
            )
            _mark_damaged(archive, item, "missing on every copy", source="orphan report")
    return report


def _present_anywhere(sides: list[tuple[str, StorageBackend]], key: str) -> bool:
    for _, backend in sides:
        try:
            backend.stat(key)
            return True
        except NotFound:
            continue
        except StorageUnavailable:
            return True  # cannot tell: never report a row as lost on a device outage
    return False


def remove_orphans(archive: Archive, report: OrphanReport, *, actor: Actor = _SYSTEM) -> int:
    """Delete the report's unreferenced objects that are still unreferenced and past the
    grace period; never an index row. Audited with the keys removed."""
    sides = dict(copies(archive))
    cutoff = datetime.now(UTC) - report.older_than
    removed: list[str] = []
    for name, info in report.unreferenced:
        if info.modified >= cutoff or _referenced(archive, [info.key]):
            continue
        sides[name].delete(info.key)
        removed.append(f"{name}:{info.key}")
    if removed:
        with archive.db.session() as session:
            audit.record(
                session=session,
                actor=actor,
                event_type=AuditEventType.ORPHANS_REMOVED,
                action=AuditAction.DELETE,
                object_type="storage",
                object_id="orphans",
                message=f"removed {len(removed)} stored object(s) no index row points to",
                detail={"removed": removed[:1000], "count": len(removed)},
            )
        logger.warning("removed %d orphan storage objects", len(removed))
    return len(removed)


def integrity_status(archive: Archive, *, limit: int = 100) -> dict[str, Any]:
    """For the console: the last scrub pass, damaged objects, copies owed, fallback reads."""
    with archive.db.read_session() as session:
        damaged = session.execute(
            select(
                Instance.sop_instance_uid,
                Study.study_instance_uid,
                Instance.storage_key,
                Instance.integrity_error,
                Instance.verified_at,
            )
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Instance.integrity_error.is_not(None))
            .order_by(Instance.id)
            .limit(limit)
        ).all()
        never = int(
            session.scalar(
                select(func.count()).select_from(Instance).where(Instance.verified_at.is_(None))
            )
            or 0
        )
    storage = online_backend(archive.storage)
    mirror: dict[str, Any] | None = None
    if isinstance(storage, MirroredBackend):
        storage.attach(archive.db)
        assert storage.journal is not None
        mirror = {
            "url": _redacted(storage.mirror.url),
            "mode": storage.mode.value,
            "pending": storage.journal.counts(),
            "fallback_reads": dict(storage.fallbacks),
        }
    return {
        "checksum": archive.settings.storage.checksum.value,
        "scrub_share_per_day": archive.settings.storage.scrub_share_per_day,
        "last_scrub": last_scrub(archive),
        "never_verified": never,
        "damaged": [
            {
                "sop_instance_uid": sop,
                "study_instance_uid": study,
                "key": key,
                "error": error,
                "checked_at": _aware(at).isoformat() if at else None,
            }
            for sop, study, key, error, at in damaged
        ],
        "mirror": mirror,
    }


def _redacted(url: str) -> str:
    return url.partition("?")[0]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
