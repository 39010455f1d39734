"""The one gate of every HTTP route: who is calling (session cookie or bearer token) and
whether the route's declared permission is theirs.

Each route declares exactly one :class:`Permit` dependency; ``tests/auth`` enumerates the
routes and fails on any without one. Refusals raise :class:`AuthError`, which the app
renders as ``{"error": code, "message": ...}``; the audit middleware records them like
every other request.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fastapi import Request

from cloudfilm.audit.enums import ActorType
from cloudfilm.auth import service as clients
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import ANONYMOUS, Principal, Stage, study_condition
from cloudfilm.auth.roles import grant_of

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.auth.accounts import Accounts

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "x-csrf-token"


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def cookie_names(secure: bool) -> tuple[str, str]:
    """Session and CSRF cookie names: ``__Host-`` pins them to this host, path ``/`` and
    HTTPS (browsers treat localhost as secure)."""
    return ("__Host-cf_session", "__Host-cf_csrf") if secure else ("cf_session", "cf_csrf")


def client_address(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def principal_of(request: Request) -> Principal:
    """Authenticate the request once (cached on ``request.state``)."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    archive: Archive = request.app.state.archive
    accounts: Accounts = request.app.state.accounts
    principal = ANONYMOUS
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    session_cookie, _ = cookie_names(archive.settings.security.cookie_secure)
    if scheme.lower() == "bearer" and credentials.strip():
        holder = clients.authenticate(
            db=archive.db, token=credentials.strip(), now=accounts.clock.now()
        )
        if holder is None:
            request.state.auth_problem = "invalid_token"
        else:
            principal = Principal(
                ActorType.CLIENT, holder.client, roles=("client",), permissions=holder.scopes
            )
    elif token := request.cookies.get(session_cookie):
        principal = _user_principal(request, archive, accounts, token)
    request.state.principal = principal
    request.state.actor = principal.actor(
        client_address(request), getattr(request.state, "request_id", None)
    )
    return principal


def _user_principal(
    request: Request, archive: Archive, accounts: Accounts, token: str
) -> Principal:
    live = accounts.live_session(archive.db, token)
    if live is None:
        request.state.auth_problem = "invalid_session"
        return ANONYMOUS
    if live.expired or live.stale:
        with archive.db.session() as session:
            accounts.touch(session, live, accounts.clock.now())
    if live.expired:
        request.state.auth_problem = "session_expired"
        return ANONYMOUS
    row = live.row
    grant = grant_of(live.roles, client_ip(request), accounts.clock.now())
    return Principal(
        ActorType.USER,
        row.username,
        roles=grant.role_codes,
        permissions=grant.permissions,
        study_scope=study_condition(
            grant, department=row.department, person_names=[row.display_name, row.username]
        ),
        duties=grant.duties,
        stage=Stage(row.stage),
        user_id=row.user_id,
        session_id=row.id,
        csrf_token=row.csrf_token,
        via_cookie=True,
    )


def same_origin(request: Request) -> bool:
    """No ``Origin`` (not a browser cross-site request), our own origin, or a configured one."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    settings = request.app.state.archive.settings
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    if settings.http.public_url:
        own.add(settings.http.public_url.rstrip("/"))
    return origin in own or origin in settings.http.cors_origins


_NOT_SIGNED_IN = "请先登录 · sign in first"
_STAGE_MESSAGES = {
    Stage.MFA: ("mfa_required", "请完成双因素认证 · enter the code of your authenticator app"),
    Stage.PASSWORD: (
        "password_change_required",
        "请先修改口令 · change your password before going on",
    ),
}


class Permit:
    """A route's declared permission, as a FastAPI dependency returning the caller.

    ``Permit(Permission.X)``: a fully signed-in user or a client holding X.
    ``Permit.signed_in(stages)``: any signed-in caller at one of ``stages``.
    ``Permit.public()``: anyone, e.g. the login form; still CSRF/Origin checked.
    """

    def __init__(
        self,
        permission: Permission | None,
        *,
        public: bool = False,
        stages: frozenset[Stage] = frozenset({Stage.FULL}),
        staff_only: bool = False,
    ) -> None:
        self.permission = permission
        self.public = public
        self.stages = stages
        self.staff_only = staff_only

    @classmethod
    def public_route(cls) -> Permit:
        return cls(None, public=True)

    @classmethod
    def signed_in(cls, *stages: Stage, staff_only: bool = False) -> Permit:
        """Any signed-in caller at one of ``stages``; with ``staff_only`` a user with an
        account (the own-account steps), not an integration client."""
        return cls(None, stages=frozenset(stages or (Stage.FULL,)), staff_only=staff_only)

    def describe(self) -> str:
        if self.public:
            return "public"
        if self.permission is None:
            return "signed-in:" + ",".join(sorted(s.value for s in self.stages))
        return self.permission.value

    def __call__(self, request: Request) -> Principal:
        if request.method in UNSAFE_METHODS and not same_origin(request):
            raise AuthError(403, "bad_origin", "跨站请求被拒绝 · cross-site request refused")
        principal = principal_of(request)
        if self.public:
            return principal
        if not principal.authenticated:
            problem = getattr(request.state, "auth_problem", None)
            message = (
                "会话已过期，请重新登录 · session expired, sign in again"
                if problem == "session_expired"
                else _NOT_SIGNED_IN
            )
            raise AuthError(401, problem or "not_signed_in", message)
        if principal.via_cookie and request.method in UNSAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not principal.csrf_token or not secrets.compare_digest(sent, principal.csrf_token):
                raise AuthError(
                    403, "csrf", "缺少或错误的 CSRF 令牌 · missing or wrong X-CSRF-Token header"
                )
        if self.staff_only and principal.user_id is None:
            raise AuthError(
                403, "forbidden", "仅限登录用户 · for signed-in staff, not integration clients"
            )
        if principal.stage not in self.stages:
            code, message = _STAGE_MESSAGES.get(principal.stage, ("forbidden", "无权访问"))
            raise AuthError(403, code, message)
        if self.permission is not None and self.permission not in principal.permissions:
            raise AuthError(
                403,
                "forbidden",
                f"无此权限 · not permitted: {self.permission.label} ({self.permission.value})",
            )
        return principal
