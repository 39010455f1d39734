"""Issue and check integration-client tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.auth.models import ApiClient
from cloudfilm.errors import Conflict, NotFound

#: Token prefix: makes leaked tokens recognisable to secret scanners.
TOKEN_PREFIX = "cft_"


def token_hash(token: str) -> str:
    # A 256-bit random token needs no slow KDF: SHA-256 is enough to make the stored
    # value useless to someone who reads the table.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_client(*, session: Session, name: str) -> tuple[ApiClient, str]:
    """A new client and its bearer token (returned once; only its hash is stored)."""
    if session.scalar(select(ApiClient.id).where(ApiClient.name == name)) is not None:
        raise Conflict(f"a client named {name!r} exists; disable it or choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    client = ApiClient(
        name=name, token_hash=token_hash(token), enabled=True, created_at=datetime.now(UTC)
    )
    session.add(client)
    session.flush()
    return client, token


def set_enabled(*, session: Session, name: str, enabled: bool) -> ApiClient:
    client = session.scalars(select(ApiClient).where(ApiClient.name == name)).one_or_none()
    if client is None:
        raise NotFound(f"no client named {name!r}")
    client.enabled = enabled
    return client


def authenticate(*, session: Session, token: str) -> ApiClient | None:
    """The enabled client holding ``token``, or ``None``."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    digest = token_hash(token)
    client = session.scalars(select(ApiClient).where(ApiClient.token_hash == digest)).one_or_none()
    if client is None or not client.enabled or not hmac.compare_digest(client.token_hash, digest):
        return None
    return client
