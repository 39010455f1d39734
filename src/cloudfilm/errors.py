"""The errors domain code raises. Each edge (HTTP, DIMSE, HL7) translates them once."""


class CloudFilmError(Exception):
    """Base of every error the application raises on purpose."""


class BadRequest(CloudFilmError):
    """The request itself is malformed (a bad UID, a missing field)."""


class NotFound(CloudFilmError):
    """The object asked for does not exist (or the caller may not know that it does)."""


class Conflict(CloudFilmError):
    """The request contradicts what is stored."""


class PermissionDenied(CloudFilmError):
    """The caller may not do this."""


class InvalidDicom(CloudFilmError):
    """A DICOM object failed validation; the message says what is wrong with it."""


class StorageUnavailable(CloudFilmError):
    """The storage backend cannot take or give bytes right now (full, offline, failing)."""


class StorageFull(StorageUnavailable):
    """The storage device is (nearly) full: ingest is refused before the disk fills
    completely (C-STORE 0xA700 Out of Resources, HTTP 507 Insufficient Storage)."""


class RecallNeeded(StorageUnavailable):
    """The object is on a tier that is not read on request (offline): a recall to the
    online tier has been (or must be) started; ask again after ``retry_after`` seconds
    (HTTP 503 with ``Retry-After``)."""

    def __init__(
        self,
        key: str,
        tier: str,
        *,
        study_instance_uid: str | None = None,
        job_id: int | None = None,
        retry_after: int = 30,
    ) -> None:
        super().__init__(
            f"影像正在从离线存储调取 · being recalled from offline storage ({tier}); "
            f"try again in {retry_after} s"
        )
        self.key = key
        self.tier = tier
        self.study_instance_uid = study_instance_uid
        self.job_id = job_id
        self.retry_after = retry_after
