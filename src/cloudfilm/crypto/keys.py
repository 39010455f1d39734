"""The application key and authenticated encryption of small secrets.

The key is ``secret_key`` from the settings (required in production). Without it the
embedded install keeps a random key in ``<data_dir>/secret.key`` (mode 0600), so that
sealed values survive a restart.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfilm.config import Settings

_PREFIX = "v1.aesgcm."


class SealError(ValueError):
    """A sealed value that does not open: altered, or sealed under another key."""


def application_secret(settings: Settings) -> bytes:
    if "CLOUDFILM_SECRET_KEY" in os.environ or "secret_key" in settings.model_fields_set:
        return settings.secret_key.get_secret_value().encode("utf-8")
    path = Path(settings.data_dir) / "secret.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48).encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


class Sealer:
    """AES-256-GCM under a key derived (HKDF-SHA256) from the application secret for one
    purpose; the purpose is also bound as associated data."""

    def __init__(self, secret: bytes, purpose: str) -> None:
        self._purpose = purpose.encode("utf-8")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=self._purpose).derive(
            secret
        )
        self._aead = AESGCM(key)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), self._purpose)
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, value: str) -> str:
        if not value.startswith(_PREFIX):
            raise SealError("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(value[len(_PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], self._purpose).decode("utf-8")
        except (InvalidTag, ValueError) as exc:
            raise SealError("sealed value altered or sealed under another key") from exc
