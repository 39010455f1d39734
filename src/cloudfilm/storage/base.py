"""The storage interface: a tiny key → bytes store (after Orthanc's ``IStorageArea``).

Objects are addressed by keys that the archive makes itself (:func:`new_key`), never by
DICOM UIDs, so no value sent by a modality ever becomes part of a path. Compression,
mirroring and tiers wrap backends; they do not live inside them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

_KEY = re.compile(r"^[a-z0-9]+(?:/[a-z0-9]+)*\.[a-z0-9]+$")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime


class StorageBackend(Protocol):
    """Where bytes live. Every method raises ``StorageUnavailable`` when the device fails."""

    url: str

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Store ``data`` under ``key`` durably: when this returns the bytes survive a crash."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open the object for reading; ``NotFound`` when it is absent."""
        ...

    def read(self, key: str) -> bytes:
        """The whole object."""
        ...

    def open_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the object."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are not an error."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time; ``NotFound`` when absent."""
        ...

    def iter_objects(self) -> Iterator[ObjectInfo]:
        """Every object stored (for scrubbing and inventories)."""
        ...

    def sweep_temporary(self, max_age_seconds: float) -> int:
        """Remove abandoned partial uploads; return how many were removed."""
        ...


def new_key(suffix: str = "dcm") -> str:
    """A fresh object key: date prefix for humans and tiering, 128 random bits for uniqueness."""
    token = secrets.token_hex(16)
    day = datetime.now(UTC).strftime("%Y%m%d")
    return f"{day}/{token[:2]}/{token[2:4]}/{token}.{suffix}"


def check_key(key: str) -> str:
    """Refuse anything but the keys :func:`new_key` makes (no ``..``, no absolute paths)."""
    if not _KEY.fullmatch(key) or len(key) > 200:
        raise ValueError(f"not a storage key: {key!r}")
    return key
