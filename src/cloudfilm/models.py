"""Every table of the application, imported in one place for Alembic and tests."""

from cloudfilm.archive.deletion import DeletedInstance, Deletion
from cloudfilm.archive.models import (
    Instance,
    InstanceMetadata,
    Patient,
    Series,
    StorageJob,
    Study,
)
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
from cloudfilm.billing.models import Charge, HisChargeLine, ImportBatch
from cloudfilm.db import Base
from cloudfilm.hl7.models import HL7Message
from cloudfilm.kiosk.models import KioskPrint, KioskReprintApproval
from cloudfilm.mpi.models import Person, PersonHistory, PersonIdentifier, PersonMerge
from cloudfilm.notify.models import Notification
from cloudfilm.orders.models import Encounter, ImagingOrder, OrderStatusChange
from cloudfilm.reports.models import Document, Report, ReportVersion
from cloudfilm.sharing.models import EntryToken
from cloudfilm.soap.models import WebServiceNonce
from cloudfilm.storage.models import Alarm, MirrorPending, StorageSample

__all__ = [
    "DeletedInstance",
    "Deletion",
    "AccessToken",
    "Alarm",
    "ApiClient",
    "AuditEvent",
    "Base",
    "Department",
    "Document",
    "EntryToken",
    "Encounter",
    "HL7Message",
    "ImagingOrder",
    "Instance",
    "InstanceMetadata",
    "KioskPrint",
    "KioskReprintApproval",
    "MirrorPending",
    "Notification",
    "OrderStatusChange",
    "PasswordHistory",
    "Patient",
    "Person",
    "PersonHistory",
    "PersonIdentifier",
    "PersonMerge",
    "Report",
    "ReportVersion",
    "Role",
    "SecuritySetting",
    "Series",
    "StorageJob",
    "StorageSample",
    "Study",
    "User",
    "UserRole",
    "UserSession",
    "WebServiceNonce",
    "Charge",
    "HisChargeLine",
    "ImportBatch",
]
