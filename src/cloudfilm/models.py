"""Every table of the application, imported in one place for Alembic and tests."""

from cloudfilm.archive.models import Instance, InstanceMetadata, Patient, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.models import (
    AccessToken,
    ApiClient,
    Department,
    PasswordHistory,
    Role,
    SecuritySetting,
    User,
    UserRole,
    UserSession,
)
from cloudfilm.db import Base

__all__ = [
    "AccessToken",
    "ApiClient",
    "AuditEvent",
    "Base",
    "Department",
    "Instance",
    "InstanceMetadata",
    "PasswordHistory",
    "Patient",
    "Role",
    "SecuritySetting",
    "Series",
    "Study",
    "User",
    "UserRole",
    "UserSession",
]
