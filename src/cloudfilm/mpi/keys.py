"""Field encryption and blind indexes for the identifiers that must not be stored in clear:
ID-card numbers and phone numbers.

Each value is sealed with AES-256-GCM (:class:`cloudfilm.crypto.keys.Sealer`, a key
derived from the application secret for this purpose) and stored with the id of the key
that sealed it, so that a later key rotation knows which rows to re-seal. Exact lookup
goes through a blind index: HMAC-SHA256 of the normalised value under a second derived
key. The database then holds neither the number nor an unkeyed hash of it (an 18-digit
ID-card number has little entropy: a plain hash would be reversed by enumeration).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.orm import Session

from cloudfilm.config import Settings
from cloudfilm.crypto.keys import Sealer, application_secret
from cloudfilm.db import settings_of

_SEAL_PURPOSE = "mpi-identifier-v1"
_INDEX_PURPOSE = "mpi-blind-index-v1"


def _derive(secret: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(
        secret
    )


@dataclass(frozen=True, slots=True)
class MPIKeys:
    """The sealing key (with its id) and the blind-index key of one application secret."""

    sealer: Sealer
    key_id: str
    """Names the sealing key without revealing it: 12 hex characters of HMAC(key, "id")."""
    _index_key: bytes

    def seal(self, value: str) -> str:
        return self.sealer.seal(value)

    def open(self, sealed: str) -> str:
        return self.sealer.open(sealed)

    def blind_index(self, kind: str, normalized: str) -> str:
        """HMAC-SHA256 of ``kind:value``: the same number under two kinds never collides."""
        message = f"{kind}:{normalized}".encode()
        return hmac.new(self._index_key, message, hashlib.sha256).hexdigest()


@lru_cache(maxsize=8)
def _keys(secret: bytes) -> MPIKeys:
    seal_key = _derive(secret, _SEAL_PURPOSE)
    key_id = hmac.new(seal_key, b"id", hashlib.sha256).hexdigest()[:12]
    return MPIKeys(Sealer(secret, _SEAL_PURPOSE), key_id, _derive(secret, _INDEX_PURPOSE))


def keys_for(settings: Settings) -> MPIKeys:
    return _keys(application_secret(settings))


def keys_of(session: Session) -> MPIKeys:
    """The keys of the archive ``session`` belongs to (its :class:`~cloudfilm.db.Database`
    puts the settings in ``session.info``)."""
    settings = settings_of(session)
    return keys_for(settings)
