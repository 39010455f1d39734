"""Mirrored storage: every object on two backends, reads that survive the loss of one copy.

:class:`MirroredBackend` wraps a primary and a mirror backend behind the same
:class:`~cloudfilm.storage.base.StorageBackend` interface, so the archive does not know it
is mirrored (after Orthanc's ``StorageAccessor``: wrappers, not backend features).

* ``sync`` mode: :meth:`~MirroredBackend.put` returns only when both backends hold the bytes.
  When the mirror write fails the put fails, so the sender is never told "stored" while
  one copy exists; the primary's copy is left for the orphan sweep (it has no index row),
  never deleted here: the key could be an existing object's.
* ``async`` mode: :meth:`~MirroredBackend.put` first records the owed copy in the
  ``mirror_pending`` table (committed), then writes the primary. The intent is durable
  before the ingest is acknowledged, and a crash at any point leaves either a pending row
  that the copier finishes, or one whose object never arrived, which it drops.
* Reads try the primary and fall back to the mirror when the primary's copy is missing or
  unreadable; each fallback is logged and counted, a ``copy_damaged`` alarm is raised once,
  and a repair of the primary's copy is queued.
* :class:`MirrorSync` is the copier and repair job: it works through ``mirror_pending``
  (copy from the other side, verify the copy by reading it back, then drop the row), with
  back-off for failures. It runs in ``cloudfilm serve`` (:class:`PeriodicLoop`) and in
  ``cloudfilm storage mirror-sync``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, TypeVar

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from cloudfilm.config import MirrorMode
from cloudfilm.db import Database
from cloudfilm.errors import NotFound, StorageUnavailable
from cloudfilm.storage.alarms import IntegrityAlarm, clear_alarm, copy_subject, raise_alarm
from cloudfilm.storage.base import ObjectInfo, StorageBackend
from cloudfilm.storage.models import MirrorPending
from cloudfilm.storage.monitor import ReportsUsage, Severity

logger = logging.getLogger(__name__)

PRIMARY = "primary"
MIRROR = "mirror"
SIDES = (PRIMARY, MIRROR)

_T = TypeVar("_T")
_MAX_BACKOFF = timedelta(minutes=10)
_BEHIND_AFTER_ATTEMPTS = 3
_RECENT_REPAIRS = 10_000


def other_side(side: str) -> str:
    return MIRROR if side == PRIMARY else PRIMARY


def digest_matches(data: bytes, recorded: str) -> bool:
    """``data`` hashes to ``recorded`` (``algorithm:hexdigest``, e.g. ``sm3:…``)."""
    algorithm, _, expected = recorded.partition(":")
    return hashlib.new(algorithm, data).hexdigest() == expected


@dataclass(frozen=True, slots=True)
class PendingCopy:
    key: str
    target: str
    enqueued_at: datetime
    attempts: int
    last_error: str | None


class MirrorJournal:
    """The ``mirror_pending`` table: copies owed to one side, durable across crashes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def enqueue(self, key: str, target: str) -> None:
        """Record that ``target`` lacks ``key`` (committed on return); idempotent."""
        now = datetime.now(UTC)
        try:
            with self.db.session() as session:
                exists = session.get(MirrorPending, (key, target))
                if exists is None:
                    session.add(
                        MirrorPending(
                            key=key,
                            target=target,
                            enqueued_at=now,
                            next_attempt_at=now,
                            attempts=0,
                        )
                    )
                else:
                    exists.next_attempt_at = now
        except IntegrityError:
            pass  # enqueued by another process at the same moment

    def discard(self, key: str) -> None:
        with self.db.session() as session:
            session.execute(delete(MirrorPending).where(MirrorPending.key == key))

    def done(self, key: str, target: str) -> None:
        with self.db.session() as session:
            session.execute(
                delete(MirrorPending).where(
                    MirrorPending.key == key, MirrorPending.target == target
                )
            )

    def failed(self, key: str, target: str, error: str, attempts: int) -> None:
        delay = min(_MAX_BACKOFF, timedelta(seconds=2 ** min(attempts, 20)))
        with self.db.session() as session:
            session.execute(
                update(MirrorPending)
                .where(MirrorPending.key == key, MirrorPending.target == target)
                .values(
                    attempts=attempts,
                    last_error=error[:512],
                    next_attempt_at=datetime.now(UTC) + delay,
                )
            )

    def due(self, limit: int, *, now: datetime | None = None) -> list[PendingCopy]:
        now = now or datetime.now(UTC)
        with self.db.read_session() as session:
            rows = session.scalars(
                select(MirrorPending)
                .where(MirrorPending.next_attempt_at <= now)
                .order_by(MirrorPending.next_attempt_at)
                .limit(limit)
            )
            return [
                PendingCopy(r.key, r.target, r.enqueued_at, r.attempts, r.last_error) for r in rows
            ]

    def counts(self) -> dict[str, dict[str, object]]:
        """Per target side: pending copies, the oldest, how many are failing."""
        with self.db.read_session() as session:
            rows = session.execute(
                select(
                    MirrorPending.target,
                    func.count(),
                    func.min(MirrorPending.enqueued_at),
                    func.sum(case((MirrorPending.attempts > 0, 1), else_=0)),
                ).group_by(MirrorPending.target)
            ).all()
        result: dict[str, dict[str, object]] = {}
        for target, count, oldest, failing in rows:
            result[str(target)] = {
                "pending": int(count),
                "oldest": _aware(oldest).isoformat() if oldest is not None else None,
                "failing": int(failing or 0),
            }
        return result

    def pending(self, target: str) -> int:
        with self.db.read_session() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(MirrorPending)
                    .where(MirrorPending.target == target)
                )
                or 0
            )

    def stuck(self, target: str) -> int:
        with self.db.read_session() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(MirrorPending)
                    .where(
                        MirrorPending.target == target,
                        MirrorPending.attempts >= _BEHIND_AFTER_ATTEMPTS,
                    )
                )
                or 0
            )


class MirroredBackend:
    """Two backends that hold the same objects; see the module docstring."""

    def __init__(
        self,
        primary: StorageBackend,
        mirror: StorageBackend,
        *,
        mode: MirrorMode = MirrorMode.SYNC,
        journal: MirrorJournal | None = None,
    ) -> None:
        self.primary = primary
        self.mirror = mirror
        self.mode = mode
        self.url = primary.url
        self.journal = journal
        self.fallbacks: dict[str, int] = {PRIMARY: 0, MIRROR: 0}
        """Reads served by the other copy since this process started, per failing side."""
        self._alarmed: set[str] = set()
        self._repairs: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None

    def attach(self, db: Database) -> None:
        """Give the backend the database that holds the copy journal and the alarms."""
        if self.journal is None:
            self.journal = MirrorJournal(db)

    def on_enqueue(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after a copy is queued (the copier loop starts at once)."""
        self._wake = wake

    def side(self, name: str) -> StorageBackend:
        return self.primary if name == PRIMARY else self.mirror

    def sides(self) -> list[tuple[str, StorageBackend]]:
        return [(PRIMARY, self.primary), (MIRROR, self.mirror)]

    # -- writes

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        if self.mode is MirrorMode.ASYNC:
            if self.journal is None:
                raise StorageUnavailable(
                    "the asynchronous mirror has no copy journal (database); set "
                    "storage.mirror_mode to sync or open the storage with the archive"
                )
            # Durable intent first: once the primary holds the bytes a copy is owed.
            self.journal.enqueue(key, MIRROR)
            self.primary.put(key, data)
            if self._wake is not None:
                self._wake()
            return
        if not isinstance(data, bytes | bytearray | memoryview):
            data = data.read()
        self.primary.put(key, data)
        try:
            self.mirror.put(key, data)
        except StorageUnavailable as exc:
            # Not acknowledged with one copy. The primary's copy stays (no index row yet:
            # the orphan sweep removes it); deleting it here could delete an object that
            # a repair just rewrote under its own key.
            logger.error("mirror write failed, ingest refused: %s", exc)
            raise type(exc)(
                f"镜像存储写入失败 · the mirror copy could not be written ({exc}); "
                "nothing was stored, send again when the mirror is back"
            ) from exc

    def delete(self, key: str) -> None:
        self.primary.delete(key)
        try:
            self.mirror.delete(key)
        except StorageUnavailable as exc:
            # The mirror's copy becomes an orphan for `cloudfilm storage orphans`.
            logger.warning("could not delete %s from the mirror: %s", key, exc)
        if self.journal is not None:
            self.journal.discard(key)

    # -- reads, with fallback

    def _read(self, key: str, op: Callable[[StorageBackend], _T]) -> _T:
        try:
            return op(self.primary)
        except (NotFound, StorageUnavailable) as primary_error:
            try:
                value = op(self.mirror)
            except (NotFound, StorageUnavailable):
                raise primary_error from None
            self._fell_back(key, PRIMARY, primary_error)
            return value

    def _fell_back(self, key: str, side: str, error: Exception) -> None:
        with self._lock:
            self.fallbacks[side] += 1
            first = side not in self._alarmed
            self._alarmed.add(side)
            queue = (key, side) not in self._repairs
            if queue:
                if len(self._repairs) >= _RECENT_REPAIRS:
                    self._repairs.clear()
                self._repairs.add((key, side))
        logger.warning(
            "%s copy of %s unreadable (%s); served from the other copy", side, key, error
        )
        if self.journal is None:
            return
        try:
            if queue:
                self.journal.enqueue(key, side)
                if self._wake is not None:
                    self._wake()
            if first:
                raise_alarm(
                    self.journal.db,
                    IntegrityAlarm.COPY_DAMAGED,
                    Severity.WARNING,
                    copy_subject(side),
                    f"存储副本 {side} 缺失或无法读取对象，已从另一副本读取并排队修复 · "
                    f"objects missing or unreadable on the {side} copy (first: {key}: {error}); "
                    "served from the other copy, repair queued",
                )
        except Exception:
            # The read itself succeeded; bookkeeping must not turn it into a failure.
            logger.exception("could not record the fallback read of %s", key)

    def forget_alarm(self, side: str) -> None:
        with self._lock:
            self._alarmed.discard(side)
            self._repairs = {r for r in self._repairs if r[1] != side}

    def open(self, key: str) -> BinaryIO:
        return self._read(key, lambda b: b.open(key))

    def read(self, key: str) -> bytes:
        return self._read(key, lambda b: b.read(key))

    def open_range(self, key: str, start: int, end: int) -> bytes:
        return self._read(key, lambda b: b.open_range(key, start, end))

    def stat(self, key: str) -> ObjectInfo:
        return self._read(key, lambda b: b.stat(key))

    def iter_objects(self) -> Iterator[ObjectInfo]:
        """The primary's objects (the orphan report lists each side on its own)."""
        return self.primary.iter_objects()

    def sweep_temporary(self, max_age_seconds: float) -> int:
        removed = self.primary.sweep_temporary(max_age_seconds)
        try:
            removed += self.mirror.sweep_temporary(max_age_seconds)
        except StorageUnavailable as exc:
            logger.warning("could not sweep the mirror's temporary uploads: %s", exc)
        return removed

    def usage(self) -> tuple[int, int] | None:
        """The primary device's (free, total): ingest is refused by the primary's space."""
        if isinstance(self.primary, ReportsUsage):
            return self.primary.usage()
        return None


@dataclass(slots=True)
class SyncResult:
    copied: int = 0
    already_present: int = 0
    dropped: int = 0
    """Rows whose object exists on neither side (an ingest that crashed before writing,
    or an object deleted since): nothing to copy."""
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "copied": self.copied,
            "already_present": self.already_present,
            "dropped": self.dropped,
            "failed": self.failed,
        }


class MirrorSync:
    """The copier and repair job of a :class:`MirroredBackend`.

    ``expected_checksum(key)`` (given by the archive, which owns the index) returns the
    recorded ``algorithm:hex`` of the object or ``None``: a source copy that does not match
    is never spread to the other side (the scrub decides which copy is good).
    """

    def __init__(
        self,
        backend: MirroredBackend,
        journal: MirrorJournal,
        expected_checksum: Callable[[str], str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.journal = journal
        self.expected_checksum = expected_checksum

    def run_once(self, limit: int = 500) -> SyncResult:
        result = SyncResult()
        for item in self.journal.due(limit):
            try:
                self._copy(item, result)
            except Exception as exc:
                # One bad object must not stop the batch (STYLE §12).
                logger.exception("mirror copy of %s to %s failed", item.key, item.target)
                result.failed += 1
                result.errors.append(f"{item.key} → {item.target}: {exc}")
                self.journal.failed(item.key, item.target, str(exc), item.attempts + 1)
        self._alarms()
        return result

    def run_until_empty(self, limit: int = 500) -> SyncResult:
        """Passes until nothing is due (a failing copy waits for its back-off)."""
        total = SyncResult()
        while True:
            result = self.run_once(limit)
            total.copied += result.copied
            total.already_present += result.already_present
            total.dropped += result.dropped
            total.failed += result.failed
            total.errors += result.errors
            if result.copied + result.already_present + result.dropped == 0:
                return total

    def _copy(self, item: PendingCopy, result: SyncResult) -> None:
        source = self.backend.side(other_side(item.target))
        target = self.backend.side(item.target)
        try:
            data = source.read(item.key)
        except NotFound:
            try:
                target.stat(item.key)
                result.already_present += 1
            except NotFound:
                logger.warning(
                    "%s: on neither copy; nothing to copy (crashed ingest or deleted)", item.key
                )
                result.dropped += 1
            self.journal.done(item.key, item.target)
            return
        expected = self.expected_checksum(item.key) if self.expected_checksum else None
        if expected and not digest_matches(data, expected):
            raise StorageUnavailable(
                f"the {other_side(item.target)} copy does not match its checksum; not copied "
                "(run `cloudfilm storage scrub` to repair from a good copy)"
            )
        try:
            present = target.read(item.key)
        except NotFound:
            present = None
        if present == data:
            result.already_present += 1
            self.journal.done(item.key, item.target)
            return
        if present is not None and item.target == PRIMARY and not expected:
            # Two different copies and no checksum to tell which is right: keep both.
            raise StorageUnavailable("the copies differ and no checksum is recorded")
        target.put(item.key, data)
        if target.read(item.key) != data:
            raise StorageUnavailable(f"the {item.target} copy read back differs")
        self.journal.done(item.key, item.target)
        result.copied += 1

    def _alarms(self) -> None:
        for side in SIDES:
            subject = copy_subject(side)
            if self.journal.pending(side) == 0:
                clear_alarm(self.journal.db, IntegrityAlarm.COPY_DAMAGED, subject)
                clear_alarm(self.journal.db, IntegrityAlarm.MIRROR_BEHIND, subject)
                self.backend.forget_alarm(side)
            elif stuck := self.journal.stuck(side):
                raise_alarm(
                    self.journal.db,
                    IntegrityAlarm.MIRROR_BEHIND,
                    Severity.WARNING,
                    subject,
                    f"{stuck} 个对象无法复制到 {side} 副本 · {stuck} object(s) could not be "
                    f"copied to the {side} copy after {_BEHIND_AFTER_ATTEMPTS} attempts; "
                    "check that storage (cloudfilm storage integrity)",
                )


class PeriodicLoop:
    """``step()`` every ``interval`` seconds in a daemon thread; :meth:`wake` runs it now."""

    def __init__(self, name: str, step: Callable[[], object], interval: float) -> None:
        self.name = name
        self.step = step
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                logger.exception("%s pass failed", self.name)
            self._wake.wait(self.interval)
            self._wake.clear()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
