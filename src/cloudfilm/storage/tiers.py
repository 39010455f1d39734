"""Storage tiers: online (``storage.url``, mirrored or not), nearline and offline backends
behind one :class:`~cloudfilm.storage.base.StorageBackend` (a wrapper, after Orthanc's
``StorageAccessor``).

An object lives on exactly one tier at a time, always under the same key, and the index
says which (``instance.storage_name``: ``primary`` for the online tier, else the tier's
name). Migration jobs (:mod:`cloudfilm.archive.tiering`) move objects between tiers;
this wrapper only reads, writes and deletes:

* ``put`` writes to the online tier (ingest);
* reads go to the tier the index names (a ``locate`` callback the archive attaches), then
  to every other tier that is read on request, so a read racing a migration still finds
  the object; an object on a tier with ``online_reads = false`` is never read on request:
  :class:`~cloudfilm.errors.RecallNeeded` is raised (after the ``on_recall`` callback
  started a recall job);
* ``delete`` removes the key from every tier (purges after deletion, replaced objects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import urlparse

from cloudfilm.errors import NotFound, RecallNeeded, StorageUnavailable
from cloudfilm.storage.base import ObjectInfo, StorageBackend

if TYPE_CHECKING:
    from cloudfilm.config import Settings

logger = logging.getLogger(__name__)

ONLINE = "online"
"""The name users and policies give the online tier (``storage.url``)."""
PRIMARY = "primary"
"""The ``instance.storage_name`` of objects on the online tier (kept from before tiers)."""

_T = TypeVar("_T")


def storage_name_of(tier: str) -> str:
    """``instance.storage_name`` of objects on ``tier``."""
    return PRIMARY if tier == ONLINE else tier


def tier_of(storage_name: str) -> str:
    """The tier name of an ``instance.storage_name``."""
    return ONLINE if storage_name == PRIMARY else storage_name


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    backend: StorageBackend
    online_reads: bool = True


Locate = Callable[[str], str | None]
"""storage key → ``instance.storage_name`` from the index (``None``: not indexed)."""
OnRecall = Callable[[str, str], tuple[str | None, int | None]]
"""(key, tier) → (Study Instance UID, recall job id): start a recall of the key's study."""


class TieredStorage:
    """The online backend plus named lower tiers, read through the index's locations."""

    def __init__(
        self,
        online: StorageBackend,
        tiers: list[Tier],
        *,
        retry_after: int = 30,
    ) -> None:
        self.online = online
        self.url = online.url
        self.tiers: dict[str, Tier] = {ONLINE: Tier(ONLINE, online), **{t.name: t for t in tiers}}
        self.retry_after = retry_after
        self.locate: Locate | None = None
        self.on_recall: OnRecall | None = None

    def attach(self, locate: Locate, on_recall: OnRecall) -> None:
        """Wire the index: where each key lives, and how to start a recall."""
        self.locate = locate
        self.on_recall = on_recall

    def backend(self, tier: str) -> StorageBackend:
        try:
            return self.tiers[tier].backend
        except KeyError:
            raise NotFound(
                f"no storage tier {tier!r}; configured: {', '.join(self.tiers)}"
            ) from None

    def offline_tiers(self) -> set[str]:
        return {name for name, t in self.tiers.items() if not t.online_reads}

    # ------------------------------------------------------------------ StorageBackend

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        self.online.put(key, data)

    def open(self, key: str) -> BinaryIO:
        return self._read(key, lambda b: b.open(key))

    def read(self, key: str) -> bytes:
        return self._read(key, lambda b: b.read(key))

    def open_range(self, key: str, start: int, end: int) -> bytes:
        return self._read(key, lambda b: b.open_range(key, start, end))

    def stat(self, key: str) -> ObjectInfo:
        return self._read(key, lambda b: b.stat(key))

    def delete(self, key: str) -> None:
        """Remove the key from every tier; an unreachable tier fails the delete (so a purge
        is retried rather than leaving bytes behind unnoticed)."""
        for tier in self.tiers.values():
            tier.backend.delete(key)

    def iter_objects(self) -> Iterator[ObjectInfo]:
        """The online tier's objects (what the orphan sweep and the scrub of the online
        tier look at; lower tiers are inventoried per tier through :meth:`backend`)."""
        return self.online.iter_objects()

    def sweep_temporary(self, max_age_seconds: float) -> int:
        swept = 0
        for tier in self.tiers.values():
            try:
                swept += tier.backend.sweep_temporary(max_age_seconds)
            except StorageUnavailable:
                logger.warning("tier %s unreachable while sweeping temporary files", tier.name)
        return swept

    # ------------------------------------------------------------------ reads

    def _read(self, key: str, action: Callable[[StorageBackend], _T]) -> _T:
        named = self.locate(key) if self.locate is not None else None
        first = tier_of(named) if named else ONLINE
        order = [first] + [n for n in self.tiers if n != first]
        offline_hit: str | None = None
        error: StorageUnavailable | None = None
        for name in order:
            tier = self.tiers.get(name)
            if tier is None:
                continue
            if not tier.online_reads:
                # Never touched on request; the index (or nothing else) says it is there.
                if name == first and named is not None:
                    offline_hit = name
                continue
            try:
                return action(tier.backend)
            except NotFound:
                continue
            except RecallNeeded:
                raise
            except StorageUnavailable as exc:
                error = exc
                continue
        if offline_hit is not None:
            raise self.recall_error(key, offline_hit)
        if error is not None:
            raise error
        raise NotFound(f"object {key} is missing from every storage tier")

    def recall_error(self, key: str, tier: str) -> RecallNeeded:
        study, job = (None, None)
        if self.on_recall is not None:
            study, job = self.on_recall(key, tier)
        return RecallNeeded(
            key, tier, study_instance_uid=study, job_id=job, retry_after=self.retry_after
        )


def open_tiers(settings: Settings, online: StorageBackend) -> StorageBackend:
    """``online`` wrapped with the tiers of ``settings.tiers.backends``; ``online`` itself
    when none are configured (no behaviour change for a one-tier archive)."""
    from cloudfilm.storage import _open_with_settings

    configured = settings.tiers.backends
    if not configured:
        return online
    storage = settings.storage
    tiers = []
    for name, tier in configured.items():
        secret = tier.s3_secret_access_key or storage.s3_secret_access_key
        key_id = tier.s3_access_key_id or storage.s3_access_key_id
        backend = _open_with_settings(
            tier.url, settings, key_id, secret.get_secret_value() if secret else None
        )
        tiers.append(Tier(name, backend, tier.online_reads))
        logger.info("storage tier %s at %s", name, urlparse(tier.url).scheme)
    return TieredStorage(online, tiers, retry_after=settings.tiers.recall_retry_after_seconds)


def online_backend(storage: StorageBackend) -> StorageBackend:
    """The online tier's backend of the archive's storage (itself without tiers)."""
    return storage.online if isinstance(storage, TieredStorage) else storage
