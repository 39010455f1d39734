"""Integration clients: OAuth2 client credentials (RFC 6749 4.4).

A client holds a secret (shown once, stored as SHA-256) and a set of scopes (permission
names). ``POST /api/oauth/token`` trades the secret for a short-lived bearer token whose
scopes are the requested subset. Disabling a client revokes its tokens at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from cloudfilm.auth.models import AccessToken, ApiClient
from cloudfilm.auth.permissions import Permission
from cloudfilm.clock import as_utc
from cloudfilm.db import Database
from cloudfilm.errors import Conflict, NotFound, PermissionDenied

#: Prefixes make leaked credentials recognisable to secret scanners.
SECRET_PREFIX = "cfs_"
TOKEN_PREFIX = "cft_"

#: What a client may be given: the study permissions, never administration.
CLIENT_SCOPES = frozenset(
    {
        Permission.STUDY_SEARCH,
        Permission.STUDY_READ,
        Permission.STUDY_DOWNLOAD,
        Permission.STUDY_STORE,
        Permission.ARCHIVE_STATS,
        Permission.PATIENT_READ,
        Permission.PATIENT_MERGE,
    }
)
#: A kiosk's one scope: asked for explicitly (``--scope kiosk:print``), never by default,
#: and never together with another scope (a device in the lobby reads no studies).
KIOSK_SCOPES = frozenset({Permission.KIOSK_PRINT})


def token_hash(token: str) -> str:
    # A 256-bit random value needs no slow KDF: SHA-256 makes the stored digest useless to
    # someone who reads the table.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _scopes(values: Iterable[str]) -> list[Permission]:
    result = []
    for value in values:
        try:
            permission = Permission(value)
        except ValueError:
            raise Conflict(f"unknown scope {value!r}") from None
        if permission not in CLIENT_SCOPES | KIOSK_SCOPES:
            raise Conflict(f"scope {value!r} cannot be given to an integration client")
        result.append(permission)
    if KIOSK_SCOPES & set(result) and not set(result) <= KIOSK_SCOPES:
        raise Conflict(
            "自助打印机客户端只能持有 kiosk:print · a kiosk client holds kiosk:print alone"
        )
    return sorted(set(result))


def create_client(
    *,
    session: Session,
    name: str,
    now: datetime,
    scopes: Iterable[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiClient, str]:
    """A new client and its secret (returned once; only its hash is stored)."""
    if session.scalar(select(ApiClient.id).where(ApiClient.name == name)) is not None:
        raise Conflict(f"a client named {name!r} exists; disable it or choose another name")
    granted = _scopes(scopes) if scopes is not None else sorted(CLIENT_SCOPES)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    client = ApiClient(
        name=name,
        token_hash=token_hash(secret),
        scopes=[s.value for s in granted],
        enabled=True,
        created_at=now,
        expires_at=expires_at,
    )
    session.add(client)
    session.flush()
    return client, secret


def set_enabled(*, session: Session, name: str, enabled: bool) -> ApiClient:
    client = session.scalars(select(ApiClient).where(ApiClient.name == name)).one_or_none()
    if client is None:
        raise NotFound(f"no client named {name!r}")
    client.enabled = enabled
    if not enabled:
        session.execute(delete(AccessToken).where(AccessToken.client_id == client.id))
    return client


def issue_token(
    *,
    session: Session,
    client: ApiClient,
    now: datetime,
    minutes: int,
    scopes: Iterable[str] | None = None,
) -> tuple[str, AccessToken]:
    """A bearer token for ``client`` with the requested subset of its scopes."""
    allowed = set(client.scopes)
    wanted = set(scopes) if scopes is not None else allowed
    if not wanted <= allowed:
        raise PermissionDenied(
            f"scope not granted to this client: {' '.join(sorted(wanted - allowed))}"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = AccessToken(
        token_hash=token_hash(token),
        client_id=client.id,
        scopes=sorted(wanted),
        created_at=now,
        expires_at=now + timedelta(minutes=minutes),
    )
    session.add(row)
    session.execute(delete(AccessToken).where(AccessToken.expires_at < now))
    session.flush()
    return token, row


def client_for_secret(
    *, session: Session, name: str, secret: str, now: datetime
) -> ApiClient | None:
    """The enabled, unexpired client ``name`` if ``secret`` is its secret."""
    client = session.scalars(select(ApiClient).where(ApiClient.name == name)).one_or_none()
    digest = token_hash(secret) if secret.startswith(SECRET_PREFIX) and len(secret) < 128 else ""
    if client is None or not hmac.compare_digest(client.token_hash, digest):
        return None
    if not client.enabled or (client.expires_at is not None and as_utc(client.expires_at) <= now):
        return None
    return client


@dataclass(frozen=True, slots=True)
class TokenHolder:
    client: str
    scopes: frozenset[Permission]


def authenticate(*, db: Database, token: str, now: datetime) -> TokenHolder | None:
    """The client behind a live bearer token, with the token's scopes (one indexed read)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    rows = db.read_once(_TOKEN, {"digest": token_hash(token)})
    row = rows[0] if rows else None
    if row is None or not row.enabled or as_utc(row.expires_at) <= now:
        return None
    return TokenHolder(row.name, frozenset(Permission(s) for s in row.scopes if s in _KNOWN))


_TOKEN = (
    select(ApiClient.name, ApiClient.enabled, AccessToken.scopes, AccessToken.expires_at)
    .join(ApiClient, AccessToken.client_id == ApiClient.id)
    .where(AccessToken.token_hash == bindparam("digest"))
)
_KNOWN = {p.value for p in Permission}
