"""The nonces the query WebService has taken, so that a replayed request is refused by
every server process, not only the one that saw it first."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class WebServiceNonce(Base):
    """One request nonce of one client, kept until the request's timestamp leaves the
    accepted window (after that the timestamp check refuses the request anyway)."""

    __tablename__ = "webservice_nonce"
    __table_args__ = (UniqueConstraint("client_id", "nonce"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    """The API client (``api_client.name``) that sent the request."""
    nonce: Mapped[str] = mapped_column(String(32))
    """The request's nonce as sent (base64url of 12 bytes)."""
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    """When the row may go: the request timestamp plus the allowed clock skew."""
