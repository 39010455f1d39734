"""First start: the built-in roles and the three administrators.

A fresh install has no default password. Each administrator gets a random one-time
password (or the operator's ``security.initial_admin_password``) that is printed once,
expires unused after the policy's ``initial_password_hours`` and must be changed at the
first login, after enrolling an authenticator app.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloudfilm.auth.accounts import Accounts
from cloudfilm.auth.models import Department, User
from cloudfilm.auth.roles import seed_builtin_roles

FIRST_ADMINS = (
    ("sysadmin", "系统管理员", "sysadmin"),
    ("secadmin", "安全管理员", "secadmin"),
    ("auditadmin", "审计管理员", "auditadmin"),
)


@dataclass(frozen=True, slots=True)
class Credential:
    username: str
    role: str
    password: str


def first_start(session: Session, accounts: Accounts) -> list[Credential]:
    """Seed missing built-in roles; on an empty user table create the administrators.
    Returns their initial passwords, to be shown once and never stored."""
    seed_builtin_roles(session, accounts.clock.now())
    if session.scalar(select(func.count(User.id))):
        return []
    chosen = accounts.settings.security.initial_admin_password
    created = []
    for username, display, role in FIRST_ADMINS:
        _, password = accounts.create_user(
            session,
            username=username,
            display_name=display,
            roles=[role],
            password=chosen.get_secret_value() if chosen else None,
        )
        created.append(Credential(username, display, password))
    return created


def demo_users(session: Session, accounts: Accounts) -> list[Credential]:
    """For the demo (``serve --demo``), once: the departments of the demo studies, a
    radiologist who sees every study and a clinician of 神经内科 who sees that
    department's two patients."""
    from cloudfilm.archive.demo import DEMO_PATIENTS

    if session.scalar(select(User.id).where(User.username == "doctor")) is not None:
        return []
    existing = set(session.scalars(select(Department.code)))
    for code in sorted({p.department for p in DEMO_PATIENTS if p.department} | {"放射科"}):
        if code not in existing:
            session.add(Department(code=code, name=code, created_at=accounts.clock.now()))
    session.flush()
    created = []
    for username, display, role, department in (
        ("doctor", "王医生", "radiologist", "放射科"),
        ("clinician", "李医生", "clinician", "神经内科"),
    ):
        _, password = accounts.create_user(
            session, username=username, display_name=display, department=department, roles=[role]
        )
        created.append(Credential(username, display, password))
    return created
