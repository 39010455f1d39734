"""Counts over the index (no patient data): for the home page, the CLI and monitoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Instance, Patient, Series, Study


@dataclass(frozen=True, slots=True)
class ArchiveCounts:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def counts(*, session: Session) -> ArchiveCounts:
    return ArchiveCounts(
        patients=session.scalar(select(func.count()).select_from(Patient)) or 0,
        studies=session.scalar(select(func.count()).select_from(Study)) or 0,
        series=session.scalar(select(func.count()).select_from(Series)) or 0,
        instances=session.scalar(select(func.count()).select_from(Instance)) or 0,
        bytes=session.scalar(select(func.coalesce(func.sum(Instance.byte_size), 0))) or 0,
    )
