"""Integration clients: OAuth2 client credentials with scopes, expiry and revocation."""

from __future__ import annotations

import httpx
from sqlalchemy import select

from cloudfilm.auth.models import AccessToken, ApiClient

from auth_helpers import make_user, signed_in
from conftest import LiveServer


def _token(server: LiveServer, client: str, secret: str, **form: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/oauth/token",
        data={"grant_type": "client_credentials", **form},
        auth=(client, secret),
    )


def test_client_credentials__scopes_expiry_revocation(live_server: LiveServer) -> None:
    server = live_server
    make_user(server, "sys", ["sysadmin"])
    admin = signed_in(server, "sys")
    created = httpx.post(
        f"{server.url}/api/admin/clients",
        json={"name": "ris", "scopes": ["study:search", "study:read"], "expires_days": 30},
        headers=admin,
    )
    assert created.status_code == 200, created.text
    secret = created.json()["client_secret"]
    assert secret.startswith("cfs_")
    listed = httpx.get(f"{server.url}/api/admin/clients", headers=admin).json()
    assert "client_secret" not in next(c for c in listed if c["name"] == "ris")

    assert _token(server, "ris", "cfs_wrong").status_code == 401
    assert _token(server, "ris", secret, scope="study:store").json()["error"] == "invalid_scope"
    narrow = _token(server, "ris", secret, scope="study:search")
    assert narrow.status_code == 200 and narrow.json()["scope"] == "study:search"
    bearer = {"Authorization": f"Bearer {narrow.json()['access_token']}"}
    assert httpx.get(f"{server.url}/dicom-web/studies", headers=bearer).status_code == 204
    refused = httpx.get(f"{server.url}/dicom-web/studies/1.2.3/metadata", headers=bearer)
    assert refused.status_code == 403  # study:read was not asked for

    full = {"Authorization": f"Bearer {_token(server, 'ris', secret).json()['access_token']}"}
    assert (
        httpx.get(f"{server.url}/dicom-web/studies/1.2.3/metadata", headers=full).status_code == 404
    )
    server.clock.advance(minutes=61)  # tokens live 60 minutes
    expired = httpx.get(f"{server.url}/dicom-web/studies", headers=full)
    assert expired.status_code == 401 and expired.headers["www-authenticate"].startswith("Bearer")

    fresh = {"Authorization": f"Bearer {_token(server, 'ris', secret).json()['access_token']}"}
    assert httpx.get(f"{server.url}/dicom-web/studies", headers=fresh).status_code == 204
    admin = signed_in(server, "sys")  # the old admin session idled out with the clock
    disabled = httpx.post(f"{server.url}/api/admin/clients/ris/disable", headers=admin)
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert httpx.get(f"{server.url}/dicom-web/studies", headers=fresh).status_code == 401
    assert _token(server, "ris", secret).status_code == 401
    with server.archive.db.read_session() as session:
        client = session.scalars(select(ApiClient).where(ApiClient.name == "ris")).one()
        assert not session.scalars(
            select(AccessToken).where(AccessToken.client_id == client.id)
        ).all()
        assert secret not in client.token_hash


def test_client_secret_expires(live_server: LiveServer) -> None:
    server = live_server
    make_user(server, "sys", ["sysadmin"])
    created = httpx.post(
        f"{server.url}/api/admin/clients",
        json={"name": "gateway", "expires_days": 1},
        headers=signed_in(server, "sys"),
    ).json()
    assert _token(server, "gateway", created["client_secret"]).status_code == 200
    server.clock.advance(days=1, minutes=1)
    assert _token(server, "gateway", created["client_secret"]).status_code == 401


def test_clients_cannot_hold_administration(live_server: LiveServer) -> None:
    make_user(live_server, "sys", ["sysadmin"])
    response = httpx.post(
        f"{live_server.url}/api/admin/clients",
        json={"name": "sneaky", "scopes": ["user:manage"]},
        headers=signed_in(live_server, "sys"),
    )
    assert response.status_code == 409


def test_optional_second_factor_for_staff(live_server: LiveServer) -> None:
    """A radiologist may enrol TOTP; from then on the login asks for it."""
    import pyotp

    from auth_helpers import STRONG, headers_from, login

    server = live_server
    make_user(server, "opt", ["radiologist"])
    first = login(server, "opt", STRONG)
    assert first.json()["stage"] == "full"
    headers = headers_from(first)
    setup = httpx.post(f"{server.url}/api/auth/mfa/setup", headers=headers).json()
    totp = pyotp.TOTP(setup["secret"])
    confirmed = httpx.post(
        f"{server.url}/api/auth/mfa/verify",
        json={"code": totp.at(server.clock.now())},
        headers=headers,
    )
    assert confirmed.status_code == 200 and confirmed.json()["mfa_enabled"] is True
    second = login(server, "opt", STRONG)
    assert second.json()["stage"] == "mfa"
