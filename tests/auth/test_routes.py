"""Every route declares its permission, and each role gets exactly what its grant says
(SECURITY-CHECKS D1, A9), with one audit record per request (G1, G2)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import func, select

from cloudfilm.app import audited, create_app
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.roles import BUILTIN_ROLES

from auth_helpers import make_user, signed_in
from conftest import LiveServer

_SAMPLE = {
    "frames": "1",
    "frame": "1",
    "tag": "7FE00010",
    "username": "nobody",
    "code": "nope",
    "name": "nope",
    "id": "999999",
}


def _permits(dependant: Any) -> list[Permit]:
    found = [d.call for d in dependant.dependencies if isinstance(d.call, Permit)]
    for sub in dependant.dependencies:
        found += _permits(sub)
    return found


def _api_routes(routes: list[Any], prefix: str = "") -> list[tuple[str, APIRoute]]:
    """Every API route with its full path, through included routers; anything else (a
    mounted app, a bare Starlette route) fails: it could not declare a Permit."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append((prefix + route.path, route))
        elif hasattr(route, "original_router"):  # FastAPI's wrapper of an included router
            found += _api_routes(
                route.original_router.routes, prefix + route.include_context.prefix
            )
        else:
            raise AssertionError(f"{route!r}: only API routes, each with a Permit")
    return found


def _routes(archive: Archive) -> list[tuple[str, str, Permit]]:
    app = create_app(archive)
    routes = []
    for full_path, route in _api_routes(app.routes):
        permits = _permits(route.dependant)
        assert len(permits) == 1, f"{route.path} declares {len(permits)} permits"
        path = re.sub(
            r"\{([^}:]+)(:[^}]*)?\}", lambda m: _SAMPLE.get(m.group(1), "1.2.3"), full_path
        )
        routes += [(method, path, permits[0]) for method in sorted(route.methods)]
    return routes


def _audit_count(archive: Archive) -> int:
    with archive.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_every_route_declares_exactly_one_permit(archive: Archive) -> None:
    routes = _routes(archive)
    assert len(routes) > 40
    described = {p.describe() for _, _, p in routes}
    assert {"public", "study:search", "study:read", "user:manage", "policy:manage"} <= described


def _expect(permit: Permit, permissions: frozenset[Permission] | None, path: str) -> str:
    """``open`` (anything but 401/403), ``denied`` (403) or ``unauthenticated`` (401)."""
    if permit.public:
        # The patient pages' exam routes take the portal session of an identity check
        # (cloudfilm.sharing.portal), which no staff credential replaces.
        return "unauthenticated" if path.startswith("/api/portal/exam") else "open"
    if permissions is None:
        return "unauthenticated"
    if permit.permission is None or permit.permission in permissions:
        return "open"
    return "denied"


def _check(
    server: LiveServer, method: str, path: str, headers: dict[str, str], expected: str, who: str
) -> None:
    before = _audit_count(server.archive)
    response = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60)
    status = response.status_code
    if expected == "open":
        assert status not in (401, 403), (who, method, path, status, response.text[:200])
    elif expected == "denied":
        assert status == 403, (who, method, path, status, response.text[:200])
        assert response.json()["error"] in ("forbidden",), response.text
    else:
        assert status == 401, (who, method, path, status, response.text[:200])
    assert status < 500, (who, method, path, response.text[:300])
    expected_records = 1 if audited(path) else 0
    if method == "GET" and path.startswith("/api/portal/entry/"):
        expected_records += 1  # the unknown entry token is audited as a refusal too
    assert _audit_count(server.archive) == before + expected_records, (who, method, path)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # guard logic, not SQL
def test_route_role_matrix(live_server: LiveServer) -> None:
    """Anonymous callers get 401 on every non-public route; each built-in role and an
    integration client get 403 exactly where their permissions end; every request leaves
    exactly one audit record."""
    server = live_server
    routes = _routes(server.archive)
    for method, path, permit in routes:
        _check(server, method, path, {}, _expect(permit, None, path), "anonymous")
    for spec in BUILTIN_ROLES:
        make_user(server, f"u-{spec.code}", [spec.code])
        granted = frozenset(spec.permissions)
        for method, path, permit in routes:
            headers = signed_in(server, f"u-{spec.code}")  # fresh: logout ends sessions
            _check(server, method, path, headers, _expect(permit, granted, path), spec.code)
    from cloudfilm.auth.service import CLIENT_SCOPES

    for method, path, permit in routes:
        expected = (
            "denied" if permit.staff_only else _expect(permit, frozenset(CLIENT_SCOPES), path)
        )
        _check(server, method, path, server.headers, expected, "client")


def test_audit_record_fields(live_server: LiveServer) -> None:
    """G2: time in ms, actor and role, source address, event type, object, outcome and the
    request id the caller sent."""
    make_user(live_server, "field", ["radiologist"])
    headers = {**signed_in(live_server, "field"), "X-Request-ID": "req-12345"}
    response = httpx.get(f"{live_server.url}/dicom-web/studies/1.2.3/metadata", headers=headers)
    assert response.status_code == 404 and response.headers["x-request-id"] == "req-12345"
    with live_server.archive.db.read_session() as session:
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
    assert event is not None
    assert (event.actor_type, event.actor_id, event.actor_role) == ("user", "field", "radiologist")
    assert event.source and event.source.startswith("127.0.0.1:")
    assert (event.event_type, event.action, event.outcome) == ("retrieve", "R", 4)
    assert event.study_instance_uid == "1.2.3" and event.request_id == "req-12345"
    assert event.occurred_at.microsecond % 1000 == 0 or event.occurred_at.microsecond >= 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_three_duties_stay_apart(live_server: LiveServer) -> None:
    """A9: no user holds two administrator duties; reserved permissions stay with their
    duty; the security administrator cannot change the own roles."""
    server = live_server
    make_user(server, "sec", ["secadmin"])
    make_user(server, "sys", ["sysadmin"])
    make_user(server, "plain", [])
    sec = signed_in(server, "sec")
    assign = f"{server.url}/api/admin/users/plain/roles"
    both = httpx.put(assign, json={"roles": ["sysadmin", "auditadmin"]}, headers=sec)
    assert both.status_code == 409 and "三员分立" in both.json()["message"]
    assert httpx.put(assign, json={"roles": ["auditadmin"]}, headers=sec).status_code == 200
    self_assign = httpx.put(
        f"{server.url}/api/admin/users/sec/roles", json={"roles": ["radiologist"]}, headers=sec
    )
    assert self_assign.status_code == 403
    sneaky = {
        "code": "viewer",
        "name": "查看者",
        "permissions": ["study:read", "audit:read"],
    }
    assert httpx.post(f"{server.url}/api/admin/roles", json=sneaky, headers=sec).status_code == 409
    roles = httpx.get(f"{server.url}/api/admin/roles", headers=sec).json()
    sysadmin = next(r for r in roles if r["code"] == "sysadmin")
    sysadmin = {k: v for k, v in sysadmin.items() if k not in ("id", "builtin")}
    widened = {**sysadmin, "permissions": [*sysadmin["permissions"], "policy:manage"]}
    response = httpx.put(f"{server.url}/api/admin/roles/sysadmin", json=widened, headers=sec)
    assert response.status_code == 409
    sys = signed_in(server, "sys")
    assert httpx.get(f"{server.url}/api/admin/policy", headers=sys).status_code == 403
    assert httpx.get(f"{server.url}/api/admin/roles", headers=sys).status_code == 403
