"""Every table of the application, imported in one place for Alembic and tests."""

from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.models import ApiClient
from cloudfilm.db import Base

__all__ = [
    "ApiClient",
    "AuditEvent",
    "Base",
    "Instance",
    "InstanceMetadata",
    "Patient",
    "Series",
    "Study",
]
