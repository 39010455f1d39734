"""Sign-in, second factor, password change, sign-out and the client-credentials token
endpoint (``/api/auth``, ``/api/oauth/token``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType
from cloudfilm.audit.service import Actor
from cloudfilm.auth import policy as policies
from cloudfilm.auth import service as clients
from cloudfilm.auth.accounts import Accounts, LoginFailed, NewSession, WeakPassword
from cloudfilm.auth.guard import AuthError, Permit, client_address, cookie_names
from cloudfilm.auth.models import User
from cloudfilm.auth.principal import Principal, Stage
from cloudfilm.errors import PermissionDenied
from cloudfilm.httpaudit import note

router = APIRouter(tags=["auth"])

_ANY_STAGE = Permit.signed_in(Stage.MFA, Stage.PASSWORD, Stage.FULL)
#: The own-account steps, for staff with an account (not integration clients).
Profile = Annotated[Principal, Depends(Permit.signed_in(staff_only=True))]
SecondFactor = Annotated[
    Principal, Depends(Permit.signed_in(Stage.MFA, Stage.FULL, staff_only=True))
]
NewPassword = Annotated[
    Principal, Depends(Permit.signed_in(Stage.PASSWORD, Stage.FULL, staff_only=True))
]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request"},
    401: {"description": "not signed in, or wrong credentials"},
    403: {"description": "not permitted, CSRF token missing, or another step comes first"},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=256)]


class CodeBody(_Body):
    code: Annotated[str, Field(min_length=1, max_length=16)]


class PasswordBody(_Body):
    current_password: Annotated[str, Field(min_length=1, max_length=256)]
    new_password: Annotated[str, Field(min_length=1, max_length=256)]


class ProfileBody(_Body):
    """What users may change about themselves. Anything else (roles, department,
    enabled, ...) is refused with 400."""

    display_name: Annotated[str, Field(min_length=1, max_length=64)]


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _set_cookies(request: Request, response: Response, new: NewSession) -> None:
    secure = request.app.state.archive.settings.security.cookie_secure
    session_name, csrf_name = cookie_names(secure)
    response.set_cookie(
        session_name, new.token, httponly=True, secure=secure, samesite="strict", path="/"
    )
    response.set_cookie(
        csrf_name, new.csrf_token, httponly=False, secure=secure, samesite="strict", path="/"
    )


def _state(
    accounts: Accounts, request: Request, user: User, stage: Stage, csrf: str
) -> dict[str, Any]:
    archive = request.app.state.archive
    with archive.db.read_session() as session:
        policy = policies.load(session)
        roles = accounts.roles_of(session, user.id)
        department = accounts.department_code(session, user)
    return {
        "username": user.username,
        "display_name": user.display_name,
        "department": department,
        "roles": [{"code": r.code, "name": r.name, "name_en": r.name_en} for r in roles],
        "permissions": sorted({p for r in roles for p in r.permissions}),
        "stage": stage.value,
        "password_change": accounts.password_change_due(policy, user),
        "mfa_enabled": user.totp_enabled,
        "csrf_token": csrf,
    }


@router.post("/api/auth/login", summary="Sign in with user name and password", responses=_ERRORS)
def login(
    body: LoginBody,
    request: Request,
    response: Response,
    _anyone: Annotated[Principal, Depends(Permit.public_route())],
) -> dict[str, Any]:
    accounts = _accounts(request)
    archive = request.app.state.archive
    request.state.actor = Actor(
        ActorType.USER,
        body.username[:64],
        source=client_address(request),
        request_id=getattr(request.state, "request_id", None),
    )
    note(request, AuditEventType.LOGIN, AuditAction.EXECUTE)
    failure: LoginFailed | None = None
    session_name, _ = cookie_names(archive.settings.security.cookie_secure)
    with archive.db.session() as session:
        try:
            user = accounts.check_password(session, body.username, body.password)
        except LoginFailed as exc:
            failure = exc  # the failure count must commit: leave the block normally
        else:
            if old := request.cookies.get(session_name):
                accounts.end_session(session, old)  # no session fixation
            stage = accounts.first_stage(session, user)
            new = accounts.open_session(
                session,
                user,
                stage,
                source=client_address(request),
                user_agent=request.headers.get("user-agent", ""),
            )
            if stage is Stage.FULL:
                user.last_login_at = accounts.clock.now()
    if failure is not None:
        raise AuthError(401, failure.code, failure.message)
    _set_cookies(request, response, new)
    response.headers["Cache-Control"] = "no-store"
    return _state(accounts, request, user, stage, new.csrf_token)


def _user(session: Any, principal: Principal) -> User:
    user: User | None = session.get(User, principal.user_id, with_for_update=True)
    if user is None:
        raise AuthError(401, "not_signed_in", "请先登录 · sign in first")
    return user


def _advance(
    request: Request,
    response: Response,
    accounts: Accounts,
    session: Any,
    principal: Principal,
    stage: Stage,
) -> NewSession:
    from cloudfilm.auth.models import UserSession

    row = session.get(UserSession, principal.session_id)
    new = accounts.rotate(session, row, stage)
    _set_cookies(request, response, new)
    return new


@router.get("/api/auth/me", summary="The signed-in user and the next login step", responses=_ERRORS)
def me(request: Request, principal: Annotated[Principal, Depends(_ANY_STAGE)]) -> dict[str, Any]:
    accounts = _accounts(request)
    if principal.user_id is None:
        return {"client": principal.name, "permissions": sorted(principal.permissions)}
    with request.app.state.archive.db.read_session() as session:
        user = session.get(User, principal.user_id)
    assert user is not None
    return _state(accounts, request, user, principal.stage, principal.csrf_token or "")


@router.patch("/api/auth/me", summary="Change the own display name", responses=_ERRORS)
def update_me(
    body: ProfileBody,
    request: Request,
    principal: Profile,
) -> dict[str, Any]:
    accounts = _accounts(request)
    note(request, AuditEventType.USER_CHANGED, AuditAction.UPDATE, "user", principal.name)
    with request.app.state.archive.db.session() as session:
        user = _user(session, principal)
        user.display_name = body.display_name
        user.updated_at = accounts.clock.now()
    return _state(accounts, request, user, principal.stage, principal.csrf_token or "")


@router.post(
    "/api/auth/mfa/setup", summary="Start enrolling an authenticator app (TOTP)", responses=_ERRORS
)
def mfa_setup(
    request: Request,
    principal: SecondFactor,
) -> dict[str, str]:
    accounts = _accounts(request)
    note(request, AuditEventType.MFA_ENROLLED, AuditAction.UPDATE, "user", principal.name)
    with request.app.state.archive.db.session() as session:
        user = _user(session, principal)
        if principal.stage is Stage.MFA and user.totp_enabled:
            raise AuthError(
                403,
                "mfa_enrolled",
                "已绑定认证器，请输入验证码 · enter the code of your authenticator app",
            )
        uri = accounts.begin_totp(user)
    secret = uri.split("secret=")[1].split("&")[0]
    return {"otpauth_uri": uri, "secret": secret, "qr_svg": _qr_svg(uri)}


def _qr_svg(uri: str) -> str:
    """The enrolment URI as a standalone SVG QR code, drawn here so that the sign-in page
    needs no JavaScript library (and no ``data:`` image under its CSP)."""
    import io

    import segno

    out = io.BytesIO()
    segno.make(uri, error="m").save(
        out,
        kind="svg",
        xmldecl=False,
        svgns=True,
        nl=False,
        omitsize=True,  # a viewBox only: the page's stylesheet sets the size
        dark="#000",
        light="#fff",
        title="认证器绑定二维码 · authenticator enrolment QR code",
        svgclass="qr",
        lineclass=None,
    )
    return out.getvalue().decode("utf-8")


@router.post(
    "/api/auth/mfa/verify",
    summary="Check a TOTP code (completes enrolment or sign-in)",
    responses=_ERRORS,
)
def mfa_verify(
    body: CodeBody,
    request: Request,
    response: Response,
    principal: SecondFactor,
) -> dict[str, Any]:
    accounts = _accounts(request)
    note(
        request,
        AuditEventType.LOGIN,
        AuditAction.EXECUTE,
        "user",
        principal.name,
        detail={"step": "mfa"},
    )
    wrong = False
    with request.app.state.archive.db.session() as session:
        user = _user(session, principal)
        policy = policies.load(session)
        if accounts.check_totp(user, body.code.strip()):
            user.totp_enabled = True
            stage = principal.stage
            if stage is Stage.MFA:
                stage = accounts.after_mfa(policy, user)
                if stage is Stage.FULL:
                    user.last_login_at = accounts.clock.now()
            new = _advance(request, response, accounts, session, principal, stage)
        else:
            wrong = True
            accounts.count_failure(policy, user)
            if user.locked_until is not None:
                accounts.end_sessions(session, user.id)
    if wrong:
        raise AuthError(401, "wrong_code", "验证码错误或已使用 · wrong or already used code")
    return _state(accounts, request, user, stage, new.csrf_token)


@router.post("/api/auth/password", summary="Change the own password", responses=_ERRORS)
def change_password(
    body: PasswordBody,
    request: Request,
    response: Response,
    principal: NewPassword,
) -> dict[str, Any]:
    accounts = _accounts(request)
    note(request, AuditEventType.PASSWORD_CHANGED, AuditAction.UPDATE, "user", principal.name)
    with request.app.state.archive.db.session() as session:
        user = _user(session, principal)
        try:
            accounts.change_password(session, user, body.current_password, body.new_password)
        except WeakPassword as exc:
            raise AuthError(400, ",".join(exc.codes), exc.message) from exc
        accounts.end_other_sessions(session, user.id, keep=principal.session_id)
        new = _advance(request, response, accounts, session, principal, Stage.FULL)
        user.last_login_at = accounts.clock.now()
    return _state(accounts, request, user, Stage.FULL, new.csrf_token)


@router.post("/api/auth/logout", summary="Sign out (ends the session)", responses=_ERRORS)
def logout(
    request: Request, response: Response, principal: Annotated[Principal, Depends(_ANY_STAGE)]
) -> dict[str, str]:
    note(request, AuditEventType.LOGOUT, AuditAction.EXECUTE, "user", principal.name)
    secure = request.app.state.archive.settings.security.cookie_secure
    session_name, csrf_name = cookie_names(secure)
    with request.app.state.archive.db.session() as session:
        if token := request.cookies.get(session_name):
            _accounts(request).end_session(session, token)
    for name in (session_name, csrf_name):
        response.delete_cookie(
            name, path="/", secure=secure, httponly=name == session_name, samesite="strict"
        )
    response.headers["Clear-Site-Data"] = '"cache", "cookies", "storage"'
    return {"status": "signed out"}


@router.post(
    "/api/oauth/token",
    summary="OAuth2 client credentials: a bearer token for an integration client",
    responses=_ERRORS,
)
def token(
    request: Request,
    _anyone: Annotated[Principal, Depends(Permit.public_route())],
    grant_type: Annotated[str, Form()],
    client_id: Annotated[str, Form(max_length=64)] = "",
    client_secret: Annotated[str, Form(max_length=128)] = "",
    scope: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """RFC 6749 4.4; the credentials come in the form or as HTTP Basic."""
    import base64

    from fastapi.responses import JSONResponse

    accounts = _accounts(request)
    basic = request.headers.get("authorization", "")
    if basic.lower().startswith("basic "):
        try:
            client_id, _, client_secret = base64.b64decode(basic[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            client_id = client_secret = ""
    request.state.actor = Actor(
        ActorType.CLIENT, client_id[:64] or "(none)", source=client_address(request)
    )
    note(request, AuditEventType.LOGIN, AuditAction.EXECUTE, "client", client_id[:64])
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if grant_type != "client_credentials":
        return JSONResponse({"error": "unsupported_grant_type"}, 400, headers=headers)
    settings = request.app.state.archive.settings
    with request.app.state.archive.db.session() as session:
        client = clients.client_for_secret(
            session=session, name=client_id, secret=client_secret, now=accounts.clock.now()
        )
        if client is None:
            return JSONResponse(
                {"error": "invalid_client"},
                401,
                headers={**headers, "WWW-Authenticate": 'Basic realm="cloudfilm"'},
            )
        try:
            bearer, row = clients.issue_token(
                session=session,
                client=client,
                now=accounts.clock.now(),
                minutes=settings.security.access_token_minutes,
                scopes=scope.split() if scope.strip() else None,
            )
        except PermissionDenied:
            return JSONResponse({"error": "invalid_scope"}, 400, headers=headers)
    return JSONResponse(
        {
            "access_token": bearer,
            "token_type": "Bearer",
            "expires_in": settings.security.access_token_minutes * 60,
            "scope": " ".join(row.scopes),
        },
        headers=headers,
    )
