"""STOW-RS (PS3.18 10.5): store instances sent as ``multipart/related; type="application/dicom"``.

The body is parsed as it arrives (python-multipart's streaming parser); each part is
handed to the ingest pipeline as soon as its closing boundary is read, so memory holds
one part at a time, never the whole body. A part that is cut off (the client went away,
the body ended early) is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParser

from cloudfilm.archive.ingest import IngestResult, IngestStatus

# FailureReason (0008,1197) and WarningReason (0008,1196) values, PS3.18 Table 10.5.3-3,
# taken from the C-STORE statuses of PS3.4 B.2.3.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
STUDY_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNSUPPORTED_MEDIA = 0xC000


class StowError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Part:
    headers: dict[str, str]
    data: bytearray = field(default_factory=bytearray)
    too_large: bool = False


class PartCollector:
    """Feeds a :class:`MultipartParser` and collects complete parts (size-capped)."""

    def __init__(self, boundary: str, max_part_bytes: int) -> None:
        self.max_part_bytes = max_part_bytes
        self.complete: list[Part] = []
        self.ended = False
        self._part: Part | None = None
        self._field = bytearray()
        self._value = bytearray()
        callbacks: Any = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_end": self._finish,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self._part = Part(headers={})

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.too_large:
            return
        if len(part.data) + (end - start) > self.max_part_bytes:
            part.too_large = True
            part.data = bytearray()
            return
        part.data.extend(data[start:end])

    def _header_end(self) -> None:
        assert self._part is not None
        name = self._field.decode("latin-1").strip().lower()
        self._part.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        if self._part is not None:
            self.complete.append(self._part)
            self._part = None

    def _finish(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> list[Part]:
        """Parse ``chunk``; return the parts it completed."""
        try:
            self.parser.write(chunk)
        except Exception as exc:  # python-multipart raises its own parse errors
            raise StowError(400, f"malformed multipart body: {exc}") from exc
        done, self.complete = self.complete, []
        return done


def sop_reference(result: IngestResult) -> dict[str, Any]:
    """Referenced SOP Class and Instance UIDs of a stored (or refused) object."""
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [result.sop_class_uid]}
    if result.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [result.sop_instance_uid]}
    return item


def failure_reason(result: IngestResult) -> int | None:
    if result.status is IngestStatus.REJECTED:
        return CANNOT_UNDERSTAND
    if result.status is IngestStatus.DUPLICATE and result.reason and "kept" in result.reason:
        return DUPLICATE_SOP_INSTANCE
    return None
