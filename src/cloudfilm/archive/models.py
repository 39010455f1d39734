"""The index: patient → study → series → instance.

Columns hold what clinical search and QIDO-RS match on; each DICOM column is commented
with its tag, VR and VM (after pynetdicom's ``qrscp/db.py``). The full DICOM JSON of every
instance is kept in :class:`InstanceMetadata`, written once at ingest, so WADO-RS metadata
never re-reads a blob. Dates (DA) are kept as ``YYYYMMDD`` text and times (TM) as DICOM
text: range matching on them is a string comparison.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    # (0010,0020) Patient ID | VR LO, VM 1 ("" when the sender left it empty)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    # (0010,0021) Issuer of Patient ID | VR LO, VM 1 ("" when absent)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    # (0010,0010) Patient's Name | VR PN, VM 1, all groups as received (decoded)
    patient_name: Mapped[str] = mapped_column(String(400), default="")
    patient_name_alphabetic: Mapped[str] = mapped_column(String(200), default="", index=True)
    patient_name_ideographic: Mapped[str] = mapped_column(String(200), default="", index=True)
    patient_name_phonetic: Mapped[str] = mapped_column(String(200), default="")
    patient_name_pinyin: Mapped[str] = mapped_column(String(400), default="", index=True)
    """Toneless pinyin of the Chinese name, components joined by ``^``: ``wang^xiaodong``."""
    patient_name_initials: Mapped[str] = mapped_column(String(64), default="", index=True)
    """Pinyin initials of the Chinese name: ``wxd``."""
    # (0010,0040) Patient's Sex | VR CS, VM 1
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    # (0010,0030) Patient's Birth Date | VR DA, VM 1
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    # (0020,000D) Study Instance UID | VR UI, VM 1
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # (0008,0020) Study Date | VR DA, VM 1
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    # (0008,0030) Study Time | VR TM, VM 1
    study_time: Mapped[str] = mapped_column(String(16), default="")
    # (0008,0050) Accession Number | VR SH, VM 1
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    # (0020,0010) Study ID | VR SH, VM 1
    study_id: Mapped[str] = mapped_column(String(16), default="")
    # (0008,1030) Study Description | VR LO, VM 1
    study_description: Mapped[str] = mapped_column(String(64), default="")
    # (0008,0090) Referring Physician's Name | VR PN, VM 1
    referring_physician_name: Mapped[str] = mapped_column(String(400), default="")
    # (0008,0080) Institution Name | VR LO, VM 1 (of the first instance received)
    institution_name: Mapped[str] = mapped_column(String(64), default="", index=True)
    # (0032,1033) Requesting Service, else (0008,1040) Institutional Department Name: the
    # department the study belongs to, for department data scopes
    department: Mapped[str] = mapped_column(String(64), default="", index=True)
    # (0008,0061) Modalities in Study | VR CS, VM 1-n, computed, backslash-separated
    modalities_in_study: Mapped[str] = mapped_column(String(160), default="")
    # (0020,1206) Number of Study Related Series | VR IS, VM 1, computed
    number_of_series: Mapped[int] = mapped_column(Integer, default=0)
    # (0020,1208) Number of Study Related Instances | VR IS, VM 1, computed
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bytes stored."""
    original_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """Bytes as received (before lossless compression at ingest)."""
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Kept on the online tier: the tier planner never migrates it (pinning a study that
    is on a lower tier recalls it)."""
    last_accessed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the study was last retrieved (WADO, C-MOVE, C-GET), to within an hour
    (:mod:`cloudfilm.archive.access`); ``None``: not read since it arrived."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    # (0020,000E) Series Instance UID | VR UI, VM 1
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # (0008,0060) Modality | VR CS, VM 1
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    # (0020,0011) Series Number | VR IS, VM 1
    series_number: Mapped[int | None] = mapped_column(Integer)
    # (0008,103E) Series Description | VR LO, VM 1
    series_description: Mapped[str] = mapped_column(String(64), default="")
    # (0008,0021) Series Date | VR DA, VM 1
    series_date: Mapped[str] = mapped_column(String(8), default="")
    # (0008,0031) Series Time | VR TM, VM 1
    series_time: Mapped[str] = mapped_column(String(16), default="")
    # (0018,0015) Body Part Examined | VR CS, VM 1
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    # (0008,1010) Station Name | VR SH, VM 1
    station_name: Mapped[str] = mapped_column(String(16), default="")
    # (0008,0080) Institution Name | VR LO, VM 1
    institution_name: Mapped[str] = mapped_column(String(64), default="")
    # (0008,0070) Manufacturer | VR LO, VM 1
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    # (0040,0244) Performed Procedure Step Start Date | VR DA, VM 1
    performed_procedure_step_start_date: Mapped[str] = mapped_column(String(8), default="")
    # (0020,1209) Number of Series Related Instances | VR IS, VM 1, computed
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    """Bytes stored."""
    original_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """Bytes as received (before lossless compression at ingest)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_series_number", "series_pk", "instance_number"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    # (0008,0018) SOP Instance UID | VR UI, VM 1
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # (0008,0016) SOP Class UID | VR UI, VM 1
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    # (0020,0013) Instance Number | VR IS, VM 1
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # (0002,0010) Transfer Syntax UID | VR UI, VM 1, of the stored object
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    # (0028,0010) Rows | VR US, VM 1
    rows: Mapped[int | None] = mapped_column(Integer)
    # (0028,0011) Columns | VR US, VM 1
    columns: Mapped[int | None] = mapped_column(Integer)
    # (0028,0008) Number of Frames | VR IS, VM 1 (1 for single-frame images)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    # (0028,0100) Bits Allocated | VR US, VM 1
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    # (0028,0101) Bits Stored | VR US, VM 1
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    # (0028,0002) Samples per Pixel | VR US, VM 1
    samples_per_pixel: Mapped[int | None] = mapped_column(Integer)
    # (0028,0004) Photometric Interpretation | VR CS, VM 1
    photometric_interpretation: Mapped[str] = mapped_column(String(16), default="")
    # (0008,0023) Content Date | VR DA, VM 1
    content_date: Mapped[str] = mapped_column(String(8), default="")
    # (0008,0033) Content Time | VR TM, VM 1
    content_time: Mapped[str] = mapped_column(String(16), default="")
    byte_size: Mapped[int] = mapped_column(BigInteger)
    """Size of the stored Part-10 object."""
    checksum: Mapped[str] = mapped_column(String(80))
    """``algorithm:hexdigest`` of the stored object, e.g. ``sha256:…`` or ``sm3:…``."""
    storage_name: Mapped[str] = mapped_column(String(32), default="primary")
    """Which configured storage holds the object."""
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    """Our own key for the object (never derived from a UID)."""
    # (0002,0010) Transfer Syntax UID | VR UI, VM 1, as received
    original_transfer_syntax_uid: Mapped[str] = mapped_column(String(64), server_default="")
    original_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """Size of the object as received (our Part-10 form); ``byte_size`` when stored as is."""
    original_checksum: Mapped[str] = mapped_column(String(80), server_default="")
    """Checksum of the object as received: recognises a resent object after compression."""
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    """When the scrub last read the stored bytes and found them matching ``checksum``
    (empty: never); the scrub takes the least recently verified objects first."""
    integrity_error: Mapped[str | None] = mapped_column(String(256))
    """Why no good copy of the object could be found at the last check (missing or corrupt
    everywhere); empty while the object is sound. Set by the scrub and the orphan report."""
    frame_index: Mapped[str | None] = mapped_column(Text, deferred=True)
    """Where each frame lies in the stored object (JSON, :mod:`cloudfilm.archive.frames`);
    empty when unknown: frame requests then parse the object."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")
    metadata_row: Mapped[InstanceMetadata] = relationship(
        back_populates="instance", cascade="all, delete-orphan"
    )


class InstanceMetadata(Base):
    """The instance's DICOM JSON (PS3.18 F.2), bulk data replaced by ``BulkDataURI``."""

    __tablename__ = "instance_metadata"

    instance_pk: Mapped[int] = mapped_column(
        ForeignKey("instance.id", ondelete="CASCADE"), primary_key=True
    )
    dicom_json: Mapped[str] = mapped_column(Text)

    instance: Mapped[Instance] = relationship(back_populates="metadata_row")


class CompressionJob(Base):
    """Background lossless compression of one stored object (``compression.deferred``).

    Inserted in the transaction that indexes the object. ``queued``: re-encode, verify
    bit for bit, write the new object, then switch the instance to it in one transaction
    that also moves the job to ``cleanup`` with the received object's key;
    ``cleanup`` (after ``not_before``): delete that object and the job. No foreign key:
    an instance deleted meanwhile only makes the job finish without work.
    """

    __tablename__ = "compression_job"
    __table_args__ = (Index("ix_compression_job_due", "not_before"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(_ID, index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    """``queued`` or ``cleanup``."""
    old_key: Mapped[str | None] = mapped_column(String(200))
    """In ``cleanup``: the received object's key, deleted when the job ends."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StorageJob(Base):
    """A durable move of one study's objects between storage tiers (migration or recall).

    Steps, each committed before the next and each repeatable after a crash: ``copying``
    (every object to the target tier, verified by reading it back against ``checksum``),
    ``switching`` (one transaction: the instances' ``storage_name`` and the state),
    ``cleaning`` (delete the source copies), ``done``. A runner holds the job with a lease
    (``lease_owner`` until ``lease_until``); a dead runner's job is taken over afterwards.
    """

    __tablename__ = "storage_job"
    __table_args__ = (Index("ix_storage_job_state_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    """``migrate`` (planner, administrator) or ``recall`` (a read, a pin, an administrator)."""
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    source_tier: Mapped[str] = mapped_column(String(32))
    """The tier the objects leave (``online``, a configured name, or ``*``: every other)."""
    target_tier: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    """``queued``, ``copying``, ``switching``, ``cleaning``, ``done``, ``failed``, ``cancelled``."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    objects_total: Mapped[int] = mapped_column(Integer, default=0)
    objects_done: Mapped[int] = mapped_column(Integer, default=0)
    """Objects verified on the target so far (progress shown to the viewer)."""
    last_error: Mapped[str | None] = mapped_column(String(512))
    requested_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
