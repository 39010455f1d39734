"""Users, roles, sessions and integration clients.

Roles are data: their permissions, data scope and access rules are JSON columns that
the security administrator edits at run time (:mod:`cloudfilm.auth.roles` validates
them). Secrets are never stored: passwords as argon2id / PBKDF2-SM3 hashes, session and
client tokens as SHA-256 digests, the TOTP seed sealed with the application key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloudfilm.db import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class Department(Base):
    __tablename__ = "department"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    """Short code, matched against the department recorded with a study (e.g. ``心内科``)."""
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Role(Base):
    __tablename__ = "role"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    """Chinese name shown in the console."""
    name_en: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(String(255), default="")
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    """Shipped with the system: may be edited, not deleted."""
    duty: Mapped[str | None] = mapped_column(String(16))
    """``system``, ``security`` or ``audit`` for the three administrator roles; a user holds
    at most one role with a duty (separation of duties)."""
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Functional permissions (:class:`cloudfilm.auth.permissions.Permission` values)."""
    data_scope: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Which studies the permissions reach (:class:`cloudfilm.auth.roles.DataScope`)."""
    access: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """From where and when the role applies (:class:`cloudfilm.auth.roles.AccessRule`)."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class User(Base):
    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(64), default="")
    department_id: Mapped[int | None] = mapped_column(ForeignKey("department.id"), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=True)
    """Set for an initial or administrator-reset password: the next login may only change it."""
    initial_password_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    totp_secret: Mapped[str | None] = mapped_column(String(255))
    """The TOTP seed, sealed (AEAD) with the application key; ``None`` until enrolled."""
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    """Last accepted TOTP time step: a code is good once (no replay within its window)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UserRole(Base):
    __tablename__ = "user_role"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("app_user.id", ondelete="CASCADE"), primary_key=True
    )
    role_id: Mapped[int] = mapped_column(
        ForeignKey("role.id", ondelete="CASCADE"), primary_key=True
    )


class PasswordHistory(Base):
    __tablename__ = "password_history"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id", ondelete="CASCADE"), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UserSession(Base):
    """A server-side web session; the browser holds only the random token."""

    __tablename__ = "user_session"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    """Echoed by the page in ``X-CSRF-Token`` on every state-changing request."""
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    """``mfa`` (second factor pending), ``password`` (must change it) or ``full``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str | None] = mapped_column(String(255))
    user_agent: Mapped[str | None] = mapped_column(String(255))


class SecuritySetting(Base):
    """Run-time security policy (password rules, lockout, sessions), one JSON value per key,
    edited by the security administrator; every change is audited."""

    __tablename__ = "security_setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(64))


class ApiClient(Base):
    """An integration system (RIS, HIS, a viewer, a gateway) calling the HTTP interfaces
    with OAuth2 client credentials."""

    __tablename__ = "api_client"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    """The client id, e.g. ``ris``, ``ohif``, ``gateway-hospital-a``."""
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 (hex) of the client secret. The secret is shown once and never stored."""
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Permissions the client may ask for; its access tokens carry a subset."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """After this the secret no longer yields tokens (``None``: until disabled)."""


class AccessToken(Base):
    """A bearer token issued to a client by ``POST /api/oauth/token``."""

    __tablename__ = "access_token"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    client_id: Mapped[int] = mapped_column(
        ForeignKey("api_client.id", ondelete="CASCADE"), index=True
    )
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
