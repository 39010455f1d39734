"""Sign-in, passwords and lockout (SECURITY-CHECKS A1-A6, A8), on SQLite and PostgreSQL,
with the server's clock moved by the tests."""

from __future__ import annotations

import statistics
import time

import httpx
import pyotp
import pytest
from sqlalchemy import select

from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.accounts import Accounts
from cloudfilm.auth.bootstrap import first_start
from cloudfilm.auth.models import User
from cloudfilm.config import Settings

from auth_helpers import STRONG, headers_from, login, make_user, signed_in
from conftest import LiveServer


def _events(server: LiveServer, event_type: str) -> list[AuditEvent]:
    with server.archive.db.read_session() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.event_type == event_type)
                .order_by(AuditEvent.id)
            )
        )


def _change(server: LiveServer, headers: dict[str, str], current: str, new: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/auth/password",
        json={"current_password": current, "new_password": new},
        headers=headers,
    )


def _set_policy(server: LiveServer, **changes: object) -> None:
    admin = signed_in(server, "sec")
    policy = httpx.get(f"{server.url}/api/admin/policy", headers=admin).json()
    response = httpx.put(
        f"{server.url}/api/admin/policy", json={**policy, **changes}, headers=admin
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def server(live_server: LiveServer) -> LiveServer:
    make_user(live_server, "sec", ["secadmin"])
    return live_server


def test_password_policy__each_class_and_the_switch(server: LiveServer) -> None:
    """A1: with the policy on, each missing class and a 7-character password are refused
    with their own code; 64 characters pass. Off: a passphrase without classes passes.
    Each toggle is audited with the security administrator as actor."""
    make_user(server, "wang", ["radiologist"])
    me = signed_in(server, "wang")
    cases = {
        "missing_digit": "Cloud-Film-Abc!",
        "missing_upper": "cloud-film-2026!",
        "missing_lower": "CLOUD-FILM-2026!",
        "missing_special": "CloudFilm2026abc",
        "too_short": "Cf-2026",
    }
    for code, password in cases.items():
        response = _change(server, me, STRONG, password)
        assert response.status_code == 400, password
        assert code in response.json()["error"].split(","), response.json()
    long = "Aa1!" + "x" * 60
    assert _change(server, me, STRONG, long).status_code == 200
    me = signed_in(server, "wang")
    _set_policy(server, strength_enabled=False)
    assert _change(server, me, long, "correct horse battery staple").status_code == 200
    _set_policy(server, strength_enabled=True)
    toggles = _events(server, "policy-changed")
    assert [(e.actor_id, e.actor_role, e.detail["strength_enabled"]) for e in toggles] == [
        ("sec", "secadmin", {"old": True, "new": False}),
        ("sec", "secadmin", {"old": False, "new": True}),
    ]


def test_initial_password__forces_change_and_expires(server: LiveServer) -> None:
    """A2: the first login may only change the password; the initial one cannot be kept
    and stops working after 72 h unused."""
    make_user(server, "li", ["radiologist"], password="Initial-Pass-1", initial=True)
    response = login(server, "li", "Initial-Pass-1")
    assert response.status_code == 200
    assert (response.json()["stage"], response.json()["password_change"]) == ("password", "initial")
    headers = headers_from(response)
    for method, path in (("GET", "/dicom-web/studies"), ("GET", "/api/archive/summary")):
        refused = httpx.request(method, f"{server.url}{path}", headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"] == "password_change_required"
    reused = _change(server, headers, "Initial-Pass-1", "Initial-Pass-1")
    assert (reused.status_code, reused.json()["error"]) == (400, "reused")
    changed = _change(server, headers, "Initial-Pass-1", STRONG)
    assert changed.status_code == 200 and changed.json()["stage"] == "full"
    assert httpx.get(
        f"{server.url}/dicom-web/studies", headers=headers_from(changed)
    ).status_code in (
        200,
        204,
    )

    make_user(server, "late", ["radiologist"], password="Initial-Pass-2", initial=True)
    server.clock.advance(hours=73)
    expired = login(server, "late", "Initial-Pass-2")
    assert (expired.status_code, expired.json()["error"]) == (401, "initial_password_expired")


def test_periodic_change_and_history(server: LiveServer) -> None:
    """A3: past the maximum age a login only reaches the change step; none of the last 5
    passwords may come back."""
    make_user(server, "zhao", ["radiologist"])
    history = [STRONG] + [f"Cloud-Film-{n}!" for n in range(2027, 2032)]
    current = STRONG
    for new in history[1:]:
        server.clock.advance(days=91)
        response = login(server, "zhao", current)
        assert (response.json()["stage"], response.json()["password_change"]) == (
            "password",
            "expired",
        )
        headers = headers_from(response)
        assert httpx.get(f"{server.url}/dicom-web/studies", headers=headers).status_code == 403
        assert _change(server, headers, current, new).status_code == 200
        current = new
    server.clock.advance(days=91)
    headers = headers_from(login(server, "zhao", current))
    for old in history[-5:]:  # the current and the four before it
        assert _change(server, headers, current, old).json()["error"] == "reused"
    assert _change(server, headers, current, history[0]).status_code == 200  # sixth back


def test_lockout__after_five_failures_then_window_or_unlock(server: LiveServer) -> None:
    """A4: five wrong passwords lock the account for 15 minutes, the right one included;
    it opens after the window or when the security administrator unlocks (audited)."""
    make_user(server, "sun", ["radiologist"])
    for _ in range(5):
        assert login(server, "sun", "Wrong-Pass-1!").status_code == 401
    assert login(server, "sun", STRONG).status_code == 401
    server.clock.advance(minutes=14)
    assert login(server, "sun", STRONG).status_code == 401
    server.clock.advance(minutes=2)
    assert login(server, "sun", STRONG).status_code == 200

    for _ in range(5):
        login(server, "sun", "Wrong-Pass-1!")
    assert login(server, "sun", STRONG).status_code == 401
    unlocked = httpx.post(
        f"{server.url}/api/admin/users/sun/unlock", headers=signed_in(server, "sec")
    )
    assert unlocked.status_code == 200 and unlocked.json()["locked"] is False
    assert login(server, "sun", STRONG).status_code == 200
    failures = [e for e in _events(server, "authentication-failed") if e.actor_id == "sun"]
    assert len(failures) == 13 and all(e.outcome == 8 for e in failures)
    [unlock] = [e for e in _events(server, "user-changed") if e.object_id == "sun"]
    assert (unlock.actor_id, unlock.detail["unlock"]) == ("sec", True)


def test_failures_within_window_only_count(server: LiveServer) -> None:
    make_user(server, "zhou", ["radiologist"])
    for _ in range(4):
        login(server, "zhou", "Wrong-Pass-1!")
    server.clock.advance(minutes=16)  # the window has passed: the count starts again
    for _ in range(4):
        login(server, "zhou", "Wrong-Pass-1!")
    assert login(server, "zhou", STRONG).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_user_enumeration(server: LiveServer) -> None:
    """A5: unknown user, wrong password and locked account get the same answer, and their
    median times differ by less than 50 ms (50 trials each)."""
    make_user(server, "qian", ["radiologist"])
    make_user(server, "locked", ["radiologist"])
    for _ in range(5):
        login(server, "locked", "Wrong-Pass-1!")
    cases = {
        "unknown": ("nobody", STRONG),
        "wrong": ("qian", "Wrong-Pass-2!"),
        "locked": ("locked", STRONG),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    bodies = set()
    with httpx.Client() as client:
        for _ in range(50):
            for name, (username, password) in cases.items():
                if name == "wrong":
                    # Keep "qian" below the lockout threshold: reset the counter.
                    with server.archive.db.session() as session:
                        user = session.scalars(select(User).where(User.username == "qian")).one()
                        user.failed_logins = 0
                started = time.perf_counter()
                response = client.post(
                    f"{server.url}/api/auth/login",
                    json={"username": username, "password": password},
                )
                timings[name].append(time.perf_counter() - started)
                bodies.add((response.status_code, response.text))
    assert len(bodies) == 1, bodies
    medians = {name: statistics.median(t) for name, t in timings.items()}
    assert max(medians.values()) - min(medians.values()) < 0.050, medians


def test_admins_need_a_second_factor_and_codes_work_once(server: LiveServer) -> None:
    """A6: an administrator's password alone yields no usable session; the TOTP code
    finishes sign-in, and the same code cannot be used again."""
    make_user(server, "sec2", ["secadmin"])
    response = login(server, "sec2", STRONG)
    assert response.json()["stage"] == "mfa" and response.json()["mfa_enabled"] is False
    headers = headers_from(response)
    refused = httpx.get(f"{server.url}/api/admin/policy", headers=headers)
    assert (refused.status_code, refused.json()["error"]) == (403, "mfa_required")
    assert httpx.get(f"{server.url}/api/auth/me", headers=headers).json()["stage"] == "mfa"
    setup = httpx.post(f"{server.url}/api/auth/mfa/setup", headers=headers)
    assert setup.status_code == 200
    totp = pyotp.TOTP(setup.json()["secret"])
    wrong = httpx.post(
        f"{server.url}/api/auth/mfa/verify", json={"code": "000000"}, headers=headers
    )
    assert wrong.status_code == 401
    code = totp.at(server.clock.now())
    verified = httpx.post(f"{server.url}/api/auth/mfa/verify", json={"code": code}, headers=headers)
    assert verified.status_code == 200 and verified.json()["stage"] == "full"
    full = headers_from(verified)
    assert httpx.get(f"{server.url}/api/auth/me", headers=full).json()["mfa_enabled"] is True
    # Signing in again: enrolment cannot be redone with the password alone, and the code
    # just used is spent.
    again = headers_from(login(server, "sec2", STRONG))
    assert httpx.post(f"{server.url}/api/auth/mfa/setup", headers=again).status_code == 403
    replay = httpx.post(f"{server.url}/api/auth/mfa/verify", json={"code": code}, headers=again)
    assert replay.status_code == 401
    server.clock.advance(seconds=31)
    fresh = totp.at(server.clock.now())
    ok = httpx.post(f"{server.url}/api/auth/mfa/verify", json={"code": fresh}, headers=again)
    assert ok.status_code == 200 and ok.json()["stage"] == "full"
    assert httpx.get(f"{server.url}/api/admin/policy", headers=headers_from(ok)).status_code == 200


def test_fresh_install_has_no_default_password(tmp_path: object, archive: object) -> None:
    """A8: the first start creates the three administrators with distinct random one-time
    passwords (shown once: a second start returns none); common defaults do not work."""
    from cloudfilm.archive.ingest import Archive

    assert isinstance(archive, Archive)
    accounts = Accounts(archive.settings)
    with archive.db.session() as session:
        created = first_start(session, accounts)
        again = first_start(session, accounts)
    assert sorted(c.username for c in created) == ["auditadmin", "secadmin", "sysadmin"]
    assert again == []
    passwords = {c.password for c in created}
    assert len(passwords) == 3 and all(len(p) >= 16 for p in passwords)
    with archive.db.session() as session:
        for username in ("sysadmin", "admin", "root"):
            for guess in ("admin", "admin123", "123456", "password", username):
                with pytest.raises(Exception, match="用户名或密码错误"):
                    accounts.check_password(session, username, guess)
        users = list(session.scalars(select(User)))
    assert all(u.must_change_password and u.initial_password_expires_at for u in users)
    assert all(c.password not in u.password_hash for c in created for u in users)


def test_operator_chosen_initial_password(tmp_path: object, archive: object) -> None:
    from cloudfilm.archive.ingest import Archive

    assert isinstance(archive, Archive)
    settings = Settings(
        data_dir=archive.settings.data_dir,
        database={"url": archive.settings.database_url},
        security={"initial_admin_password": "Hospital-Setup-2026!"},
    )
    accounts = Accounts(settings)
    with archive.db.session() as session:
        created = first_start(session, accounts)
    assert {c.password for c in created} == {"Hospital-Setup-2026!"}
