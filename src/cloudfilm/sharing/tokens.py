"""Entry tokens: 144 random bits, URL-safe, in the QR code of a report or a registration
label. Only a token's SHA-256 is looked up; the token is kept sealed so that a reprint or a
corrected report carries the same QR code as the first print."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.config import Settings
from cloudfilm.crypto.keys import Sealer, application_secret
from cloudfilm.db import settings_of
from cloudfilm.mpi.keys import keys_of
from cloudfilm.sharing.models import EntryToken

_PURPOSE = "entry-token-v1"
TOKEN_BYTES = 18
"""144 bits: more than the 128 the report QR must carry, 24 URL-safe characters."""
PORTAL_ENTRY_PATH = "/m/e/"
"""The patient pages' entry: ``<public url>/m/e/<token>``."""


@lru_cache(maxsize=8)
def _sealer(secret: bytes) -> Sealer:
    return Sealer(secret, _PURPOSE)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def portal_base(settings: Settings) -> str:
    """Where patients reach us: ``http.public_url``, else this server's own address."""
    if settings.http.public_url:
        return settings.http.public_url.rstrip("/")
    return f"http://{settings.http.host}:{settings.http.port}"


def entry_url(settings: Settings, token: str) -> str:
    return portal_base(settings) + PORTAL_ENTRY_PATH + token


def issue(
    session: Session,
    *,
    purpose: str,
    person_id: int | None,
    patient_id: str = "",
    accession_number: str = "",
    study_instance_uid: str = "",
    report_id: int | None = None,
    order_id: int | None = None,
    now: datetime | None = None,
) -> str:
    """The token of this report (or order) for ``purpose``: the existing live one, else a
    new one (flush only: it commits with the caller's transaction)."""
    settings = settings_of(session)
    sealer = _sealer(application_secret(settings))
    query = select(EntryToken).where(EntryToken.purpose == purpose, EntryToken.revoked_at.is_(None))
    if report_id is not None:
        query = query.where(EntryToken.report_id == report_id)
    elif order_id is not None:
        query = query.where(EntryToken.order_id == order_id)
    else:
        raise ValueError("an entry token is for a report or an order")
    now = now or datetime.now(UTC)
    for row in session.scalars(query.order_by(EntryToken.id.desc()).limit(1)):
        if row.expires_at is None or _aware(row.expires_at) > now:
            if row.person_id is None and person_id is not None:
                row.person_id = person_id
            return sealer.open(row.token_sealed)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    days = settings.reports.entry_token_days
    session.add(
        EntryToken(
            token_hash=token_hash(token),
            token_sealed=sealer.seal(token),
            key_id=keys_of(session).key_id,
            purpose=purpose,
            person_id=person_id,
            patient_id=patient_id[:64],
            accession_number=accession_number[:64],
            study_instance_uid=study_instance_uid[:64],
            report_id=report_id,
            order_id=order_id,
            created_at=now,
            expires_at=now + timedelta(days=days) if days else None,
        )
    )
    session.flush()
    return token


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def resolve(session: Session, token: str, *, now: datetime | None = None) -> EntryToken | None:
    """The live entry of ``token``; ``None`` when unknown, expired or revoked."""
    if not token or len(token) > 64:
        return None
    row = session.scalars(
        select(EntryToken).where(EntryToken.token_hash == token_hash(token))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and _aware(row.expires_at) <= (now or datetime.now(UTC)):
        return None
    return row
