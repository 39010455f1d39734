"""Capacity monitoring: usage per backend, growth, days-until-full, alarms, the ingest guard.

Three parts with three speeds:

* :meth:`StorageMonitor.check_space` runs before every ingest write. It reads the device's
  free space (``os.statvfs`` for a file system, cached about a second) and refuses the
  write with :class:`~cloudfilm.errors.StorageFull` when it would eat into the reserve
  (``monitoring.refuse_below_*``), so the disk never fills completely.
* :meth:`StorageMonitor.run_once` is one pass of the monitor (every
  ``monitoring.interval_seconds`` in ``cloudfilm serve``, :class:`MonitorLoop`): it records a
  usage sample now and then and raises or clears alarms.
* :meth:`StorageMonitor.status` is the picture for the console, the CLI and Prometheus.

A backend tells its device's size through an optional method ``usage() -> (free, total)``
in bytes, or ``None`` when it cannot know (object storage): :class:`ReportsUsage`. Such
backends still get archive-side numbers (bytes and objects indexed, reported as used) and a
growth rate. With a quota (``monitoring.quota_bytes`` of the tier) the quota is the
capacity and the used bytes are the index's bytes on that storage: the sum of every pass
(:meth:`StorageMonitor.status`) plus what this process let through the ingest guard since,
so the guard needs no query per write.

The growth rate comes from the samples of the last ``monitoring.growth_window_days``: the
change of the device's used bytes (or of the archive's bytes where the device is unknown)
between the oldest sample in the window and now, per day. With less than an hour of
samples (a new install) it falls back to what the index says was ingested in the window
(sum of ``byte_size`` by ``created_at``), which ignores deletions but needs no history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import MonitoringSettings
from cloudfilm.db import Database
from cloudfilm.errors import NotFound, StorageFull
from cloudfilm.storage.base import StorageBackend
from cloudfilm.storage.models import Alarm, StorageSample

logger = logging.getLogger(__name__)

_CACHE_SECONDS = 1.0
_MIN_SAMPLE_SPAN = timedelta(hours=1)
_SYSTEM = Actor.system("storage-monitor")


@runtime_checkable
class ReportsUsage(Protocol):
    """A backend that can tell the size of its device."""

    def usage(self) -> tuple[int, int] | None:
        """(bytes free to us, bytes total) of the device, or ``None`` when unknown."""
        ...


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class AlarmKind(StrEnum):
    DISK_USAGE = "disk_usage"
    """The device's used share passed ``warning_percent`` or ``critical_percent``."""
    DISK_FORECAST = "disk_forecast"
    """At the current growth rate the reserve is reached within ``forecast_warning_days``."""
    STORAGE_UNREACHABLE = "storage_unreachable"
    """The device's size could not be read (unmounted, I/O error)."""


_KINDS = frozenset(k.value for k in AlarmKind)


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    capacity: int
    free: int

    @property
    def used(self) -> int:
        return max(0, self.capacity - self.free)

    @property
    def percent_used(self) -> float:
        return 100.0 * self.used / self.capacity if self.capacity else 0.0


@dataclass(frozen=True, slots=True)
class ArchiveTotals:
    """What the index holds: per storage name (bytes, objects), and the study count."""

    by_storage: Mapping[str, tuple[int, int]]
    studies: int
    ingested_since: Callable[[datetime], Mapping[str, int]] | None = None
    """Bytes ingested per storage name since a moment (growth before samples exist)."""


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    tier: str
    scheme: str
    capacity_bytes: int | None
    free_bytes: int | None
    used_bytes: int | None
    percent_used: float | None
    archive_bytes: int
    instances: int
    reserve_bytes: int | None
    quota_bytes: int | None
    """``monitoring.quota_bytes`` of the tier (the capacity of object storage)."""
    growth_bytes_per_day: float | None
    days_until_full: float | None
    """Days until free space reaches the reserve (ingest refused) at the growth rate;
    ``None`` when the size is unknown or usage is not growing."""
    accepting: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AlarmView:
    id: int
    kind: str
    severity: str
    subject: str
    message: str
    raised_at: datetime
    cleared_at: datetime | None
    acknowledged_by: str | None
    acknowledged_at: datetime | None

    @classmethod
    def of(cls, row: Alarm) -> AlarmView:
        return cls(
            row.id,
            row.kind,
            row.severity,
            row.subject,
            row.message,
            row.raised_at,
            row.cleared_at,
            row.acknowledged_by,
            row.acknowledged_at,
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("raised_at", "cleared_at", "acknowledged_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


@dataclass(slots=True)
class _Cached:
    at: float
    usage: DeviceUsage | None
    error: str | None


@dataclass(frozen=True, slots=True)
class _Condition:
    kind: AlarmKind
    severity: Severity
    message: str


@dataclass(slots=True)
class PassResult:
    """What one monitor pass found and changed."""

    statuses: list[BackendStatus]
    raised: list[AlarmView] = field(default_factory=list)
    cleared: list[AlarmView] = field(default_factory=list)


def _gib(value: float) -> str:
    if abs(value) < 1024**3:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / 1024**3:.1f} GiB"


class StorageMonitor:
    """Usage, projection and alarms of the backends of one archive."""

    def __init__(
        self,
        db: Database,
        settings: MonitoringSettings,
        backends: Mapping[str, tuple[StorageBackend, str]],
        totals: Callable[[], ArchiveTotals],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.settings = settings
        self.backends = dict(backends)
        """Storage name → (backend, tier)."""
        self.totals = totals
        self.now = now
        self._cache: dict[str, _Cached] = {}
        self._refused: dict[str, int] = {}
        """Size of the last write this process refused for lack of space, per storage name."""
        self._indexed: dict[str, int] = {}
        """Bytes the index placed on each storage at the last :meth:`status` (quota use)."""
        self._written: dict[str, int] = {}
        """Bytes this process let through :meth:`check_space` since then, per storage."""
        self._lock = threading.Lock()
        self.on_raised: list[Callable[[Session, AlarmView], object]] = []
        """Called for each alarm this monitor raises, in the transaction that records it
        (the notification outbox queues the administrators' messages here)."""

    def quota(self, name: str) -> int | None:
        """``monitoring.quota_bytes`` of storage ``name``'s tier."""
        _, tier = self.backends[name]
        return self.settings.quota_bytes.get(tier)

    def _quota_used(self, name: str) -> int:
        """The index's bytes on ``name`` (measured once when no pass ran yet) plus what this
        process wrote there since."""
        with self._lock:
            known = name in self._indexed
        if not known:
            by_storage = self.totals().by_storage
            with self._lock:
                if name not in self._indexed:
                    self._indexed[name] = by_storage.get(name, (0, 0))[0]
                    self._written[name] = 0
        with self._lock:
            return self._indexed[name] + self._written.get(name, 0)

    # -- device usage and the ingest guard

    def device_usage(self, name: str, *, max_age: float = _CACHE_SECONDS) -> DeviceUsage | None:
        """The device's size and free space (``None``: unknown), at most ``max_age`` old.

        Raises ``OSError`` when the device cannot be read."""
        cached = self._cache.get(name)
        clock = time.monotonic()
        if cached is None or clock - cached.at > max_age:
            backend, _ = self.backends[name]
            usage: DeviceUsage | None = None
            error = None
            try:
                if isinstance(backend, ReportsUsage):
                    measured = backend.usage()
                    if measured is not None:
                        usage = DeviceUsage(capacity=measured[1], free=measured[0])
            except OSError as exc:
                error = exc.strerror or str(exc)
            quota = self.quota(name)
            if quota is not None and error is None:
                free = max(0, quota - self._quota_used(name))
                if usage is None:
                    usage = DeviceUsage(capacity=quota, free=free)
                else:
                    usage = DeviceUsage(min(usage.capacity, quota), min(usage.free, free))
            cached = _Cached(clock, usage, error)
            with self._lock:
                self._cache[name] = cached
        if cached.error is not None:
            raise OSError(cached.error)
        return cached.usage

    def invalidate(self, name: str | None = None) -> None:
        """Forget cached measurements (after a write failed for lack of space)."""
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                self._cache.pop(name, None)

    def note_refusal(self, name: str, nbytes: int) -> None:
        """A write of ``nbytes`` to ``name`` failed for lack of space: measure afresh next
        time, and report the backend as refusing (:attr:`BackendStatus.accepting`) until
        such a write would fit again."""
        self.invalidate(name)
        self._refused[name] = nbytes

    def reserve(self, capacity: int) -> int:
        """Free bytes never handed to ingest on a device of ``capacity`` bytes."""
        share = int(capacity * self.settings.refuse_below_percent / 100)
        return max(self.settings.refuse_below_bytes, share)

    def check_space(self, name: str, nbytes: int) -> None:
        """Refuse a write of ``nbytes`` to storage ``name`` that would eat into the reserve.

        Raises
        ------
        StorageFull
            Not enough free space: the sender should try again later (C-STORE 0xA700,
            HTTP 507). Unknown capacity or an unreadable device are not refusals here:
            the write itself will tell.
        """
        try:
            usage = self.device_usage(name)
        except OSError:
            return
        if usage is None:
            return
        reserve = self.reserve(usage.capacity)
        if usage.free - nbytes < reserve:
            self._refused[name] = nbytes
            raise StorageFull(
                f"storage {name} is out of space: {_gib(usage.free)} free, "
                f"{_gib(reserve)} kept in reserve; free space or add storage, then resend"
            )
        self._refused.pop(name, None)
        if self.quota(name) is not None:
            with self._lock:
                self._written[name] = self._written.get(name, 0) + nbytes
            cached = self._cache.get(name)
            if cached is not None and cached.usage is not None:
                # The next write within the cache second sees this one too.
                cached.usage = DeviceUsage(cached.usage.capacity, cached.usage.free - nbytes)

    # -- status and projection

    def status(self, totals: ArchiveTotals | None = None) -> list[BackendStatus]:
        """The picture of every backend now (fresh measurements)."""
        totals = totals or self.totals()
        now = self.now()
        result = []
        with self._lock:
            for name in self.backends:
                self._indexed[name] = totals.by_storage.get(name, (0, 0))[0]
                self._written[name] = 0
        for name, (backend, tier) in self.backends.items():
            archive_bytes, instances = totals.by_storage.get(name, (0, 0))
            error = None
            try:
                usage = self.device_usage(name, max_age=0.0)
            except OSError as exc:
                usage, error = None, str(exc)
            growth = self._growth(name, usage, archive_bytes, now, totals)
            reserve = self.reserve(usage.capacity) if usage else None
            accepting = error is None
            if usage is not None and reserve is not None:
                # Refusing while the last write refused for lack of space would not fit.
                refused = self._refused.get(name, 0)
                accepting = accepting and usage.free - refused > reserve
            days = None
            if usage is not None and reserve is not None and growth and growth > 0:
                days = max(0.0, (usage.free - reserve) / growth)
            result.append(
                BackendStatus(
                    name=name,
                    tier=tier,
                    scheme=backend.url.partition(":")[0],
                    capacity_bytes=usage.capacity if usage else None,
                    free_bytes=usage.free if usage else None,
                    # Object storage without a quota: what the index placed there.
                    used_bytes=usage.used if usage else None if error else archive_bytes,
                    percent_used=round(usage.percent_used, 2) if usage else None,
                    archive_bytes=archive_bytes,
                    instances=instances,
                    reserve_bytes=reserve,
                    quota_bytes=self.quota(name),
                    growth_bytes_per_day=growth,
                    days_until_full=round(days, 1) if days is not None else None,
                    accepting=accepting,
                    error=error,
                )
            )
        return result

    def _growth(
        self,
        name: str,
        usage: DeviceUsage | None,
        archive_bytes: int,
        now: datetime,
        totals: ArchiveTotals,
    ) -> float | None:
        since = now - timedelta(days=self.settings.growth_window_days)
        with self.db.read_session() as session:
            oldest = session.scalars(
                select(StorageSample)
                .where(StorageSample.backend == name, StorageSample.sampled_at >= since)
                .order_by(StorageSample.sampled_at)
                .limit(1)
            ).first()
        if oldest is not None:
            sampled_at = _aware(oldest.sampled_at)
            span = now - sampled_at
            if span >= _MIN_SAMPLE_SPAN:
                days = span.total_seconds() / 86400
                if usage is not None and oldest.capacity_bytes and oldest.free_bytes is not None:
                    before = oldest.capacity_bytes - oldest.free_bytes
                    return (usage.used - before) / days
                return (archive_bytes - oldest.archive_bytes) / days
        if totals.ingested_since is None:
            return None
        ingested = totals.ingested_since(since).get(name, 0)
        return ingested / self.settings.growth_window_days

    # -- one pass: sample, evaluate, raise and clear alarms

    def run_once(self) -> PassResult:
        """Measure every backend, record a sample when due, raise and clear alarms."""
        totals = self.totals()
        statuses = self.status(totals)
        now = self.now()
        self._sample(statuses, now)
        result = PassResult(statuses)
        for status in statuses:
            wanted = self._conditions(status)
            self._reconcile(status.name, wanted, now, result)
        return result

    def _sample(self, statuses: list[BackendStatus], now: datetime) -> None:
        due = now - timedelta(seconds=self.settings.sample_every_seconds)
        with self.db.session() as session:
            for status in statuses:
                last = session.scalar(
                    select(func.max(StorageSample.sampled_at)).where(
                        StorageSample.backend == status.name
                    )
                )
                if last is not None and _aware(last) > due:
                    continue
                session.add(
                    StorageSample(
                        backend=status.name,
                        sampled_at=now,
                        capacity_bytes=status.capacity_bytes,
                        free_bytes=status.free_bytes,
                        archive_bytes=status.archive_bytes,
                        instances=status.instances,
                    )
                )
            cutoff = now - timedelta(days=self.settings.sample_retention_days)
            session.execute(delete(StorageSample).where(StorageSample.sampled_at < cutoff))

    def _conditions(self, status: BackendStatus) -> dict[AlarmKind, _Condition]:
        """The conditions that hold now; with hysteresis for those already active."""
        s = self.settings
        active = {a.kind: a for a in self.active_alarms() if a.subject == status.name}
        found: dict[AlarmKind, _Condition] = {}
        name = status.name
        if status.error is not None:
            found[AlarmKind.STORAGE_UNREACHABLE] = _Condition(
                AlarmKind.STORAGE_UNREACHABLE,
                Severity.CRITICAL,
                f"存储 {name} 无法读取容量：{status.error} · "
                f"storage {name} cannot be measured: {status.error}",
            )
        percent = status.percent_used
        if percent is not None:
            # Hysteresis: an active alarm holds until usage is a margin below its threshold.
            current = active.get(AlarmKind.DISK_USAGE)
            held = current.severity if current is not None else None
            margin = s.clear_margin_percent
            critical_at = s.critical_percent - (margin if held == Severity.CRITICAL else 0.0)
            warning_at = s.warning_percent - (margin if held is not None else 0.0)
            severity: Severity | None = None
            if percent >= critical_at or not status.accepting:
                severity, threshold = Severity.CRITICAL, s.critical_percent
            elif percent >= warning_at:
                severity, threshold = Severity.WARNING, s.warning_percent
            if severity is not None:
                refused = "" if status.accepting else "；已拒收新影像 · ingest refused"
                found[AlarmKind.DISK_USAGE] = _Condition(
                    AlarmKind.DISK_USAGE,
                    severity,
                    f"存储 {name} 已用 {percent:.1f}%（阈值 {threshold:g}%）{refused} · "
                    f"storage {name} is {percent:.1f}% full (threshold {threshold:g}%), "
                    f"{_gib(status.free_bytes or 0)} free",
                )
        days = status.days_until_full
        if days is not None and s.forecast_warning_days > 0 and days < s.forecast_warning_days:
            found[AlarmKind.DISK_FORECAST] = _Condition(
                AlarmKind.DISK_FORECAST,
                Severity.WARNING,
                f"存储 {name} 预计 {days:.0f} 天后写满 · storage {name} will be full in about "
                f"{days:.0f} days at {_gib(status.growth_bytes_per_day or 0)} per day",
            )
        return found

    def _reconcile(
        self,
        subject: str,
        wanted: dict[AlarmKind, _Condition],
        now: datetime,
        result: PassResult,
    ) -> None:
        """Raise what is wanted and not active, clear what is active and not wanted; a
        change of severity clears the old alarm and raises a new one."""
        with self.db.session() as session:
            active = {
                a.kind: a
                for a in session.scalars(
                    select(Alarm).where(Alarm.subject == subject, Alarm.cleared_at.is_(None))
                )
            }
            for kind, alarm in active.items():
                condition = wanted.get(AlarmKind(kind)) if kind in _KINDS else None
                if condition is None or condition.severity != alarm.severity:
                    alarm.cleared_at = now
                    session.flush()
                    result.cleared.append(AlarmView.of(alarm))
                    _audit(session, AuditEventType.ALARM_CLEARED, alarm, _SYSTEM)
            session.flush()
            for kind, condition in wanted.items():
                current = active.get(kind.value)
                if current is not None and current.cleared_at is None:
                    continue
                alarm = Alarm(
                    kind=kind.value,
                    severity=condition.severity.value,
                    subject=subject,
                    message=condition.message[:512],
                    raised_at=now,
                )
                try:
                    with session.begin_nested():
                        session.add(alarm)
                        session.flush()
                except IntegrityError:
                    # Another monitor process raised it first: once per condition.
                    continue
                view = AlarmView.of(alarm)
                result.raised.append(view)
                _audit(session, AuditEventType.ALARM_RAISED, alarm, _SYSTEM)
                for hook in self.on_raised:
                    try:
                        with session.begin_nested():
                            hook(session, view)
                    except Exception:
                        # The alarm stands even when its notification cannot be queued.
                        logger.exception("alarm hook failed")
        for view in result.raised:
            if view.subject == subject:
                log = logger.error if view.severity == Severity.CRITICAL else logger.warning
                log("alarm raised: %s", view.message)
        for view in result.cleared:
            if view.subject == subject:
                logger.info("alarm cleared: %s", view.message)

    # -- alarms for the console

    def active_alarms(self) -> list[AlarmView]:
        with self.db.read_session() as session:
            rows = session.scalars(
                select(Alarm).where(Alarm.cleared_at.is_(None)).order_by(Alarm.raised_at)
            )
            return [AlarmView.of(r) for r in rows]

    def recent_alarms(self, limit: int = 50) -> list[AlarmView]:
        with self.db.read_session() as session:
            rows = session.scalars(select(Alarm).order_by(Alarm.id.desc()).limit(limit))
            return [AlarmView.of(r) for r in rows]

    def acknowledge(self, alarm_id: int, actor: Actor) -> AlarmView:
        """Record that an administrator has seen the alarm (audited); ``NotFound`` if absent."""
        with self.db.session() as session:
            alarm = session.get(Alarm, alarm_id, with_for_update=True)
            if alarm is None:
                raise NotFound(f"告警 {alarm_id} 不存在 · no alarm {alarm_id}")
            if alarm.acknowledged_at is None:
                alarm.acknowledged_by = actor.id[:64]
                alarm.acknowledged_at = self.now()
                session.flush()
                _audit(session, AuditEventType.ALARM_ACKNOWLEDGED, alarm, actor)
            return AlarmView.of(alarm)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _audit(session: Session, event_type: AuditEventType, alarm: Alarm, actor: Actor) -> None:
    audit.record(
        session=session,
        actor=actor,
        event_type=event_type,
        action=AuditAction.UPDATE
        if event_type is AuditEventType.ALARM_ACKNOWLEDGED
        else AuditAction.EXECUTE,
        outcome=AuditOutcome.SUCCESS
        if event_type is not AuditEventType.ALARM_RAISED
        else AuditOutcome.MINOR_FAILURE
        if alarm.severity == Severity.WARNING
        else AuditOutcome.SERIOUS_FAILURE,
        object_type="alarm",
        object_id=str(alarm.id),
        message=alarm.message,
        detail={"kind": alarm.kind, "severity": alarm.severity, "subject": alarm.subject},
    )


class MonitorLoop:
    """:meth:`StorageMonitor.run_once` every ``interval`` seconds in a daemon thread."""

    def __init__(self, monitor: StorageMonitor, interval: float | None = None) -> None:
        self.monitor = monitor
        self.interval = interval if interval is not None else monitor.settings.interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="storage-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.monitor.run_once()
            except Exception:
                # One failed pass (database briefly down) must not end monitoring.
                logger.exception("storage monitor pass failed")
            if self._stop.wait(self.interval):
                return
