"""Password hashing: argon2id by default, PBKDF2-HMAC-SM3 where commercial cryptography is
required. The stored string names its algorithm and parameters, so both verify side by side
and a changed setting re-hashes at the next successful login."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cloudfilm.config import PasswordKdf, SecuritySettings

_SM3_PREFIX = "pbkdf2-sm3$"


class Hasher:
    def __init__(self, settings: SecuritySettings) -> None:
        self.kdf = settings.password_kdf
        self.iterations = settings.pbkdf2_iterations
        self._argon2 = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        # Verified against when the user does not exist, so that an unknown name costs
        # the same time as a wrong password.
        self.decoy = self.hash(base64.b64encode(os.urandom(18)).decode())

    def hash(self, password: str) -> str:
        if self.kdf is PasswordKdf.PBKDF2_SM3:
            salt = os.urandom(16)
            digest = hashlib.pbkdf2_hmac("sm3", password.encode("utf-8"), salt, self.iterations)
            return f"{_SM3_PREFIX}{self.iterations}${salt.hex()}${digest.hex()}"
        return self._argon2.hash(password)

    def verify(self, stored: str, password: str) -> bool:
        if stored.startswith(_SM3_PREFIX):
            try:
                _, iterations, salt, digest = stored.split("$")
                computed = hashlib.pbkdf2_hmac(
                    "sm3", password.encode("utf-8"), bytes.fromhex(salt), int(iterations)
                )
            except ValueError:
                return False
            return hmac.compare_digest(computed.hex(), digest)
        try:
            return self._argon2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        if self.kdf is PasswordKdf.PBKDF2_SM3:
            return not stored.startswith(f"{_SM3_PREFIX}{self.iterations}$")
        if stored.startswith(_SM3_PREFIX):
            return True
        try:
            return self._argon2.check_needs_rehash(stored)
        except InvalidHashError:
            return True
