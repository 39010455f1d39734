"""Tables of diagnostic reports (one row per exam, one per version) and of the document
registry (report PDFs, registration labels, PDFs received from the RIS).

A report is never edited in place: every ORU, DiagnosticReport or API submission adds a
version; the report row points at the newest one. A corrected report supersedes the final
one and a withdrawn report hides it from patients and kiosks, and both stay readable.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class ReportStatus(StrEnum):
    """The status of a version (HL7 OBR-25 / FHIR DiagnosticReport.status)."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    CORRECTED = "corrected"
    WITHDRAWN = "withdrawn"

    @property
    def approved(self) -> bool:
        """A radiologist signed it (final or corrected): it may be released."""
        return self in (ReportStatus.FINAL, ReportStatus.CORRECTED)


class Report(Base):
    """One exam's report: who it belongs to, where it stands, when it opens to the patient."""

    __tablename__ = "report"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    order_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("imaging_order.id", ondelete="SET NULL"), index=True
    )
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_authority: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    """:class:`ReportStatus` of the newest version."""
    version_count: Mapped[int] = mapped_column(Integer, default=0)
    current_version_id: Mapped[int | None] = mapped_column(_ID)
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the first approved (final) version was signed."""
    release_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    """When it opens to the patient: approval + the release delay of the rules."""
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    """When it was released (notice sent, charge recorded); ``None`` until then."""
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    render_pending: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    """The newest version's PDF is still to be rendered (the report worker's queue)."""
    render_lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    render_attempts: Mapped[int] = mapped_column(Integer, default=0)
    render_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (
        Index(
            "uq_report_accession_number",
            "accession_number",
            unique=True,
            postgresql_where=text("accession_number <> ''"),
            sqlite_where=text("accession_number <> ''"),
        ),
    )


class ReportVersion(Base):
    """One submission of a report, kept for ever."""

    __tablename__ = "report_version"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    report_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("report.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    exam_name: Mapped[str] = mapped_column(String(200), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    department: Mapped[str] = mapped_column(String(64), default="")
    findings: Mapped[str] = mapped_column(Text, default="")
    """检查所见."""
    impression: Mapped[str] = mapped_column(Text, default="")
    """诊断意见 / 印象."""
    recommendation: Mapped[str] = mapped_column(Text, default="")
    examining_doctor: Mapped[str] = mapped_column(String(100), default="")
    reporting_doctor: Mapped[str] = mapped_column(String(100), default="")
    reviewing_doctor: Mapped[str] = mapped_column(String(100), default="")
    examined_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    key_images: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """SOP Instance UIDs (with frame numbers) the radiologist marked as key images."""
    source: Mapped[str] = mapped_column(String(128), default="")
    """``hl7:#<message id>``, ``fhir:<actor>`` or ``api:<actor>``."""
    source_document_id: Mapped[int | None] = mapped_column(_ID)
    """A PDF the RIS sent with the report (OBX type ED, presentedForm)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("report_id", "version", name="uq_report_version"),)


class DocumentKind(StrEnum):
    REPORT_PDF = "report-pdf"
    """The report PDF we render, with its QR code."""
    SOURCE_PDF = "source-pdf"
    """A PDF the RIS sent with the report."""
    REGISTRATION_LABEL = "registration-label"
    """The QR label printed at registration."""


class Document(Base):
    """One entry of the document registry (XDS style): the bytes live in the storage under
    ``storage_key``; the entry says what they are, whose, and which entry replaced it."""

    __tablename__ = "document"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    """A DICOM-style UID (XDS uniqueId); also the SOP Instance UID of the encapsulated PDF."""
    kind: Mapped[str] = mapped_column(String(32), index=True)
    mime_type: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200), default="")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(200))
    person_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    report_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("report.id", ondelete="SET NULL"), index=True
    )
    report_version_id: Mapped[int | None] = mapped_column(_ID)
    order_id: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("imaging_order.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default="current")
    """``current``, or ``deprecated`` once a newer document replaced it (XDS)."""
    replaced_by_id: Mapped[int | None] = mapped_column(_ID)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
