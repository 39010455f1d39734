"""The message store's bytes sealed at rest.

HL7 messages carry what the patient index keeps sealed (ID-card numbers in PID-3, phone
numbers in PID-13) and more (names, addresses, diagnoses). The store therefore keeps each
message's bytes encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from the
application secret, with the id of that key in front::

    MAGIC | key id (12 ASCII hex) | nonce (12 bytes) | ciphertext and tag

Opened, the bytes are exactly as received. Rows written before sealing was introduced hold
the message itself (it starts with ``MSH``, never with ``MAGIC``) and are read as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.orm import Session

from cloudfilm.config import Settings
from cloudfilm.crypto.keys import SealError, application_secret
from cloudfilm.db import settings_of

MAGIC = b"\x00cf-sealed-1:"
_PURPOSE = b"hl7-message-store-v1"


class _Key:
    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(secret)
        self.aead = AESGCM(key)
        self.key_id = hmac.new(key, b"id", hashlib.sha256).hexdigest()[:12].encode("ascii")


@lru_cache(maxsize=8)
def _key(secret: bytes) -> _Key:
    return _Key(secret)


def seal(settings: Settings, raw: bytes) -> bytes:
    key = _key(application_secret(settings))
    nonce = os.urandom(12)
    return MAGIC + key.key_id + nonce + key.aead.encrypt(nonce, raw, _PURPOSE)


def open_raw(settings: Settings, stored: bytes) -> bytes:
    """The message bytes as received, from what the store holds."""
    if not stored.startswith(MAGIC):
        return stored
    key = _key(application_secret(settings))
    body = stored[len(MAGIC) :]
    if body[:12] != key.key_id:
        raise SealError("the message was sealed under another key (application secret changed)")
    try:
        return key.aead.decrypt(body[12:24], body[24:], _PURPOSE)
    except InvalidTag as exc:
        raise SealError("the stored message was altered") from exc


def seal_for(session: Session, raw: bytes) -> bytes:
    return seal(settings_of(session), raw)


def open_for(session: Session, stored: bytes) -> bytes:
    return open_raw(settings_of(session), stored)
