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
