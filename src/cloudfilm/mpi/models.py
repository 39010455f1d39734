"""Tables of the patient master index (``mpi_*``).

A :class:`Person` is one human being; :class:`PersonIdentifier` rows are the numbers the
hospital's systems know them by, each with a type (HL7 table 0203) and an assigning
authority. ID-card and phone numbers are never stored in clear: ``value`` is empty,
``value_sealed`` holds the AES-256-GCM ciphertext, ``key_id`` the sealing key and
``blind_index`` the keyed hash used for exact lookup (:mod:`cloudfilm.mpi.keys`).

Archive patients (DICOM PatientID + Issuer of Patient ID) are linked to a person through
the identifiers: a study belongs to the person holding an identifier with that value and
assigning authority. Merging moves identifiers, so studies follow them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class Person(Base):
    """One person with the current demographics (earlier values in :class:`PersonHistory`)."""

    __tablename__ = "mpi_person"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    # PID-5 Patient Name | XPN: family^given as received ("张^三丰" or "张三丰")
    name: Mapped[str] = mapped_column(String(200), default="")
    name_pinyin: Mapped[str] = mapped_column(String(400), default="", index=True)
    """Toneless pinyin without separators: ``zhangsanfeng``."""
    name_initials: Mapped[str] = mapped_column(String(64), default="", index=True)
    """Pinyin initials: ``zsf``."""
    # PID-8 Administrative Sex | IS (HL7 table 0001): M, F, O, U, A, N
    sex: Mapped[str] = mapped_column(String(1), default="")
    # PID-7 Date/Time of Birth | TS, date part YYYYMMDD
    birth_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    # PID-11 Patient Address | XAD, components joined by spaces
    address: Mapped[str] = mapped_column(String(400), default="")
    merged_into: Mapped[int | None] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="SET NULL"), index=True
    )
    """The surviving person after an A40 merge; such a person has no identifiers left."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    identifiers: Mapped[list[PersonIdentifier]] = relationship(
        back_populates="person", foreign_keys="PersonIdentifier.person_id"
    )

    __table_args__ = (Index("ix_mpi_person_name", "name"),)


class PersonIdentifier(Base):
    """One identifier of a person: type, assigning authority and value."""

    __tablename__ = "mpi_identifier"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    person_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="CASCADE"), index=True
    )
    # CX.5 Identifier Type Code (HL7 table 0203): PI, MC, NNCHN, PPN, PHONE, OP, IP, ...
    id_type: Mapped[str] = mapped_column(String(16))
    # CX.4 Assigning Authority | HD, namespace ID ("" when absent)
    authority: Mapped[str] = mapped_column(String(64), default="")
    # CX.1 ID Number, in clear for the identifiers that are not sealed; NULL when sealed
    value: Mapped[str | None] = mapped_column(String(64))
    value_sealed: Mapped[str | None] = mapped_column(Text)
    """AES-256-GCM ciphertext of the normalised value (ID-card and phone numbers)."""
    key_id: Mapped[str | None] = mapped_column(String(16))
    """Which key sealed ``value_sealed``."""
    blind_index: Mapped[str | None] = mapped_column(String(64), index=True)
    """HMAC-SHA256 of the normalised value under the blind-index key: exact lookup."""
    merged_from: Mapped[int | None] = mapped_column(_ID)
    """The person this identifier belonged to before the merge that moved it here."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    person: Mapped[Person] = relationship(back_populates="identifiers", foreign_keys=[person_id])

    __table_args__ = (
        # One holder per identifier; a phone number may be shared (a family's one phone).
        Index(
            "uq_mpi_identifier_clear",
            "id_type",
            "authority",
            "value",
            unique=True,
            postgresql_where=text("value IS NOT NULL"),
            sqlite_where=text("value IS NOT NULL"),
        ),
        Index(
            "uq_mpi_identifier_sealed",
            "id_type",
            "authority",
            "blind_index",
            unique=True,
            postgresql_where=text("blind_index IS NOT NULL AND id_type <> 'PHONE'"),
            sqlite_where=text("blind_index IS NOT NULL AND id_type <> 'PHONE'"),
        ),
        Index("ix_mpi_identifier_value", "value"),
    )


class PersonHistory(Base):
    """One change of a person's demographics: the fields before and after."""

    __tablename__ = "mpi_person_history"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    person_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="CASCADE"), index=True
    )
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(128), default="")
    """What made the change: ``hl7:<message id>``, ``api:<user>``."""
    before: Mapped[dict[str, Any]] = mapped_column(JSON)
    after: Mapped[dict[str, Any]] = mapped_column(JSON)


class PersonMerge(Base):
    """One merge (ADT A40): ``prior`` into ``survivor``; ``identifier_ids`` were moved.
    ``undone_at`` is set by the unmerge that reversed it."""

    __tablename__ = "mpi_merge"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    survivor_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="CASCADE"), index=True
    )
    prior_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("mpi_person.id", ondelete="CASCADE"), index=True
    )
    identifier_ids: Mapped[list[int]] = mapped_column(JSON)
    merged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(128), default="")
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    undone_by: Mapped[str | None] = mapped_column(String(128))
