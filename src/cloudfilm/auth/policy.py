"""The run-time security policy: password rules, lockout and session limits.

Every rule has its switch. The policy is a row of ``security_setting`` that only the
security administrator edits; each change is audited with the old and new values.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from cloudfilm.auth.models import SecuritySetting

POLICY_KEY = "security_policy"


class SecurityPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    strength_enabled: bool = True
    """口令复杂度 · Enforce the character-class rules below."""
    min_length: Annotated[int, Field(ge=8, le=128)] = 8
    """最小长度 · Minimum length (never below 8, switch or not)."""
    require_digit: bool = True
    require_upper: bool = True
    require_lower: bool = True
    require_special: bool = True

    force_change_initial: bool = True
    """首次登录强制修改 · Initial and reset passwords must be changed at the next login."""
    initial_password_hours: Annotated[int, Field(ge=1, le=24 * 30)] = 72
    """An initial or reset password not used within this time no longer works."""

    max_age_enabled: bool = True
    """定期修改 · Force a change when a password is older than ``max_age_days``."""
    max_age_days: Annotated[int, Field(ge=1, le=3650)] = 90

    history_enabled: bool = True
    """Refuse the last ``history_count`` passwords."""
    history_count: Annotated[int, Field(ge=1, le=24)] = 5

    lockout_enabled: bool = True
    """登录失败锁定 · Lock an account after ``lockout_threshold`` failures within
    ``lockout_window_minutes``, for ``lockout_minutes``."""
    lockout_threshold: Annotated[int, Field(ge=1, le=100)] = 5
    lockout_window_minutes: Annotated[int, Field(ge=1, le=1440)] = 15
    lockout_minutes: Annotated[int, Field(ge=5, le=1440)] = 15

    idle_minutes: Annotated[int, Field(ge=1, le=480)] = 30
    """会话空闲超时 · Idle timeout of staff sessions."""
    admin_idle_minutes: Annotated[int, Field(ge=1, le=60)] = 10
    """Idle timeout of sessions of the three administrator roles."""
    session_hours: Annotated[int, Field(ge=1, le=12)] = 12
    """Absolute lifetime of any session."""

    mfa_for_admins: bool = True
    """双因素认证 · The three administrator roles (and roles marked so) need a TOTP code."""


def load(session: Session) -> SecurityPolicy:
    row = session.get(SecuritySetting, POLICY_KEY)
    return parse(row.value if row else None)


def parse(value: dict[str, Any] | str | None) -> SecurityPolicy:
    """The policy from its stored JSON (``None``: the defaults); parsed once per value."""
    if value is None:
        return _parse("{}")
    return _parse(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


@lru_cache(maxsize=8)
def _parse(text: str) -> SecurityPolicy:
    return SecurityPolicy.model_validate_json(text)


def save(
    session: Session, policy: SecurityPolicy, *, actor: str, now: datetime
) -> dict[str, tuple[Any, Any]]:
    """Store ``policy``; return the changed fields as ``{name: (old, new)}``."""
    row = session.get(SecuritySetting, POLICY_KEY, with_for_update=True)
    old = SecurityPolicy.model_validate(row.value) if row else SecurityPolicy()
    value = policy.model_dump()
    if row is None:
        session.add(SecuritySetting(key=POLICY_KEY, value=value, updated_at=now, updated_by=actor))
    else:
        row.value, row.updated_at, row.updated_by = value, now, actor
    before = old.model_dump()
    return {k: (before[k], v) for k, v in value.items() if before[k] != v}


@dataclass(frozen=True, slots=True)
class Weakness:
    code: str
    message: str


_SPECIAL = set(string.punctuation + " ")


def weaknesses(policy: SecurityPolicy, password: str) -> list[Weakness]:
    """What ``password`` lacks under ``policy`` (empty: acceptable)."""
    found = []
    if len(password) < policy.min_length:
        found.append(
            Weakness(
                "too_short",
                f"口令至少 {policy.min_length} 位 · at least {policy.min_length} characters",
            )
        )
    if len(password) > 128:
        found.append(Weakness("too_long", "口令最多 128 位 · at most 128 characters"))
    if policy.strength_enabled:
        rules = (
            (policy.require_digit, str.isdigit, "missing_digit", "须含数字 · needs a digit"),
            (
                policy.require_upper,
                str.isupper,
                "missing_upper",
                "须含大写字母 · needs an upper-case letter",
            ),
            (
                policy.require_lower,
                str.islower,
                "missing_lower",
                "须含小写字母 · needs a lower-case letter",
            ),
            (
                policy.require_special,
                lambda c: c in _SPECIAL,
                "missing_special",
                "须含特殊字符 · needs a special character",
            ),
        )
        for required, test, code, message in rules:
            if required and not any(test(c) for c in password):
                found.append(Weakness(code, message))
    return found
