"""Sealing and the blind index of the outbox's personal data, under keys derived
(HKDF-SHA256) from the application secret for this purpose only."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfilm.config import Settings
from cloudfilm.crypto.keys import Sealer, application_secret

_SEAL_PURPOSE = "notify-outbox-v1"
_INDEX_PURPOSE = "notify-blind-index-v1"


@dataclass(frozen=True, slots=True)
class NotifyKeys:
    sealer: Sealer
    _index_key: bytes

    def seal(self, value: str) -> str:
        return self.sealer.seal(value)

    def open(self, sealed: str) -> str:
        return self.sealer.open(sealed)

    def blind_index(self, channel: str, recipient: str) -> str:
        message = f"{channel}:{recipient}".encode()
        return hmac.new(self._index_key, message, hashlib.sha256).hexdigest()


@lru_cache(maxsize=8)
def _keys(secret: bytes) -> NotifyKeys:
    index_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_INDEX_PURPOSE.encode()
    ).derive(secret)
    return NotifyKeys(Sealer(secret, _SEAL_PURPOSE), index_key)


def keys_for(settings: Settings) -> NotifyKeys:
    return _keys(application_secret(settings))
