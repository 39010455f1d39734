"""Storage backends, registered by URL scheme and imported lazily (like pydicom's plugins)."""

from __future__ import annotations

import importlib
from typing import Any, cast
from urllib.parse import urlparse

from cloudfilm.storage.base import ObjectInfo, StorageBackend, check_key, new_key

BACKENDS: dict[str, str] = {
    "file": "cloudfilm.storage.filesystem:FilesystemBackend",
}


def open_backend(url: str, **options: Any) -> StorageBackend:
    """The backend for ``url``, e.g. ``file:///srv/cloudfilm/storage``."""
    scheme = urlparse(url).scheme
    try:
        target = BACKENDS[scheme]
    except KeyError:
        raise ValueError(
            f"no storage backend for {scheme!r} URLs; known schemes: {', '.join(BACKENDS)}"
        ) from None
    module_name, _, class_name = target.partition(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return cast(StorageBackend, backend_cls(url, **options))


__all__ = ["BACKENDS", "ObjectInfo", "StorageBackend", "check_key", "new_key", "open_backend"]
