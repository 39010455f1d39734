"""Audit vocabulary, after IHE ATNA / DICOM PS3.15 A.5 and FHIR AuditEvent."""

from enum import IntEnum, StrEnum


class AuditAction(StrEnum):
    """EventActionCode (PS3.15 A.5.1): Create, Read, Update, Delete, Execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class ActorType(StrEnum):
    USER = "user"
    AE = "dicom-ae"
    SYSTEM = "system"
    CLI = "cli"
    CLIENT = "client"
    """An integration client with a bearer token."""
    ANONYMOUS = "anonymous"


class AuditEventType(StrEnum):
    """What happened, in our own words (mapped to DCM codes when exported)."""

    INSTANCE_STORED = "instance-stored"
    INSTANCE_REPLACED = "instance-replaced"
    INSTANCE_DUPLICATE = "instance-duplicate"
    INSTANCE_REJECTED = "instance-rejected"
    INSTANCE_REFUSED = "instance-refused"
    """Not stored for lack of space (the object itself was fine): the sender should retry."""
    ASSOCIATION_REJECTED = "association-rejected"
    QUERY = "query"
    RETRIEVE = "retrieve"
    AUTHENTICATION_FAILED = "authentication-failed"
    ACCESS_DENIED = "access-denied"
    LOGIN = "login"
    LOGOUT = "logout"
    PASSWORD_CHANGED = "password-changed"
    MFA_ENROLLED = "mfa-enrolled"
    USER_CHANGED = "user-changed"
    ROLE_CHANGED = "role-changed"
    POLICY_CHANGED = "policy-changed"
    CLIENT_CHANGED = "client-changed"
    HTTP_REQUEST = "http-request"
    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    REPORT_RECEIVED = "report-received"
    """A report version came in (HL7 ORU, FHIR DiagnosticReport, API; ``detail``: version,
    status, outcome: created, updated, corrected, withdrawn, reinstated)."""
    REPORT_RENDERED = "report-rendered"
    """A report's PDF (with its QR code) was rendered, registered, and encapsulated in the
    study (``detail``: document UID, milliseconds)."""
    REPORT_RELEASED = "report-released"
    """A report opened to the patient (portal, kiosk), notice and charge queued."""
    REPORT_READ = "report-read"
    """A report or its PDF was read (by a user, a patient, a kiosk)."""
    LABEL_PRINTED = "label-printed"
    """A registration QR label was generated for an order."""
    ENTRY_VERIFIED = "entry-verified"
    """A patient proved who they are for an entry token (report QR, label, SMS link)."""
    ENTRY_REFUSED = "entry-refused"
    """An entry token or identity check failed (unknown token, wrong name or ID number)."""
    KIOSK_LOOKUP = "kiosk-lookup"
    """A kiosk looked a patient up by a scanned QR label or a card number."""
    KIOSK_PRINTED = "kiosk-printed"
    """A kiosk confirmed that it printed a report (``detail``: print count)."""
    KIOSK_REFUSED = "kiosk-refused"
    """A kiosk request was refused (unregistered kiosk, reprint not allowed, not released)."""
    KIOSK_REPRINT_APPROVED = "kiosk-reprint-approved"
    """A staff member allowed one more kiosk print of a report (reprint policy
    ``staff-approval``)."""
    INSTANCES_DELETED = "instances-deleted"
    """Objects taken out of the index into the recycle bin (``detail`` has the deletion)."""
    INSTANCES_RESTORED = "instances-restored"
    INSTANCES_PURGED = "instances-purged"
    AUDIT_PURGED = "audit-purged"
    """Records past retention were removed; ``detail`` anchors the chain's new start."""
    AUDIT_LOG_USED = "audit-log-used"
    """The audit trail was searched, verified or exported (DICOM "Audit Log Used")."""
    ALARM_RAISED = "alarm-raised"
    """A monitoring alarm started (storage nearly full, unreachable, ...)."""
    ALARM_CLEARED = "alarm-cleared"
    """The condition of an alarm ended."""
    ALARM_ACKNOWLEDGED = "alarm-acknowledged"
    """An administrator acknowledged an alarm."""
    STORAGE_SCRUBBED = "storage-scrubbed"
    """One scrub pass: objects re-read and checked against their checksums (counts)."""
    OBJECT_REPAIRED = "object-repaired"
    """A missing or corrupt copy of an object was rewritten from a good copy."""
    OBJECT_DAMAGED = "object-damaged"
    """No good copy of an indexed object was found (missing or corrupt everywhere)."""
    INSTANCES_COMPRESSED = "instances-compressed"
    """Stored objects were replaced by their verified lossless compression (background
    compression; ``detail``: counts, bytes, SOP Instance UIDs)."""
    ORPHANS_REMOVED = "orphans-removed"
    """Stored objects that no index row points to were deleted (orphan clean-up)."""
    STUDY_PINNED = "study-pinned"
    """A study was pinned to the online tier (the tier policies leave it there)."""
    STUDY_UNPINNED = "study-unpinned"
    """A study's pin was removed (the tier policies may move it again)."""
    STORAGE_JOB_QUEUED = "storage-job-queued"
    """A tier migration or recall job was created (``detail``: kind, tiers, requested by)."""
    STORAGE_JOB_DONE = "storage-job-done"
    """A tier migration or recall job moved all its objects (index switched, source
    copies deleted)."""
    STORAGE_JOB_FAILED = "storage-job-failed"
    """A tier migration or recall job failed its last attempt (``detail``: last error);
    it waits for ``cloudfilm storage jobs retry``."""
    CHARGE_RECORDED = "charge-recorded"
    """A cloud film was charged for an exam (``detail``: charge id, event, amount)."""
    CHARGE_REVERSED = "charge-reversed"
    """A charge was reversed (the report was withdrawn): a reversal record, never a delete."""
    CHARGE_DELIVERY_FAILED = "charge-delivery-failed"
    """A charge message (DFT^P03 or HTTP) was refused by the HIS or given up after its
    last attempt (``detail``: charge id, error)."""
    BILLING_IMPORTED = "billing-imported"
    """A HIS charge list was imported (``detail``: batch, file name, lines kept, rejected)."""
    BILLING_IMPORT_REFUSED = "billing-import-refused"
    """A HIS charge list was refused whole (not CSV/XLSX, truncated, too large)."""
    BILLING_RECONCILED = "billing-reconciled"
    """A reconciliation of charges against the HIS was run (``detail``: range, counts)."""
    BILLING_EXPORTED = "billing-exported"
    """A reconciliation was exported as XLSX (``detail``: range, counts)."""
    HL7_MESSAGE_RECEIVED = "hl7-message-received"
    """An HL7 v2 message came in over MLLP (``detail``: control ID, type, ACK code)."""
    HL7_MESSAGE_REPLAYED = "hl7-message-replayed"
    """An operator re-ran the handlers of a stored HL7 message."""
    HL7_MESSAGE_FAILED = "hl7-message-failed"
    """A stored HL7 message could not be applied on arrival and was answered AE
    (``detail``: control ID, type, ERR code); it stays stored for replay."""
    PATIENT_MERGED = "patient-merged"
    """Two persons of the patient master index were merged (ADT A40 or the API)."""
    PATIENT_UNMERGED = "patient-unmerged"
    """A merge of the patient master index was reversed."""
    NOTIFICATION_SENT = "notification-sent"
    """An SMS or WeChat message was accepted by the platform (``detail``: channel,
    template, attempt, provider message id; never the recipient or the text)."""
    NOTIFICATION_FAILED = "notification-failed"
    """A send attempt failed (``detail``: error, whether it will be retried)."""
    NOTIFICATION_GIVEN_UP = "notification-given-up"
    """A message was given up after its last attempt (``notify.max_attempts``)."""
    NOTIFICATION_REFUSED = "notification-refused"
    """A message was refused before sending: over the recipient's send limit, an invalid
    recipient, an unknown template or missing variables (``detail``: reason)."""
    NOTIFICATION_RECEIPT = "notification-receipt"
    """A delivery receipt came in (``detail``: driver, status); refused receipts too."""
