"""Storage backends, registered by URL scheme and imported lazily (like pydicom's plugins)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from cloudfilm.storage.base import ObjectInfo, StorageBackend, check_key, new_key

if TYPE_CHECKING:
    from cloudfilm.config import Settings
    from cloudfilm.db import Database

BACKENDS: dict[str, str] = {
    "file": "cloudfilm.storage.filesystem:FilesystemBackend",
    "s3": "cloudfilm.storage.s3:S3Backend",
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


def open_storage(settings: Settings, *, db: Database | None = None) -> StorageBackend:
    """The backend at ``settings.storage_url`` with the options its scheme takes; with
    ``storage.mirror_url`` a :class:`~cloudfilm.storage.mirror.MirroredBackend` over both.

    ``db`` holds the mirror's copy journal and alarms; without it the archive attaches its
    own (:meth:`MirroredBackend.attach`) before the first write. With ``tiers.backends``
    the result is a :class:`~cloudfilm.storage.tiers.TieredStorage` whose online tier is
    the above."""
    storage = settings.storage
    secret = storage.s3_secret_access_key
    primary = _open_with_settings(
        settings.storage_url,
        settings,
        storage.s3_access_key_id,
        secret.get_secret_value() if secret else None,
    )
    from cloudfilm.storage.tiers import open_tiers

    if not storage.mirror_url:
        return open_tiers(settings, primary)
    from cloudfilm.storage.mirror import MirroredBackend, MirrorJournal

    mirror_secret = storage.mirror_s3_secret_access_key or secret
    mirror = _open_with_settings(
        storage.mirror_url,
        settings,
        storage.mirror_s3_access_key_id or storage.s3_access_key_id,
        mirror_secret.get_secret_value() if mirror_secret else None,
    )
    journal = MirrorJournal(db) if db is not None else None
    online = MirroredBackend(primary, mirror, mode=storage.mirror_mode, journal=journal)
    return open_tiers(settings, online)


def _open_with_settings(
    url: str, settings: Settings, key_id: str | None, secret: str | None
) -> StorageBackend:
    storage = settings.storage
    if urlparse(url).scheme == "s3":
        return open_backend(
            url,
            access_key_id=key_id,
            secret_access_key=secret,
            connect_timeout=storage.s3_connect_timeout_seconds,
            read_timeout=storage.s3_read_timeout_seconds,
            request_timeout=storage.s3_request_timeout_seconds,
            max_retries=storage.s3_max_retries,
            retry_timeout=storage.s3_retry_timeout_seconds,
        )
    return open_backend(url, fsync=storage.fsync)


__all__ = [
    "BACKENDS",
    "ObjectInfo",
    "StorageBackend",
    "check_key",
    "new_key",
    "open_backend",
    "open_storage",
]
