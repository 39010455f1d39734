"""Integration clients: hospital systems and viewers that call the HTTP interfaces."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base


class ApiClient(Base):
    __tablename__ = "api_client"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    """Who this client is, e.g. ``ris``, ``ohif``, ``gateway-hospital-a``."""
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 (hex) of the bearer token. The token itself is shown once and never stored."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
