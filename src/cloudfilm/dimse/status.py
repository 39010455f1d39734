"""The DIMSE statuses we answer with (PS3.7 Annex C, PS3.4 B.2.3, C.4.1.1.4, C.4.2.1.5)."""

from __future__ import annotations

from enum import IntEnum

from pydicom.dataset import Dataset


class DimseStatus(IntEnum):
    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    """Matching or sub-operations terminated by a C-CANCEL."""
    PROCESSING_FAILURE = 0x0110
    NOT_AUTHORISED = 0x0124
    """Refused: Not Authorised — the node table does not allow this service to the caller."""
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_SUBOPERATIONS = 0xA702
    """C-MOVE / C-GET: Refused, Out of Resources – Unable to perform sub-operations (also:
    the objects are on an offline tier and being recalled)."""
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH = 0xA900
    """The identifier is not usable with the SOP class (level, keys or a malformed value)."""
    CANNOT_UNDERSTAND = 0xC000
    """C-STORE: the object failed validation. Q/R: unable to process."""


def status(code: DimseStatus, comment: str) -> Dataset:
    """A status data set with an Error Comment (0000,0902; LO, at most 64 characters)."""
    ds = Dataset()
    ds.Status = int(code)
    ds.ErrorComment = error_comment(comment)
    return ds


def error_comment(text: str) -> str:
    """``text`` as an Error Comment: ASCII (the command set has no character set), 64 chars."""
    return text.encode("ascii", "replace").decode()[:64]
