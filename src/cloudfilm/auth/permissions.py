"""The functional permissions: what a role may do. Code defines the operations; which role
holds which permission is data (the ``role`` table)."""

from __future__ import annotations

from enum import StrEnum


class Duty(StrEnum):
    """The three administrator duties that must be held by different people."""

    SYSTEM = "system"
    SECURITY = "security"
    AUDIT = "audit"


class Permission(StrEnum):
    STUDY_SEARCH = "study:search"
    """Search studies, series and instances (QIDO-RS, C-FIND, worklists)."""
    STUDY_READ = "study:read"
    """View metadata and images (WADO-RS/URI, frames, rendered, thumbnails, C-MOVE/C-GET)."""
    STUDY_DOWNLOAD = "study:download"
    """Take a copy away: study ZIP with DICOMDIR."""
    STUDY_STORE = "study:store"
    """Send objects in (STOW-RS, C-STORE)."""
    STUDY_DELETE = "study:delete"
    """Delete studies, series, instances (to the recycle bin), restore and purge them."""
    ARCHIVE_STATS = "archive:stats"
    """Counts and statistics without patient data."""
    BILLING_RECONCILE = "billing:reconcile"
    """Import the HIS charge list, list charges, reconcile and export (finance/statistics)."""
    USER_MANAGE = "user:manage"
    """Create, edit, disable users and departments; reset passwords (system administrator)."""
    CLIENT_MANAGE = "client:manage"
    """Create and revoke integration clients (system administrator)."""
    STORAGE_MANAGE = "storage:manage"
    """Acknowledge storage alarms, manage storage (system administrator)."""
    ROLE_MANAGE = "role:manage"
    """Edit roles, assign them to users, unlock accounts (security administrator)."""
    POLICY_MANAGE = "policy:manage"
    """Edit the password, lockout and session policy (security administrator)."""
    AUDIT_READ = "audit:read"
    """Search the audit trail and verify its chain (audit administrator)."""
    AUDIT_EXPORT = "audit:export"
    """Export the audit trail as CSV, FHIR AuditEvent or DICOM audit messages."""
    PATIENT_READ = "patient:read"
    """Look patients up in the master index (PIX, PDQ) and read their identifiers."""
    PATIENT_MERGE = "patient:merge"
    """Merge and unmerge patients of the master index."""
    NOTIFY_READ = "notify:read"
    """List the SMS and WeChat messages sent, their state and delivery receipts, recipients
    masked (system administrator)."""
    KIOSK_PRINT = "kiosk:print"
    """Be a self-service printing kiosk: look patients up by QR code or card, print their
    released reports. Only for integration clients (a registered kiosk), never for a role:
    it would let a person print anyone's report by typing a card number."""
    KIOSK_APPROVE = "kiosk:approve"
    """Allow one more kiosk print of a report (reprint policy ``staff-approval``)."""

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def client_only(self) -> bool:
        """Held only by integration clients (devices), never granted to a role."""
        return self in CLIENT_ONLY

    @property
    def duty(self) -> Duty | None:
        """The administrator duty this permission is reserved to, if any: such a permission
        can only be granted to a role of that duty (separation of duties)."""
        return _RESERVED.get(self)


_LABELS = {
    Permission.STUDY_SEARCH: "检索检查 Search studies",
    Permission.STUDY_READ: "查看影像 View images",
    Permission.STUDY_DOWNLOAD: "下载影像 Download studies",
    Permission.STUDY_STORE: "上传影像 Store images",
    Permission.STUDY_DELETE: "删除影像 Delete studies",
    Permission.ARCHIVE_STATS: "查看统计 View statistics",
    Permission.BILLING_RECONCILE: "收费对账 Billing reconciliation",
    Permission.USER_MANAGE: "用户管理 Manage users",
    Permission.CLIENT_MANAGE: "接口客户端管理 Manage integration clients",
    Permission.STORAGE_MANAGE: "存储管理 Manage storage",
    Permission.ROLE_MANAGE: "角色与授权 Manage roles",
    Permission.POLICY_MANAGE: "安全策略 Security policy",
    Permission.AUDIT_READ: "审计查询 Read audit trail",
    Permission.AUDIT_EXPORT: "审计导出 Export audit trail",
    Permission.PATIENT_READ: "患者主索引查询 Look up patients",
    Permission.PATIENT_MERGE: "患者合并与拆分 Merge patients",
    Permission.NOTIFY_READ: "消息通知记录 Notification log",
    Permission.KIOSK_PRINT: "自助打印机 Self-service printing kiosk",
    Permission.KIOSK_APPROVE: "自助打印补打审批 Approve kiosk reprints",
}

_RESERVED = {
    Permission.USER_MANAGE: Duty.SYSTEM,
    Permission.CLIENT_MANAGE: Duty.SYSTEM,
    Permission.STORAGE_MANAGE: Duty.SYSTEM,
    Permission.NOTIFY_READ: Duty.SYSTEM,
    Permission.ROLE_MANAGE: Duty.SECURITY,
    Permission.POLICY_MANAGE: Duty.SECURITY,
    Permission.AUDIT_READ: Duty.AUDIT,
    Permission.AUDIT_EXPORT: Duty.AUDIT,
}

#: Permissions of devices: an integration client may hold them, a role may not.
CLIENT_ONLY = frozenset({Permission.KIOSK_PRINT})
