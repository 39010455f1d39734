"""Signing in from tests: users with given roles, sessions at a given login stage, and the
cookie headers a browser would send (httpx does not send ``Secure`` cookies over the
loopback HTTP the test servers use, so tests pass them explicitly)."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select

from cloudfilm.auth.guard import cookie_names
from cloudfilm.auth.models import Department, User
from cloudfilm.auth.principal import Stage
from cloudfilm.auth.roles import seed_builtin_roles

from conftest import LiveServer

STRONG = "Cloud-Film-2026!"
"""A password every default policy accepts."""

SESSION_COOKIE, CSRF_COOKIE = cookie_names(True)


def make_user(
    server: LiveServer,
    username: str,
    roles: list[str],
    *,
    password: str = STRONG,
    department: str | None = None,
    display_name: str = "",
    initial: bool = False,
) -> None:
    """A user holding ``roles``; with ``initial`` the password is still the one-time one."""
    accounts = server.accounts
    with server.archive.db.session() as session:
        seed_builtin_roles(session, accounts.clock.now())
        if department and not session.scalar(
            select(Department.id).where(Department.code == department)
        ):
            session.add(
                Department(code=department, name=department, created_at=accounts.clock.now())
            )
            session.flush()
        user, _ = accounts.create_user(
            session,
            username=username,
            display_name=display_name,
            department=department,
            roles=roles,
            password=password,
        )
        if not initial:
            user.must_change_password = False
            user.initial_password_expires_at = None


def session_headers(token: str, csrf: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={token}; {CSRF_COOKIE}={csrf}", "X-CSRF-Token": csrf}


def signed_in(server: LiveServer, username: str, stage: Stage = Stage.FULL) -> dict[str, str]:
    """Headers of a browser session of ``username`` at ``stage``, opened directly (the login
    flow itself is tested in tests/auth/test_login.py)."""
    accounts = server.accounts
    with server.archive.db.session() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        new = accounts.open_session(session, user, stage, source="127.0.0.1", user_agent="pytest")
    return session_headers(new.token, new.csrf_token)


def login(server: LiveServer, username: str, password: str, **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/auth/login", json={"username": username, "password": password}, **kw
    )


def headers_from(response: httpx.Response) -> dict[str, str]:
    """The session the server just set, as headers for the next request."""
    cookies = {c.name: c.value for c in response.cookies.jar}
    return session_headers(cookies[SESSION_COOKIE], cookies[CSRF_COOKIE])
