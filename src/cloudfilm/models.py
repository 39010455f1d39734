"""Every table of the application, imported in one place for Alembic and tests."""

from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.db import Base

__all__ = ["AuditEvent", "Base", "Instance", "InstanceMetadata", "Patient", "Series", "Study"]
