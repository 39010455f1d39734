"""Deleting studies, series and instances, with a recycle bin.

A deletion takes the objects out of the index at once — searches, retrieves, counts and
DICOM queries no longer see them — and keeps their bytes, listed in ``deleted_instance``,
until the deletion is due (``retention.recycle_days`` by default). Until then it can be
restored: the kept bytes go through the normal ingest pipeline again, so the index is
rebuilt exactly as a new arrival would build it. Due deletions are purged by
:func:`purge_due` (``cloudfilm storage purge``, and the server's upkeep loop): the bytes
are removed, then the deletion is marked purged; a crash in between repeats a harmless
delete. Every request, restore and purge is audited with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    ForeignKey,
    Integer,
    String,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.audit.service import Actor
from cloudfilm.config import RetentionRule
from cloudfilm.db import Base
from cloudfilm.errors import Conflict, NotFound

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

_ID = BigInteger().with_variant(Integer, "sqlite")


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class State(StrEnum):
    PENDING = "pending"
    """Out of the index, bytes kept: can be restored until ``due_at``."""
    PURGED = "purged"
    RESTORED = "restored"


class Deletion(Base):
    __tablename__ = "deletion"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    level: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(String(500))
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    instances: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeletedInstance(Base):
    """The bytes of one deleted instance, kept until its deletion is purged or restored."""

    __tablename__ = "deleted_instance"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    deletion_id: Mapped[int] = mapped_column(
        ForeignKey("deletion.id", ondelete="CASCADE"), index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    storage_name: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    checksum: Mapped[str] = mapped_column(String(80))
    byte_size: Mapped[int] = mapped_column(BigInteger)


@dataclass(frozen=True, slots=True)
class Target:
    """What to delete: a study, or a series or instance within it."""

    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> Level:
        return Level.INSTANCE if self.instance else Level.SERIES if self.series else Level.STUDY


def request_deletion(
    *,
    session: Session,
    target: Target,
    reason: str,
    actor: Actor,
    now: datetime,
    delay: timedelta,
    scope: ColumnElement[bool] | None = None,
) -> Deletion:
    """Take ``target`` out of the index now; keep its bytes until ``now + delay``.

    ``scope`` is the caller's data scope (a condition on :class:`Study`): what lies
    outside it is not found. Raises :class:`NotFound` when nothing matches.
    """
    reason = " ".join(reason.split())
    if len(reason) < 2:
        raise Conflict("请说明删除原因 · give the reason for the deletion")
    stmt = (
        select(
            Instance.id,
            Instance.sop_instance_uid,
            Instance.storage_name,
            Instance.storage_key,
            Instance.checksum,
            Instance.byte_size,
            Instance.series_pk,
            Series.study_pk,
            Study.patient_pk,
            Patient.patient_id,
        )
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == target.study)
    )
    if target.series:
        stmt = stmt.where(Series.series_instance_uid == target.series)
    if target.instance:
        stmt = stmt.where(Instance.sop_instance_uid == target.instance)
    if scope is not None:
        stmt = stmt.where(scope)
    # Lock the study first, like ingest does, so counters change in one order.
    session.execute(
        select(Study.id).where(Study.study_instance_uid == target.study).with_for_update()
    )
    rows = session.execute(stmt).all()
    if not rows:
        raise NotFound(f"没有可删除的对象 · nothing to delete at {target.level.value} level")
    deletion = Deletion(
        level=target.level.value,
        study_instance_uid=target.study,
        series_instance_uid=target.series,
        sop_instance_uid=target.instance,
        patient_id=rows[0].patient_id,
        reason=reason[:500],
        requested_by=actor.id[:128],
        requested_at=now,
        due_at=now + delay,
        state=State.PENDING.value,
        instances=len(rows),
        bytes=sum(r.byte_size for r in rows),
    )
    session.add(deletion)
    session.flush()
    session.add_all(
        DeletedInstance(
            deletion_id=deletion.id,
            sop_instance_uid=r.sop_instance_uid,
            storage_name=r.storage_name,
            storage_key=r.storage_key,
            checksum=r.checksum,
            byte_size=r.byte_size,
        )
        for r in rows
    )
    ids = [r.id for r in rows]
    session.execute(delete(InstanceMetadata).where(InstanceMetadata.instance_pk.in_(ids)))
    session.execute(delete(Instance).where(Instance.id.in_(ids)))
    recount(
        session,
        series={r.series_pk for r in rows},
        studies={r.study_pk for r in rows},
        patients={r.patient_pk for r in rows},
        now=now,
    )
    audit.record(
        session=session,
        actor=actor,
        event_type=AuditEventType.INSTANCES_DELETED,
        action=AuditAction.DELETE,
        object_type=target.level.value,
        object_id=target.instance or target.series or target.study,
        patient_id=deletion.patient_id,
        study_instance_uid=target.study,
        message=deletion.reason,
        detail={
            "deletion": deletion.id,
            "instances": deletion.instances,
            "bytes": deletion.bytes,
            "due_at": deletion.due_at.isoformat(),
        },
    )
    return deletion


def recount(
    session: Session,
    *,
    series: Iterable[int],
    studies: Iterable[int],
    patients: Iterable[int],
    now: datetime,
) -> None:
    """Recompute the counters of ``series`` and ``studies`` from their instances; remove
    series, studies and patients left empty."""
    for series_pk in series:
        count, size, original = session.execute(
            select(
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.byte_size), 0),
                func.coalesce(func.sum(Instance.original_bytes), 0),
            ).where(Instance.series_pk == series_pk)
        ).one()
        if count == 0:
            session.execute(delete(Series).where(Series.id == series_pk))
        else:
            session.execute(
                update(Series)
                .where(Series.id == series_pk)
                .values(
                    number_of_instances=count,
                    total_bytes=size,
                    original_total_bytes=original,
                    updated_at=now,
                )
            )
    for study_pk in studies:
        count, size, original, n_series = session.execute(
            select(
                func.coalesce(func.sum(Series.number_of_instances), 0),
                func.coalesce(func.sum(Series.total_bytes), 0),
                func.coalesce(func.sum(Series.original_total_bytes), 0),
                func.count(Series.id),
            ).where(Series.study_pk == study_pk, Series.number_of_instances > 0)
        ).one()
        if count == 0:
            session.execute(delete(Series).where(Series.study_pk == study_pk))
            session.execute(delete(Study).where(Study.id == study_pk))
            continue
        modalities = session.scalars(
            select(Series.modality)
            .where(Series.study_pk == study_pk, Series.number_of_instances > 0)
            .distinct()
        ).all()
        session.execute(
            update(Study)
            .where(Study.id == study_pk)
            .values(
                number_of_instances=count,
                number_of_series=n_series,
                total_bytes=size,
                original_total_bytes=original,
                modalities_in_study="\\".join(sorted(m for m in modalities if m))[:160],
                updated_at=now,
            )
        )
    for patient_pk in patients:
        if not session.scalar(select(func.count(Study.id)).where(Study.patient_pk == patient_pk)):
            session.execute(delete(Patient).where(Patient.id == patient_pk))


def restore(*, archive: Archive, deletion_id: int, actor: Actor, now: datetime) -> Deletion:
    """Put a pending deletion's objects back through the ingest pipeline."""
    with archive.db.session() as session:
        deletion = session.get(Deletion, deletion_id, with_for_update=True)
        if deletion is None:
            raise NotFound(f"没有此删除记录 · no deletion {deletion_id}")
        if deletion.state != State.PENDING.value:
            raise Conflict(
                f"此删除已{_STATE_ZH[deletion.state]}，不能恢复 · the deletion is "
                f"{deletion.state}; it cannot be restored"
            )
        kept = list(
            session.scalars(
                select(DeletedInstance).where(DeletedInstance.deletion_id == deletion_id)
            )
        )
    for item in kept:
        # A fresh ingest writes a new copy; the kept one is removed once it is indexed.
        result = archive.ingest(archive.storage.read(item.storage_key), actor=actor)
        if not result.ok:
            raise Conflict(
                f"{item.sop_instance_uid} could not be restored: {result.reason}; the other "
                "objects of the deletion stay in the recycle bin"
            )
        with archive.db.session() as session:
            session.execute(delete(DeletedInstance).where(DeletedInstance.id == item.id))
        archive.storage.delete(item.storage_key)
    with archive.db.session() as session:
        deletion = session.get(Deletion, deletion_id)
        assert deletion is not None
        deletion.state, deletion.finished_at = State.RESTORED.value, now
        _audit(session, actor, deletion, AuditEventType.INSTANCES_RESTORED, len(kept))
        return deletion


_STATE_ZH = {"pending": "待清除", "purged": "清除", "restored": "恢复"}


def purge_due(*, archive: Archive, now: datetime, actor: Actor) -> int:
    """Remove the bytes of every deletion that is due; return how many deletions."""
    with archive.db.read_session() as session:
        due = list(
            session.scalars(
                select(Deletion.id).where(
                    Deletion.state == State.PENDING.value, Deletion.due_at <= now
                )
            )
        )
    for deletion_id in due:
        with archive.db.read_session() as session:
            keys = list(
                session.scalars(
                    select(DeletedInstance.storage_key).where(
                        DeletedInstance.deletion_id == deletion_id
                    )
                )
            )
        for key in keys:
            archive.storage.delete(key)  # absent objects are not an error: repeatable
        with archive.db.session() as session:
            deletion = session.get(Deletion, deletion_id, with_for_update=True)
            if deletion is None or deletion.state != State.PENDING.value:
                continue
            session.execute(
                delete(DeletedInstance).where(DeletedInstance.deletion_id == deletion_id)
            )
            deletion.state, deletion.finished_at = State.PURGED.value, now
            _audit(session, actor, deletion, AuditEventType.INSTANCES_PURGED, len(keys))
    return len(due)


def _audit(
    session: Session, actor: Actor, deletion: Deletion, event: AuditEventType, objects: int
) -> None:
    """The audit record of a restore or purge, naming what the deletion addressed."""
    audit.record(
        session=session,
        actor=actor,
        event_type=event,
        action=AuditAction.CREATE
        if event is AuditEventType.INSTANCES_RESTORED
        else AuditAction.DELETE,
        object_type=deletion.level,
        object_id=deletion.sop_instance_uid
        or deletion.series_instance_uid
        or deletion.study_instance_uid,
        patient_id=deletion.patient_id,
        study_instance_uid=deletion.study_instance_uid,
        detail={"deletion": deletion.id, "objects": objects},
    )


def pending(session: Session) -> list[dict[str, Any]]:
    """The recycle bin: deletions that can still be restored, newest first."""
    rows = session.scalars(
        select(Deletion)
        .where(Deletion.state == State.PENDING.value)
        .order_by(Deletion.requested_at.desc())
    )
    return [view(d) for d in rows]


def view(deletion: Deletion) -> dict[str, Any]:
    return {
        "id": deletion.id,
        "level": deletion.level,
        "study": deletion.study_instance_uid,
        "series": deletion.series_instance_uid,
        "instance": deletion.sop_instance_uid,
        "patient_id": deletion.patient_id,
        "reason": deletion.reason,
        "requested_by": deletion.requested_by,
        "requested_at": deletion.requested_at.isoformat(),
        "due_at": deletion.due_at.isoformat(),
        "state": deletion.state,
        "instances": deletion.instances,
        "bytes": deletion.bytes,
    }


@dataclass(frozen=True, slots=True)
class Due:
    """A study past its retention period."""

    study_instance_uid: str
    patient_id: str
    study_date: str
    modalities: str
    rule: str


def retention_due(session: Session, rules: Iterable[RetentionRule], today: datetime) -> list[Due]:
    """Studies older than the retention period of their rule (see
    ``retention.rules``): the first listed modality with a rule decides, else ``*``."""
    by_modality = {r.modality.upper(): r for r in rules}
    if not by_modality:
        return []
    found = []
    rows = session.execute(
        select(
            Study.study_instance_uid,
            Study.study_date,
            Study.modalities_in_study,
            Patient.patient_id,
        )
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_date != "")
        .order_by(Study.study_date)
    )
    for uid, study_date, modalities, patient_id in rows:
        listed = [m for m in modalities.split("\\") if m]
        rule = next((by_modality[m] for m in listed if m in by_modality), by_modality.get("*"))
        if rule is None:
            continue
        limit = f"{today.year - rule.years:04d}{today.month:02d}{today.day:02d}"
        if study_date < limit:
            found.append(
                Due(uid, patient_id, study_date, modalities, f"{rule.modality} {rule.years}y")
            )
    return found
