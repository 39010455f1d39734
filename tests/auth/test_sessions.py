"""Sessions, cookies, CSRF and CORS (SECURITY-CHECKS B1-B4, D5)."""

from __future__ import annotations

import logging
import string

import httpx
import pytest
from sqlalchemy import select, text

from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.accounts import new_secret_token
from cloudfilm.auth.principal import Stage

from auth_helpers import STRONG, headers_from, login, make_user, session_headers, signed_in
from conftest import LiveServer


def _me(server: LiveServer, headers: dict[str, str]) -> int:
    return httpx.get(f"{server.url}/api/auth/me", headers=headers).status_code


def test_idle_timeout__staff_and_administrators(live_server: LiveServer) -> None:
    """B1: staff sessions end after 30 idle minutes, administrators' after 10."""
    server = live_server
    make_user(server, "staff", ["radiologist"])
    make_user(server, "admin", ["sysadmin"])
    staff, admin = signed_in(server, "staff"), signed_in(server, "admin")
    server.clock.advance(minutes=9)
    assert _me(server, staff) == 200 and _me(server, admin) == 200
    server.clock.advance(minutes=10, seconds=30)  # admin idle 10.5 min, staff 10.5 min
    assert _me(server, admin) == 401
    assert _me(server, staff) == 200
    server.clock.advance(minutes=31)
    response = httpx.get(f"{server.url}/api/auth/me", headers=staff)
    assert (response.status_code, response.json()["error"]) == (401, "session_expired")
    assert _me(server, staff) == 401  # the expired session is gone for good


def test_absolute_lifetime(live_server: LiveServer) -> None:
    """B1: even an active session ends 12 hours after sign-in."""
    server = live_server
    make_user(server, "busy", ["radiologist"])
    headers = signed_in(server, "busy")
    for _ in range(35):  # 35 x 20 min = 11 h 40 min, active all along
        server.clock.advance(minutes=20)
        assert _me(server, headers) == 200
    server.clock.advance(minutes=21)
    assert _me(server, headers) == 401


def test_logout_and_disable_end_sessions(live_server: LiveServer) -> None:
    """B2: a session is dead after logout; disabling a user ends all the user's sessions."""
    server = live_server
    make_user(server, "chen", ["radiologist"])
    make_user(server, "sys", ["sysadmin"])
    first = headers_from(login(server, "chen", STRONG))
    out = httpx.post(f"{server.url}/api/auth/logout", headers=first)
    assert out.status_code == 200
    assert '"cookies"' in out.headers["clear-site-data"]
    assert _me(server, first) == 401
    a, b = signed_in(server, "chen"), signed_in(server, "chen")
    disabled = httpx.patch(
        f"{server.url}/api/admin/users/chen",
        json={"enabled": False},
        headers=signed_in(server, "sys"),
    )
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert _me(server, a) == 401 and _me(server, b) == 401
    assert login(server, "chen", STRONG).status_code == 401


def test_session_id_changes_at_login_and_privilege_change(live_server: LiveServer) -> None:
    """B3: signing in replaces a session the browser brought; each step up (password
    changed) issues a new id and the old one stops working."""
    server = live_server
    make_user(server, "he", ["radiologist"], password="Initial-Pass-9", initial=True)
    planted = signed_in(server, "he")
    response = login(server, "he", "Initial-Pass-9", headers={"Cookie": planted["Cookie"]})
    assert _me(server, planted) == 401  # the planted session was ended
    step1 = headers_from(response)
    assert step1["Cookie"] != planted["Cookie"]
    changed = httpx.post(
        f"{server.url}/api/auth/password",
        json={"current_password": "Initial-Pass-9", "new_password": STRONG},
        headers=step1,
    )
    step2 = headers_from(changed)
    assert step2["Cookie"] != step1["Cookie"]
    assert _me(server, step1) == 401 and _me(server, step2) == 200


def test_session_ids_are_unique_and_long() -> None:
    """B3: 10^5 ids, no duplicates, ≥ 128 bits each (43 URL-safe base64 characters = 256)."""
    alphabet = set(string.ascii_letters + string.digits + "-_")
    ids = [new_secret_token() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 43 and set(i) <= alphabet for i in ids)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cookie_attributes_and_no_token_in_urls_or_logs(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """B4: __Host- cookies with Secure, HttpOnly (session), SameSite=Strict, Path=/ and no
    Domain; neither the session token nor the password appears in a log line or in the
    audit trail."""
    server = live_server
    make_user(server, "lin", ["radiologist"])
    caplog.set_level(logging.DEBUG)
    response = login(server, "lin", STRONG)
    cookies = response.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("__Host-cf_session="))
    csrf = next(c for c in cookies if c.startswith("__Host-cf_csrf="))
    for cookie in (session, csrf):
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"secure", "samesite", "path"} <= attributes and "domain" not in attributes
        assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
    assert "httponly" in session.lower() and "httponly" not in csrf.lower()
    assert response.headers["cache-control"] == "no-store"
    token = session.split(";")[0].split("=", 1)[1]
    headers = headers_from(response)
    httpx.get(f"{server.url}/dicom-web/studies", headers=headers)
    httpx.post(f"{server.url}/api/auth/logout", headers=headers)
    # The server's own log lines (the test client's httpcore traces show what it received).
    server_lines = "\n".join(
        f"{r.name} {r.getMessage()}"
        for r in caplog.records
        if not r.name.startswith(("httpx", "httpcore"))
    )
    assert token not in server_lines and STRONG not in server_lines
    with server.archive.db.read_session() as db:
        dump = "\n".join(str(tuple(r)) for r in db.execute(text("SELECT * FROM audit_event")))
        sessions = "\n".join(str(tuple(r)) for r in db.execute(text("SELECT * FROM user_session")))
        users = "\n".join(str(tuple(r)) for r in db.execute(text("SELECT * FROM app_user")))
    assert token not in dump and STRONG not in dump
    assert token not in sessions and STRONG not in users


def test_csrf_and_origin(live_server: LiveServer) -> None:
    """D5: a state-changing request with a session cookie needs the CSRF token; a foreign
    Origin is refused even with it; bearer-token clients need no CSRF token."""
    server = live_server
    make_user(server, "yang", ["radiologist"])
    headers = signed_in(server, "yang")
    body = {"display_name": "杨医生"}
    without = {"Cookie": headers["Cookie"]}
    refused = httpx.patch(f"{server.url}/api/auth/me", json=body, headers=without)
    assert (refused.status_code, refused.json()["error"]) == (403, "csrf")
    wrong = {**without, "X-CSRF-Token": "x" * 43}
    assert httpx.patch(f"{server.url}/api/auth/me", json=body, headers=wrong).status_code == 403
    foreign = {**headers, "Origin": "https://evil.example"}
    refused = httpx.patch(f"{server.url}/api/auth/me", json=body, headers=foreign)
    assert (refused.status_code, refused.json()["error"]) == (403, "bad_origin")
    login_elsewhere = login(server, "yang", STRONG, headers={"Origin": "https://evil.example"})
    assert login_elsewhere.status_code == 403
    own = {**headers, "Origin": server.url}
    accepted = httpx.patch(f"{server.url}/api/auth/me", json=body, headers=own)
    assert accepted.status_code == 200 and accepted.json()["display_name"] == "杨医生"


def test_cors_allows_only_configured_origins(live_server: LiveServer) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    response = httpx.options(f"{live_server.url}/dicom-web/studies", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    response = httpx.get(
        f"{live_server.url}/dicom-web/studies",
        headers={**live_server.headers, "Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_with_a_configured_origin(archive: Archive, request: pytest.FixtureRequest) -> None:
    archive.settings.http.cors_origins = ["https://his.hospital.example"]
    server: LiveServer = request.getfixturevalue("live_server")
    preflight = {"Access-Control-Request-Method": "GET"}
    allowed = httpx.options(
        f"{server.url}/dicom-web/studies",
        headers={**preflight, "Origin": "https://his.hospital.example"},
    )
    assert allowed.headers["access-control-allow-origin"] == "https://his.hospital.example"
    other = httpx.options(
        f"{server.url}/dicom-web/studies", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_session_rows_hold_no_token(live_server: LiveServer) -> None:
    make_user(live_server, "xu", ["radiologist"])
    headers = signed_in(live_server, "xu", Stage.FULL)
    token = headers["Cookie"].split(";")[0].split("=", 1)[1]
    from cloudfilm.auth.models import UserSession

    with live_server.archive.db.read_session() as session:
        stored = session.scalars(select(UserSession.token_hash)).all()
    assert token not in stored and len(stored[0]) == 64
    assert session_headers(token, "x")["Cookie"].startswith("__Host-cf_session=")


def test_security_headers(live_server: LiveServer) -> None:
    """R13: nosniff, no referrer (share links), no framing, CSP on pages; no HSTS on plain
    HTTP (it would lock a lab install out)."""
    page = httpx.get(f"{live_server.url}/login")
    api = httpx.get(f"{live_server.url}/dicom-web/studies", headers=live_server.headers)
    for response in (page, api):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
        assert "strict-transport-security" not in response.headers
    csp = page.headers["content-security-policy"]
    assert "object-src 'none'" in csp and "frame-ancestors 'none'" in csp


def test_hsts_when_served_over_https(archive: Archive, request: pytest.FixtureRequest) -> None:
    archive.settings.http.public_url = "https://film.hospital.example"
    server: LiveServer = request.getfixturevalue("live_server")
    response = httpx.get(f"{server.url}/healthz")
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")
