"""Storage monitoring over HTTP: status and alarms for the console (``/api/storage``) and
Prometheus metrics (``/metrics``, text exposition format).

The metrics are read when scraped (a custom collector), not kept in process-global
counters: with several ``cloudfilm serve`` processes every scrape sees the same numbers,
the ones the database and the devices hold. Ingest counters come from the audit trail
(one indexed, grouped count), so they count every process's work; they drop when
``cloudfilm audit purge`` removes old records, which Prometheus treats as a counter
reset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from cloudfilm.audit.enums import AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.storage.monitor import Severity, StorageMonitor

router = APIRouter(tags=["storage"])
Viewer = Annotated[Principal, Depends(Permit(Permission.ARCHIVE_STATS))]
Manager = Annotated[Principal, Depends(Permit(Permission.STORAGE_MANAGE))]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "not signed in"},
    403: {"description": "not permitted"},
}

#: Audit event type → ``outcome`` label of ``cloudfilm_ingest_total``.
INGEST_OUTCOMES = {
    AuditEventType.INSTANCE_STORED: "stored",
    AuditEventType.INSTANCE_REPLACED: "replaced",
    AuditEventType.INSTANCE_DUPLICATE: "duplicate",
    AuditEventType.INSTANCE_REJECTED: "rejected",
    AuditEventType.INSTANCE_REFUSED: "refused_out_of_space",
}


def monitor_of(request: Request) -> StorageMonitor:
    monitor: StorageMonitor = request.app.state.storage_monitor
    return monitor


@router.get(
    "/api/storage/status",
    summary="Capacity, usage, growth, days until full and active alarms per backend",
    responses=_ERRORS,
)
def storage_status(request: Request, _caller: Viewer) -> JSONResponse:
    monitor = monitor_of(request)
    return JSONResponse(
        {
            "backends": [s.as_dict() for s in monitor.status()],
            "thresholds": {
                "warning_percent": monitor.settings.warning_percent,
                "critical_percent": monitor.settings.critical_percent,
                "refuse_below_bytes": monitor.settings.refuse_below_bytes,
                "refuse_below_percent": monitor.settings.refuse_below_percent,
            },
            "alarms": [a.as_dict() for a in monitor.active_alarms()],
        }
    )


@router.get(
    "/api/storage/alarms",
    summary="Recent alarms, active and cleared, newest first",
    responses=_ERRORS,
)
def storage_alarms(request: Request, _caller: Viewer) -> JSONResponse:
    return JSONResponse({"alarms": [a.as_dict() for a in monitor_of(request).recent_alarms()]})


@router.post(
    "/api/storage/alarms/{alarm_id}/acknowledge",
    summary="Acknowledge an alarm (system administrator); audited",
    responses={**_ERRORS, 404: {"description": "no such alarm"}},
)
def acknowledge_alarm(alarm_id: int, request: Request, _caller: Manager) -> JSONResponse:
    view = monitor_of(request).acknowledge(alarm_id, request.state.actor)
    return JSONResponse(view.as_dict())


@router.get(
    "/metrics",
    summary="Prometheus metrics: storage, archive, alarms, ingest (text format)",
    responses=_ERRORS,
)
async def metrics(request: Request, _caller: Viewer) -> Response:
    monitor = monitor_of(request)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StorageCollector(monitor))
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class StorageCollector(Collector):
    """Current values from the devices and the database, read at each scrape."""

    def __init__(self, monitor: StorageMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        totals = self.monitor.totals()
        statuses = self.monitor.status(totals)
        labels = ["backend", "tier"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        families = {
            "capacity": gauge("cloudfilm_storage_capacity_bytes", "Size of the storage device."),
            "free": gauge("cloudfilm_storage_free_bytes", "Free bytes on the storage device."),
            "used": gauge("cloudfilm_storage_used_bytes", "Used bytes on the storage device."),
            "reserve": gauge(
                "cloudfilm_storage_reserve_bytes", "Free bytes kept back: ingest stops here."
            ),
            "growth": gauge(
                "cloudfilm_storage_growth_bytes_per_day", "Growth of used bytes per day."
            ),
            "days": gauge(
                "cloudfilm_storage_days_until_full", "Days until the reserve is reached."
            ),
            "accepting": gauge(
                "cloudfilm_storage_accepting", "1 while ingest is accepted, 0 when refused."
            ),
            "quota": gauge(
                "cloudfilm_storage_quota_bytes",
                "Configured quota of the tier (monitoring.quota_bytes; object storage's capacity).",
            ),
            "archive": gauge("cloudfilm_archive_bytes", "Bytes of the indexed objects."),
            "instances": gauge("cloudfilm_archive_instances", "Indexed instances."),
        }
        for s in statuses:
            key = [s.name, s.tier]
            values: dict[str, float | int | None] = {
                "capacity": s.capacity_bytes,
                "free": s.free_bytes,
                "used": s.used_bytes,
                "reserve": s.reserve_bytes,
                "growth": s.growth_bytes_per_day,
                "days": s.days_until_full,
                "accepting": int(s.accepting),
                "quota": s.quota_bytes,
                "archive": s.archive_bytes,
                "instances": s.instances,
            }
            for name, value in values.items():
                if value is not None:  # unknown (object storage): no sample, not a zero
                    families[name].add_metric(key, float(value))
        yield from families.values()

        studies = GaugeMetricFamily("cloudfilm_archive_studies", "Indexed studies.")
        studies.add_metric([], float(totals.studies))
        yield studies

        alarms = GaugeMetricFamily(
            "cloudfilm_alarms_active", "Active monitoring alarms.", labels=["severity"]
        )
        active = self.monitor.active_alarms()
        for severity in Severity:
            count = sum(1 for a in active if a.severity == severity)
            alarms.add_metric([severity.value], float(count))
        yield alarms

        ingest = CounterMetricFamily(
            "cloudfilm_ingest", "Objects received by outcome (all processes).", labels=["outcome"]
        )
        with self.monitor.db.read_session() as session:
            counted = dict(
                session.execute(
                    select(AuditEvent.event_type, func.count())
                    .where(AuditEvent.event_type.in_([e.value for e in INGEST_OUTCOMES]))
                    .group_by(AuditEvent.event_type)
                ).all()
            )
        for event_type, outcome in INGEST_OUTCOMES.items():
            ingest.add_metric([outcome], float(counted.get(event_type.value, 0)))
        yield ingest
