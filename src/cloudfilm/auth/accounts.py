"""Staff accounts: creation, passwords, login with lockout and second factor, sessions.

Everything here takes ``now`` from the injected clock, so that tests move time to check
password ageing, lockout windows and session timeouts.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyotp
from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.orm import Session

from cloudfilm.auth import policy as policies
from cloudfilm.auth.models import (
    Department,
    PasswordHistory,
    Role,
    SecuritySetting,
    User,
    UserRole,
    UserSession,
)
from cloudfilm.auth.passwords import Hasher
from cloudfilm.auth.principal import Stage
from cloudfilm.auth.roles import check_separation
from cloudfilm.clock import Clock, as_utc
from cloudfilm.config import Settings
from cloudfilm.crypto.keys import Sealer, SealError, application_secret
from cloudfilm.db import Database
from cloudfilm.errors import CloudFilmError, Conflict, NotFound

TOTP_ISSUER = "云胶片 Cloud Film"


class LoginFailed(CloudFilmError):
    """Refused login. ``code`` is ``invalid_credentials`` for unknown user, wrong password
    and locked account alike, so that the answer does not tell them apart."""

    def __init__(self, code: str, message: str, username: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.username = username


INVALID = "用户名或密码错误，或账户已锁定 · wrong user name or password, or account locked"


class WeakPassword(CloudFilmError):
    def __init__(self, codes: list[str], message: str) -> None:
        super().__init__(message)
        self.codes = codes
        self.message = message


def session_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def new_secret_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def one_time_password(length: int = 16) -> str:
    """A random initial password of ``length`` (≥ 16) characters that satisfies every
    strength rule."""
    alphabet = string.ascii_letters + string.digits
    core = [secrets.choice(alphabet) for _ in range(max(length, 16) - 4)]
    core += [
        secrets.choice(string.ascii_uppercase),
        secrets.choice(string.ascii_lowercase),
        secrets.choice(string.digits),
        secrets.choice("!@#%^*-_=+"),
    ]
    secrets.SystemRandom().shuffle(core)
    return "".join(core)


_POLICY = (
    select(SecuritySetting.value)
    .where(SecuritySetting.key == policies.POLICY_KEY)
    .scalar_subquery()
)
#: One round trip per request: the session, its user and department, one row per role
#: (or one row with empty role columns), and the stored policy.
_SESSION = (
    select(
        UserSession.id,
        UserSession.stage,
        UserSession.csrf_token,
        UserSession.last_seen_at,
        UserSession.expires_at,
        User.id.label("user_id"),
        User.username,
        User.display_name,
        User.enabled,
        Department.code.label("department"),
        Role.code,
        Role.duty,
        Role.permissions,
        Role.data_scope,
        Role.access,
        _POLICY.label("policy"),
    )
    .join(User, UserSession.user_id == User.id)
    .outerjoin(Department, User.department_id == Department.id)
    .outerjoin(UserRole, UserRole.user_id == User.id)
    .outerjoin(Role, Role.id == UserRole.role_id)
    .where(UserSession.token_hash == bindparam("digest"))
    .order_by(Role.id)
)


@dataclass(frozen=True, slots=True)
class LiveSession:
    row: Any
    """A row: session id, stage, CSRF token, times; the user's id, name, department code."""
    roles: list[Any]
    expired: bool
    stale: bool
    """``last_seen_at`` is old enough to be worth a write."""


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str
    csrf_token: str
    row: UserSession


class Accounts:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.hasher = Hasher(settings.security)
        self._totp = Sealer(application_secret(settings), "totp-seed")

    # ------------------------------------------------------------------ accounts

    def roles_of(self, session: Session, user_id: int) -> list[Role]:
        return list(
            session.scalars(
                select(Role)
                .join(UserRole, UserRole.role_id == Role.id)
                .where(UserRole.user_id == user_id)
            )
        )

    def create_user(
        self,
        session: Session,
        *,
        username: str,
        display_name: str = "",
        department: str | None = None,
        roles: list[str] | None = None,
        password: str | None = None,
    ) -> tuple[User, str]:
        """A new account with an initial password (``password`` or a random one, returned
        once) that must be changed at the first login and expires unused."""
        now = self.clock.now()
        if session.scalar(select(User.id).where(User.username == username)) is not None:
            raise Conflict(f"用户名已存在 · user name {username!r} is taken")
        policy = policies.load(session)
        initial = password if password is not None else one_time_password(policy.min_length)
        self.check_strength(policy, initial)
        user = User(
            username=username,
            display_name=display_name,
            department_id=self.department_id(session, department),
            enabled=True,
            password_hash=self.hasher.hash(initial),
            password_changed_at=now,
            must_change_password=True,
            initial_password_expires_at=now + timedelta(hours=policy.initial_password_hours),
            failed_logins=0,
            totp_enabled=False,
            created_at=now,
            updated_at=now,
        )
        session.add(user)
        session.flush()
        self.set_roles(session, user, roles or [])
        return user, initial

    def department_id(self, session: Session, code: str | None) -> int | None:
        if not code:
            return None
        found = session.scalar(select(Department.id).where(Department.code == code))
        if found is None:
            raise NotFound(f"没有此科室 · no department {code!r}")
        return found

    def set_roles(self, session: Session, user: User, codes: list[str]) -> list[Role]:
        """Replace the user's roles (separation of duties enforced); a change of privilege
        ends the user's sessions."""
        roles = list(session.scalars(select(Role).where(Role.code.in_(codes)))) if codes else []
        missing = set(codes) - {r.code for r in roles}
        if missing:
            raise NotFound(f"没有此角色 · no role {', '.join(sorted(missing))}")
        check_separation(roles)
        current = {r.id for r in self.roles_of(session, user.id)}
        if current != {r.id for r in roles}:
            session.execute(delete(UserRole).where(UserRole.user_id == user.id))
            session.add_all(UserRole(user_id=user.id, role_id=r.id) for r in roles)
            self.end_sessions(session, user.id)
        session.flush()
        return roles

    def reset_password(self, session: Session, user: User) -> str:
        """A new one-time password (returned once); the user must change it at next login."""
        now = self.clock.now()
        policy = policies.load(session)
        initial = one_time_password(policy.min_length)
        self._store_password(session, user, initial, now)
        user.must_change_password = True
        user.initial_password_expires_at = now + timedelta(hours=policy.initial_password_hours)
        user.failed_logins, user.first_failed_at, user.locked_until = 0, None, None
        self.end_sessions(session, user.id)
        return initial

    def unlock(self, user: User) -> None:
        user.failed_logins, user.first_failed_at, user.locked_until = 0, None, None

    def set_enabled(self, session: Session, user: User, enabled: bool) -> None:
        user.enabled = enabled
        user.updated_at = self.clock.now()
        if not enabled:
            self.end_sessions(session, user.id)

    def end_sessions(self, session: Session, user_id: int) -> None:
        session.execute(delete(UserSession).where(UserSession.user_id == user_id))

    def end_other_sessions(self, session: Session, user_id: int, keep: int | None) -> None:
        session.execute(
            delete(UserSession).where(UserSession.user_id == user_id, UserSession.id != keep)
        )

    # ------------------------------------------------------------------ passwords

    @staticmethod
    def check_strength(policy: policies.SecurityPolicy, password: str) -> None:
        found = policies.weaknesses(policy, password)
        if found:
            raise WeakPassword(
                [w.code for w in found],
                "口令不符合安全策略 · password does not meet the policy: "
                + "; ".join(w.message for w in found),
            )

    def change_password(self, session: Session, user: User, current: str, new: str) -> None:
        """Change the own password: the current one must be right, the new one meet the
        policy and differ from the current and the last N."""
        now = self.clock.now()
        policy = policies.load(session)
        if not self.hasher.verify(user.password_hash, current):
            raise WeakPassword(["wrong_current"], "当前口令错误 · the current password is wrong")
        self.check_strength(policy, new)
        recent = [user.password_hash]
        if policy.history_enabled:
            recent += list(
                session.scalars(
                    select(PasswordHistory.password_hash)
                    .where(PasswordHistory.user_id == user.id)
                    .order_by(PasswordHistory.id.desc())
                    .limit(policy.history_count - 1)  # the current one is the N-th
                )
            )
        if any(self.hasher.verify(old, new) for old in recent):
            raise WeakPassword(
                ["reused"],
                f"不能与最近 {policy.history_count} 次口令相同 · must differ from the last "
                f"{policy.history_count} passwords",
            )
        self._store_password(session, user, new, now)
        user.must_change_password = False
        user.initial_password_expires_at = None

    def _store_password(self, session: Session, user: User, password: str, now: datetime) -> None:
        session.add(
            PasswordHistory(user_id=user.id, password_hash=user.password_hash, created_at=now)
        )
        user.password_hash = self.hasher.hash(password)
        user.password_changed_at = now
        user.updated_at = now

    def password_change_due(self, policy: policies.SecurityPolicy, user: User) -> str | None:
        """``initial`` or ``expired`` when the next step must be a password change."""
        if user.must_change_password and policy.force_change_initial:
            return "initial"
        age = self.clock.now() - as_utc(user.password_changed_at)
        if policy.max_age_enabled and age > timedelta(days=policy.max_age_days):
            return "expired"
        return None

    # ------------------------------------------------------------------ login

    def check_password(self, session: Session, username: str, password: str) -> User:
        """The user if ``password`` is right and the account usable; else :class:`LoginFailed`
        (with the same message whether the name is unknown, the password wrong or the
        account locked). Failures count towards the lockout."""
        now = self.clock.now()
        policy = policies.load(session)
        user = session.scalars(
            select(User).where(User.username == username[:64]).with_for_update()
        ).one_or_none()
        if user is None:
            self.hasher.verify(self.hasher.decoy, password)
            raise LoginFailed("invalid_credentials", INVALID, username)
        right = self.hasher.verify(user.password_hash, password)
        locked = (
            policy.lockout_enabled
            and user.locked_until is not None
            and as_utc(user.locked_until) > now
        )
        if locked or not user.enabled:
            raise LoginFailed("invalid_credentials", INVALID, username)
        if not right:
            self.count_failure(policy, user)
            raise LoginFailed("invalid_credentials", INVALID, username)
        if (
            user.must_change_password
            and user.initial_password_expires_at is not None
            and as_utc(user.initial_password_expires_at) <= now
        ):
            raise LoginFailed(
                "initial_password_expired",
                "初始口令已过期，请联系管理员重置 · the initial password has expired; ask an "
                "administrator to reset it",
                username,
            )
        user.failed_logins, user.first_failed_at, user.locked_until = 0, None, None
        if self.hasher.needs_rehash(user.password_hash):
            user.password_hash = self.hasher.hash(password)
        return user

    def count_failure(self, policy: policies.SecurityPolicy, user: User) -> None:
        """One more failed password or second-factor code; lock at the threshold."""
        now = self.clock.now()
        window = timedelta(minutes=policy.lockout_window_minutes)
        if user.first_failed_at is None or now - as_utc(user.first_failed_at) > window:
            user.first_failed_at, user.failed_logins = now, 1
        else:
            user.failed_logins += 1
        if policy.lockout_enabled and user.failed_logins >= policy.lockout_threshold:
            user.locked_until = now + timedelta(minutes=policy.lockout_minutes)
            user.failed_logins, user.first_failed_at = 0, None

    def needs_mfa(self, session: Session, policy: policies.SecurityPolicy, user: User) -> bool:
        if user.totp_enabled:
            return True
        return policy.mfa_for_admins and any(r.duty for r in self.roles_of(session, user.id))

    def first_stage(self, session: Session, user: User) -> Stage:
        policy = policies.load(session)
        if self.needs_mfa(session, policy, user):
            return Stage.MFA
        return self.after_mfa(policy, user)

    def after_mfa(self, policy: policies.SecurityPolicy, user: User) -> Stage:
        return Stage.PASSWORD if self.password_change_due(policy, user) else Stage.FULL

    # ------------------------------------------------------------------ second factor

    def begin_totp(self, user: User) -> str:
        """A new TOTP seed for ``user`` (sealed at rest); active once a code confirms it."""
        seed = pyotp.random_base32()
        user.totp_secret = self._totp.seal(seed)
        user.totp_enabled = False
        user.totp_last_step = None
        return pyotp.TOTP(seed).provisioning_uri(name=user.username, issuer_name=TOTP_ISSUER)

    def check_totp(self, user: User, code: str) -> bool:
        """``code`` is valid now (±1 step) and newer than the last accepted one: a code
        works once."""
        if not user.totp_secret or not code.isdigit() or len(code) != 6:
            return False
        try:
            seed = self._totp.open(user.totp_secret)
        except SealError:
            return False
        totp = pyotp.TOTP(seed)
        now = self.clock.now()
        step_now = int(now.timestamp()) // totp.interval
        for step in (step_now - 1, step_now, step_now + 1):
            if secrets.compare_digest(totp.generate_otp(step), code):
                if user.totp_last_step is not None and step <= user.totp_last_step:
                    return False
                user.totp_last_step = step
                return True
        return False

    # ------------------------------------------------------------------ sessions

    def open_session(
        self, session: Session, user: User, stage: Stage, *, source: str | None, user_agent: str
    ) -> NewSession:
        now = self.clock.now()
        policy = policies.load(session)
        token, csrf = new_secret_token(), new_secret_token()
        row = UserSession(
            token_hash=session_token_hash(token),
            csrf_token=csrf,
            user_id=user.id,
            stage=stage.value,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(hours=policy.session_hours),
            source=source,
            user_agent=user_agent[:255],
        )
        session.add(row)
        session.flush()
        return NewSession(token, csrf, row)

    def rotate(self, session: Session, row: UserSession, stage: Stage) -> NewSession:
        """New token and CSRF token for the same session (at every privilege change)."""
        token, csrf = new_secret_token(), new_secret_token()
        session.execute(
            update(UserSession)
            .where(UserSession.id == row.id)
            .values(token_hash=session_token_hash(token), csrf_token=csrf, stage=stage.value)
        )
        row.token_hash, row.csrf_token, row.stage = session_token_hash(token), csrf, stage.value
        return NewSession(token, csrf, row)

    def end_session(self, session: Session, token: str) -> None:
        session.execute(
            delete(UserSession).where(UserSession.token_hash == session_token_hash(token))
        )

    def live_session(self, db: Database, token: str) -> LiveSession | None:
        """The session behind ``token``, its user and roles, and whether it has expired
        (idle too long, too old, or its user disabled). One indexed read, no ORM: this
        runs for every request of a signed-in user. The caller
        deletes an expired session and refreshes ``last_seen_at`` in a write
        transaction."""
        if not token or len(token) > 128:
            return None
        rows = db.read_once(_SESSION, {"digest": session_token_hash(token)})
        if not rows:
            return None
        row = rows[0]
        roles = [r for r in rows if r.code is not None]
        policy = policies.parse(row.policy)
        now = self.clock.now()
        idle = policy.admin_idle_minutes if any(r.duty for r in roles) else policy.idle_minutes
        seen = as_utc(row.last_seen_at)
        expired = (
            not row.enabled or as_utc(row.expires_at) <= now or now - seen > timedelta(minutes=idle)
        )
        return LiveSession(row, roles, expired, now - seen > timedelta(seconds=15))

    @staticmethod
    def touch(session: Session, live: LiveSession, now: datetime) -> None:
        """Delete the session if it expired, else refresh ``last_seen_at`` if stale."""
        if live.expired:
            session.execute(delete(UserSession).where(UserSession.id == live.row.id))
        elif live.stale:
            session.execute(
                update(UserSession).where(UserSession.id == live.row.id).values(last_seen_at=now)
            )

    def department_code(self, session: Session, user: User) -> str | None:
        if user.department_id is None:
            return None
        return session.scalar(select(Department.code).where(Department.id == user.department_id))
