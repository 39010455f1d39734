"""Administration of identities under separation of duties (``/api/admin``).

The system administrator manages accounts, departments and integration clients; the
security administrator manages roles, who holds them, lockouts and the security policy;
neither can read the audit trail (that is the audit administrator's, ``/api/audit``).
Request bodies refuse unknown fields, so a role or flag cannot ride along (mass
assignment); responses never carry a password hash or a secret other than a one-time
password just generated.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth import policy as policies
from cloudfilm.auth import service as clients
from cloudfilm.auth.accounts import Accounts
from cloudfilm.auth.guard import AuthError, Permit
from cloudfilm.auth.models import ApiClient, Department, Role, User, UserRole
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.auth.roles import RoleSpec, apply_spec, dump
from cloudfilm.clock import as_utc
from cloudfilm.errors import Conflict, NotFound
from cloudfilm.httpaudit import note

router = APIRouter(prefix="/api/admin", tags=["administration"])

Users = Annotated[Principal, Depends(Permit(Permission.USER_MANAGE))]
Roles = Annotated[Principal, Depends(Permit(Permission.ROLE_MANAGE))]
Policy = Annotated[Principal, Depends(Permit(Permission.POLICY_MANAGE))]
Clients = Annotated[Principal, Depends(Permit(Permission.CLIENT_MANAGE))]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed body or unknown field"},
    401: {"description": "not signed in"},
    403: {"description": "not permitted"},
    404: {"description": "no such user, role, department or client"},
    409: {"description": "conflicts with existing data or separation of duties"},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewUser(_Body):
    username: Annotated[str, Field(pattern=r"^[A-Za-z0-9._@-]{2,64}$")]
    display_name: Annotated[str, Field(max_length=64)] = ""
    department: Annotated[str | None, Field(max_length=32)] = None


class UserChange(_Body):
    display_name: Annotated[str | None, Field(max_length=64)] = None
    department: Annotated[str | None, Field(max_length=32)] = None
    enabled: bool | None = None


class RoleAssignment(_Body):
    roles: list[Annotated[str, Field(max_length=32)]]


class NewDepartment(_Body):
    code: Annotated[str, Field(min_length=1, max_length=32)]
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NewClient(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{2,64}$")]
    scopes: list[Permission] | None = None
    expires_days: Annotated[int | None, Field(ge=1, le=3650)] = None


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _db(request: Request) -> Any:
    return request.app.state.archive.db


def _user(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFound(f"没有此用户 · no user {username!r}")
    return user


def _user_view(session: Session, accounts: Accounts, user: User) -> dict[str, Any]:
    now = accounts.clock.now()
    return {
        "username": user.username,
        "display_name": user.display_name,
        "department": accounts.department_code(session, user),
        "enabled": user.enabled,
        "roles": [r.code for r in accounts.roles_of(session, user.id)],
        "locked": user.locked_until is not None and as_utc(user.locked_until) > now,
        "must_change_password": user.must_change_password,
        "mfa_enabled": user.totp_enabled,
        "last_login_at": user.last_login_at.isoformat() if user.last_login_at else None,
        "created_at": user.created_at.isoformat(),
    }


# ----------------------------------------------------------------------------- accounts


@router.get("/users", summary="List staff accounts", responses=_ERRORS)
def list_users(request: Request, _caller: Users) -> list[dict[str, Any]]:
    accounts = _accounts(request)
    with _db(request).read_session() as session:
        users = session.scalars(select(User).order_by(User.username))
        return [_user_view(session, accounts, u) for u in users]


@router.post("/users", summary="Create an account (one-time password)", responses=_ERRORS)
def create_user(body: NewUser, request: Request, _caller: Users) -> dict[str, Any]:
    accounts = _accounts(request)
    note(request, AuditEventType.USER_CHANGED, AuditAction.CREATE, "user", body.username)
    with _db(request).session() as session:
        user, password = accounts.create_user(
            session,
            username=body.username,
            display_name=body.display_name,
            department=body.department,
        )
        return {**_user_view(session, accounts, user), "one_time_password": password}


@router.patch("/users/{username}", summary="Change an account", responses=_ERRORS)
def update_user(username: str, body: UserChange, request: Request, caller: Users) -> dict[str, Any]:
    accounts = _accounts(request)
    changes = body.model_dump(exclude_unset=True)
    note(request, AuditEventType.USER_CHANGED, AuditAction.UPDATE, "user", username, detail=changes)
    with _db(request).session() as session:
        user = _user(session, username)
        if "display_name" in changes and body.display_name is not None:
            user.display_name = body.display_name
        if "department" in changes:
            user.department_id = accounts.department_id(session, body.department)
        if body.enabled is not None:
            if user.id == caller.user_id and not body.enabled:
                raise Conflict("不能停用自己的账户 · you cannot disable your own account")
            accounts.set_enabled(session, user, body.enabled)
        user.updated_at = accounts.clock.now()
        return _user_view(session, accounts, user)


@router.post(
    "/users/{username}/reset-password",
    summary="Give an account a new one-time password",
    responses=_ERRORS,
)
def reset_password(username: str, request: Request, _caller: Users) -> dict[str, str]:
    note(request, AuditEventType.PASSWORD_CHANGED, AuditAction.UPDATE, "user", username)
    with _db(request).session() as session:
        password = _accounts(request).reset_password(session, _user(session, username))
    return {"username": username, "one_time_password": password}


@router.get("/departments", summary="List departments", responses=_ERRORS)
def list_departments(request: Request, _caller: Users) -> list[dict[str, str]]:
    with _db(request).read_session() as session:
        rows = session.scalars(select(Department).order_by(Department.code))
        return [{"code": d.code, "name": d.name} for d in rows]


@router.post("/departments", summary="Create a department", responses=_ERRORS)
def create_department(body: NewDepartment, request: Request, _caller: Users) -> dict[str, str]:
    note(request, AuditEventType.USER_CHANGED, AuditAction.CREATE, "department", body.code)
    with _db(request).session() as session:
        if session.scalar(select(Department.id).where(Department.code == body.code)):
            raise Conflict(f"科室已存在 · department {body.code!r} exists")
        session.add(
            Department(code=body.code, name=body.name, created_at=_accounts(request).clock.now())
        )
    return {"code": body.code, "name": body.name}


# ----------------------------------------------------------------------------- roles


@router.get("/permissions", summary="The functional permissions roles can hold", responses=_ERRORS)
def list_permissions(_caller: Roles) -> list[dict[str, str | None]]:
    return [
        {"code": p.value, "label": p.label, "duty": p.duty.value if p.duty else None}
        for p in Permission
    ]


@router.get("/roles", summary="List roles", responses=_ERRORS)
def list_roles(request: Request, _caller: Roles) -> list[dict[str, Any]]:
    with _db(request).read_session() as session:
        return [dump(r) for r in session.scalars(select(Role).order_by(Role.id))]


@router.post("/roles", summary="Create a role", responses=_ERRORS)
def create_role(body: RoleSpec, request: Request, _caller: Roles) -> dict[str, Any]:
    note(
        request,
        AuditEventType.ROLE_CHANGED,
        AuditAction.CREATE,
        "role",
        body.code,
        detail=body.model_dump(mode="json"),
    )
    with _db(request).session() as session:
        if session.scalar(select(Role.id).where(Role.code == body.code)):
            raise Conflict(f"角色已存在 · role {body.code!r} exists")
        role = Role(builtin=False)
        apply_spec(role, body, _accounts(request).clock.now())
        session.add(role)
        session.flush()
        return dump(role)


def _role(session: Session, code: str) -> Role:
    role = session.scalars(select(Role).where(Role.code == code)).one_or_none()
    if role is None:
        raise NotFound(f"没有此角色 · no role {code!r}")
    return role


@router.put(
    "/roles/{code}", summary="Change a role's permissions, scope or access", responses=_ERRORS
)
def update_role(code: str, body: RoleSpec, request: Request, _caller: Roles) -> dict[str, Any]:
    note(
        request,
        AuditEventType.ROLE_CHANGED,
        AuditAction.UPDATE,
        "role",
        code,
        detail=body.model_dump(mode="json"),
    )
    accounts = _accounts(request)
    with _db(request).session() as session:
        role = _role(session, code)
        if body.code != code:
            raise Conflict("角色代码不可修改 · a role's code cannot change")
        if role.builtin and (role.duty or None) != (body.duty.value if body.duty else None):
            raise Conflict("内置角色的职责不可修改 · a built-in role keeps its duty")
        apply_spec(role, body, accounts.clock.now())
        # A change of privilege: holders sign in again under the new rules.
        for user_id in session.scalars(select(UserRole.user_id).where(UserRole.role_id == role.id)):
            accounts.end_sessions(session, user_id)
        return dump(role)


@router.delete("/roles/{code}", summary="Delete a role nobody holds", responses=_ERRORS)
def delete_role(code: str, request: Request, _caller: Roles) -> dict[str, str]:
    note(request, AuditEventType.ROLE_CHANGED, AuditAction.DELETE, "role", code)
    with _db(request).session() as session:
        role = _role(session, code)
        if role.builtin:
            raise Conflict("内置角色不可删除 · built-in roles cannot be deleted")
        if session.scalar(select(func.count()).where(UserRole.role_id == role.id)):
            raise Conflict("仍有用户持有此角色 · users still hold this role")
        session.delete(role)
    return {"deleted": code}


@router.get("/role-assignments", summary="Who holds which roles", responses=_ERRORS)
def list_assignments(request: Request, _caller: Roles) -> list[dict[str, Any]]:
    accounts = _accounts(request)
    with _db(request).read_session() as session:
        return [
            {
                "username": u.username,
                "display_name": u.display_name,
                "roles": [r.code for r in accounts.roles_of(session, u.id)],
            }
            for u in session.scalars(select(User).order_by(User.username))
        ]


@router.put("/users/{username}/roles", summary="Set the roles a user holds", responses=_ERRORS)
def assign_roles(
    username: str, body: RoleAssignment, request: Request, caller: Roles
) -> dict[str, Any]:
    note(
        request,
        AuditEventType.ROLE_CHANGED,
        AuditAction.UPDATE,
        "user",
        username,
        detail={"roles": body.roles},
    )
    accounts = _accounts(request)
    with _db(request).session() as session:
        user = _user(session, username)
        if user.id == caller.user_id:
            raise AuthError(
                403, "forbidden", "不能修改自己的角色 · you cannot change your own roles"
            )
        accounts.set_roles(session, user, body.roles)
        return _user_view(session, accounts, user)


@router.post("/users/{username}/unlock", summary="Lift a lockout", responses=_ERRORS)
def unlock_user(username: str, request: Request, _caller: Roles) -> dict[str, Any]:
    note(
        request,
        AuditEventType.USER_CHANGED,
        AuditAction.UPDATE,
        "user",
        username,
        detail={"unlock": True},
    )
    accounts = _accounts(request)
    with _db(request).session() as session:
        user = _user(session, username)
        accounts.unlock(user)
        return _user_view(session, accounts, user)


# ----------------------------------------------------------------------------- policy


@router.get("/policy", summary="The password, lockout and session policy", responses=_ERRORS)
def get_policy(request: Request, _caller: Policy) -> dict[str, Any]:
    with _db(request).read_session() as session:
        return policies.load(session).model_dump()


@router.put("/policy", summary="Change the security policy (audited)", responses=_ERRORS)
def put_policy(body: policies.SecurityPolicy, request: Request, caller: Policy) -> dict[str, Any]:
    with _db(request).session() as session:
        changes = policies.save(
            session, body, actor=caller.name, now=_accounts(request).clock.now()
        )
    note(
        request,
        AuditEventType.POLICY_CHANGED,
        AuditAction.UPDATE,
        "policy",
        policies.POLICY_KEY,
        detail={k: {"old": old, "new": new} for k, (old, new) in changes.items()},
    )
    return body.model_dump()


# ----------------------------------------------------------------------------- clients


def _client_view(client: ApiClient) -> dict[str, Any]:
    return {
        "name": client.name,
        "scopes": client.scopes,
        "enabled": client.enabled,
        "created_at": client.created_at.isoformat(),
        "expires_at": client.expires_at.isoformat() if client.expires_at else None,
    }


@router.get("/clients", summary="List integration clients", responses=_ERRORS)
def list_clients(request: Request, _caller: Clients) -> list[dict[str, Any]]:
    with _db(request).read_session() as session:
        return [
            _client_view(c) for c in session.scalars(select(ApiClient).order_by(ApiClient.name))
        ]


@router.post(
    "/clients", summary="Create an integration client (secret shown once)", responses=_ERRORS
)
def create_client(body: NewClient, request: Request, _caller: Clients) -> dict[str, Any]:
    note(request, AuditEventType.CLIENT_CHANGED, AuditAction.CREATE, "client", body.name)
    now = _accounts(request).clock.now()
    with _db(request).session() as session:
        client, secret = clients.create_client(
            session=session,
            name=body.name,
            now=now,
            scopes=[s.value for s in body.scopes] if body.scopes is not None else None,
            expires_at=now + timedelta(days=body.expires_days) if body.expires_days else None,
        )
        return {**_client_view(client), "client_secret": secret}


@router.post(
    "/clients/{name}/disable", summary="Disable a client and revoke its tokens", responses=_ERRORS
)
def disable_client(name: str, request: Request, _caller: Clients) -> dict[str, Any]:
    note(
        request,
        AuditEventType.CLIENT_CHANGED,
        AuditAction.UPDATE,
        "client",
        name,
        detail={"enabled": False},
    )
    with _db(request).session() as session:
        return _client_view(clients.set_enabled(session=session, name=name, enabled=False))
