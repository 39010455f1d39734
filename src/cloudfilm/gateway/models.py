"""The gateway's own tables: its queue and state, in its own database (not the archive's).

The schema has its own small :class:`MetaData`; :func:`create_schema` creates missing tables
at start (``metadata.create_all``). It is not part of the archive's Alembic history, and
changing a column later needs a migration of its own (see docs/gateway.md).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cloudfilm.db import NAMING_CONVENTION


class GatewayBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyState(StrEnum):
    """Where a study is on its way from the PACS to the archive."""

    DISCOVERED = "discovered"
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"
    UPLOADING = "uploading"
    DELIVERED = "delivered"
    FAILED = "failed"
    """The last step failed; it runs again at ``next_attempt_at``."""
    DEAD = "dead"
    """Dead letter: too many failed attempts; only a manual retry moves it on."""


class InstanceState(StrEnum):
    RETRIEVED = "retrieved"
    """In the spool, not yet sent."""
    UPLOADING = "uploading"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"
    """The archive refused this instance (its reason is kept); never resent by itself."""


class Step(StrEnum):
    RETRIEVE = "retrieve"
    DELIVER = "deliver"


class SourceState(GatewayBase):
    """Per PACS source: the poll's high-water mark and its last outcome."""

    __tablename__ = "gw_source"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    polled_through: Mapped[str | None] = mapped_column(String(8))
    """Last StudyDate (YYYYMMDD) a complete poll covered; the next poll starts
    ``window_days`` before it."""
    last_poll_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class GatewayStudy(GatewayBase):
    __tablename__ = "gw_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64), index=True)
    # (0020,000D) Study Instance UID | VR UI, VM 1
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # (0008,0050) Accession Number | VR SH, VM 1
    accession_number: Mapped[str | None] = mapped_column(String(64))
    # (0008,0020) Study Date | VR DA, VM 1
    study_date: Mapped[str | None] = mapped_column(String(8))
    # (0008,0061) Modalities in Study | VR CS, VM 1-n (backslash-joined)
    modalities: Mapped[str | None] = mapped_column(String(64))
    # (0020,1208) Number of Study Related Instances | VR IS, VM 1, from the C-FIND answer
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True, default=StudyState.DISCOVERED)
    step: Mapped[str] = mapped_column(String(16), default=Step.RETRIEVE)
    """The step a FAILED or DEAD study is waiting to run again."""
    manual: Mapped[bool] = mapped_column(default=False)
    """Requested by hand (``gateway fetch``): not bound by the schedule window."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Failed attempts of the current step (reset when a step succeeds)."""
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class GatewayInstance(GatewayBase):
    __tablename__ = "gw_instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("gw_study.id"), index=True)
    # (0008,0018) SOP Instance UID | VR UI, VM 1
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # (0008,0016) SOP Class UID | VR UI, VM 1
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    spool_key: Mapped[str | None] = mapped_column(String(200))
    """Key in the spool (our own, never a UID); cleared once delivered and removed."""
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=InstanceState.RETRIEVED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Attempt(GatewayBase):
    """One run of a step, for the run log and to show back-off (one row per attempt)."""

    __tablename__ = "gw_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("gw_study.id"), index=True)
    step: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(16))
    """``ok``, ``failed`` or empty (the process stopped during the attempt)."""
    detail: Mapped[str | None] = mapped_column(Text)


class RemoteFile(GatewayBase):
    """A file taken from an FTP source: not fetched again while its size is the same, and
    removed from the server once its instance is delivered (``ftp_after``)."""

    __tablename__ = "gw_remote_file"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    size: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    """``taken`` (in the spool or delivered), ``failed`` (not DICOM; kept on the server) or
    ``removed`` (deleted or moved away on the server after delivery)."""
    # (0008,0018) SOP Instance UID | VR UI, VM 1; empty when the file was not DICOM
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SendBackState(StrEnum):
    """Where a study is on its way back from the archive to a hospital node."""

    QUEUED = "queued"
    FETCHING = "fetching"
    FETCHED = "fetched"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    """The last step failed; it runs again at ``next_attempt_at``."""
    DEAD = "dead"
    """Dead letter: too many failed attempts; only a manual retry moves it on."""


class SendBackJob(GatewayBase):
    """One study to bring back from the archive into a hospital node (the way back)."""

    __tablename__ = "gw_sendback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # (0020,000D) Study Instance UID | VR UI, VM 1
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    """Name of the node in ``gateway.destinations``."""
    state: Mapped[str] = mapped_column(String(16), index=True, default=SendBackState.QUEUED)
    step: Mapped[str] = mapped_column(String(16), default="fetch")
    """``fetch`` (WADO-RS from the archive) or ``send`` (C-STORE to the destination): the
    step a FAILED or DEAD job runs again."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SendBackInstance(GatewayBase):
    """One instance of a send-back job, spooled until the destination has stored it."""

    __tablename__ = "gw_sendback_instance"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("gw_sendback.id"), index=True)
    # (0008,0018) SOP Instance UID | VR UI, VM 1
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    spool_key: Mapped[str | None] = mapped_column(String(200))
    """Key in the send-back spool; cleared once the destination stored the instance."""
    size: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="fetched")
    """``fetched`` (in the spool), ``sent``, or ``refused`` (the destination's status kept
    in ``last_error``)."""
    last_error: Mapped[str | None] = mapped_column(Text)


def create_schema(engine: Engine) -> None:
    """Create the gateway's tables that do not exist yet."""
    GatewayBase.metadata.create_all(engine)
