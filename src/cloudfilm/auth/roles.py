"""Roles as data: validation of their three dimensions, the built-in set, and what a
user's roles grant at a given moment from a given address."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time
from functools import lru_cache
from typing import Annotated, Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloudfilm.auth.models import Role
from cloudfilm.auth.permissions import Duty, Permission
from cloudfilm.errors import Conflict

_Model = TypeVar("_Model", bound=BaseModel)


class DataScope(BaseModel):
    """Which studies a role's permissions reach. ``all`` opens everything; otherwise the
    listed dimensions narrow together (department and modality and institution), and
    ``own_patients`` adds the studies the user referred."""

    model_config = ConfigDict(extra="forbid")

    all: bool = False
    own_department: bool = False
    departments: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list)
    modalities: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=list)
    institutions: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list)
    own_patients: bool = False


_HOURS = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d$")


class AccessRule(BaseModel):
    """Where and when a role applies; empty lists mean anywhere / any time."""

    model_config = ConfigDict(extra="forbid")

    networks: list[str] = Field(default_factory=list)
    """Source networks in CIDR notation, e.g. ``10.1.0.0/16``."""
    hours: str | None = None
    """Daily window ``HH:MM-HH:MM`` in the hospital's time zone (may wrap midnight)."""
    weekdays: list[Annotated[int, Field(ge=1, le=7)]] = Field(default_factory=list)
    """ISO weekdays (1 = Monday)."""
    timezone: str = "Asia/Shanghai"

    @field_validator("networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v.strip(), strict=False)) for v in value]

    @field_validator("hours")
    @classmethod
    def _check_hours(cls, value: str | None) -> str | None:
        if value is not None and not _HOURS.match(value):
            raise ValueError("hours is HH:MM-HH:MM, e.g. 07:30-20:00")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        ZoneInfo(value)
        return value

    def allows(self, address: str | None, now: datetime) -> bool:
        if self.networks:
            try:
                ip = ipaddress.ip_address(address or "")
            except ValueError:
                return False
            if not any(ip in ipaddress.ip_network(n) for n in self.networks):
                return False
        local = now.astimezone(ZoneInfo(self.timezone))
        if self.weekdays and local.isoweekday() not in self.weekdays:
            return False
        if self.hours:
            start_text, end_text = self.hours.split("-")
            start, end = _parse_time(start_text), _parse_time(end_text)
            at = local.time()
            inside = start <= at < end if start <= end else at >= start or at < end
            if not inside:
                return False
        return True


def _parse_time(text: str) -> time:
    hours, minutes = (int(p) for p in text.split(":"))
    return time.max if hours == 24 else time(hours, minutes)


class RoleSpec(BaseModel):
    """A role as the security administrator writes it (API body, built-in definitions)."""

    model_config = ConfigDict(extra="forbid")

    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{1,31}$")]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    name_en: Annotated[str, Field(max_length=64)] = ""
    description: Annotated[str, Field(max_length=255)] = ""
    duty: Duty | None = None
    permissions: list[Permission] = Field(default_factory=list)
    data_scope: DataScope = Field(default_factory=DataScope)
    access: AccessRule = Field(default_factory=AccessRule)

    def check_duty(self) -> None:
        """Permissions reserved to an administrator duty go only to roles of that duty;
        permissions of devices (``kiosk:print``) go to no role."""
        for permission in self.permissions:
            if permission.client_only:
                raise Conflict(
                    f"权限 {permission.value} 只能授予接口客户端（如自助打印机），不能授予角色 · "
                    f"{permission.value} is for integration clients (devices such as "
                    "kiosks), not for roles"
                )
            if permission.duty is not None and permission.duty != self.duty:
                raise Conflict(
                    f"权限 {permission.value} 只能授予{_DUTY_ZH[permission.duty]}角色 · "
                    f"{permission.value} is reserved to the {permission.duty.value} "
                    "administrator duty"
                )


_DUTY_ZH = {Duty.SYSTEM: "系统管理员", Duty.SECURITY: "安全管理员", Duty.AUDIT: "审计管理员"}

_ALL = DataScope(all=True)
BUILTIN_ROLES = (
    RoleSpec(
        code="sysadmin",
        name="系统管理员",
        name_en="System administrator",
        description="用户、部门、接口客户端与系统运行 · users, departments, clients, operations",
        duty=Duty.SYSTEM,
        permissions=[
            Permission.USER_MANAGE,
            Permission.CLIENT_MANAGE,
            Permission.STORAGE_MANAGE,
            Permission.ARCHIVE_STATS,
            Permission.NOTIFY_READ,
        ],
    ),
    RoleSpec(
        code="secadmin",
        name="安全管理员",
        name_en="Security administrator",
        description="角色授权、安全策略、账户解锁 · roles, security policy, unlocking",
        duty=Duty.SECURITY,
        permissions=[Permission.ROLE_MANAGE, Permission.POLICY_MANAGE],
    ),
    RoleSpec(
        code="auditadmin",
        name="审计管理员",
        name_en="Audit administrator",
        description="审计记录查询与导出 · audit trail review and export",
        duty=Duty.AUDIT,
        permissions=[Permission.AUDIT_READ, Permission.AUDIT_EXPORT],
    ),
    RoleSpec(
        code="finance",
        name="财务/统计",
        name_en="Finance and statistics",
        description="云胶片收费记录、HIS 收费清单导入与对账 · charges, HIS charge lists, "
        "reconciliation",
        permissions=[Permission.BILLING_RECONCILE, Permission.ARCHIVE_STATS],
    ),
    RoleSpec(
        code="clinician",
        name="临床医生",
        name_en="Clinician",
        description="本科室患者的影像与报告 · images of the own department's patients",
        permissions=[Permission.STUDY_SEARCH, Permission.STUDY_READ, Permission.PATIENT_READ],
        data_scope=DataScope(own_department=True, own_patients=True),
    ),
    RoleSpec(
        code="radiologist",
        name="影像科医生",
        name_en="Radiologist",
        description="全部影像的查看与下载 · every study, view and download",
        permissions=[
            Permission.STUDY_SEARCH,
            Permission.STUDY_READ,
            Permission.STUDY_DOWNLOAD,
            Permission.PATIENT_READ,
        ],
        data_scope=_ALL,
    ),
    RoleSpec(
        code="operator",
        name="技师/操作员",
        name_en="Operator",
        description="影像上传与核对 · sending and checking studies",
        permissions=[
            Permission.STUDY_SEARCH,
            Permission.STUDY_READ,
            Permission.STUDY_STORE,
            Permission.ARCHIVE_STATS,
            Permission.PATIENT_READ,
            Permission.KIOSK_APPROVE,
        ],
        data_scope=_ALL,
    ),
    RoleSpec(
        code="archivist",
        name="档案管理员",
        name_en="Archive manager",
        description="影像删除、恢复与保留期限 · deletions, recycle bin, retention",
        permissions=[
            Permission.STUDY_SEARCH,
            Permission.STUDY_READ,
            Permission.STUDY_DELETE,
            Permission.ARCHIVE_STATS,
            Permission.PATIENT_READ,
            Permission.PATIENT_MERGE,
        ],
        data_scope=_ALL,
    ),
    RoleSpec(
        code="integration",
        name="集成客户端",
        name_en="Integration client",
        description="对接系统（RIS、HIS、前置机、阅片器）· RIS, HIS, gateway, viewers",
        permissions=[
            Permission.STUDY_SEARCH,
            Permission.STUDY_READ,
            Permission.STUDY_DOWNLOAD,
            Permission.STUDY_STORE,
            Permission.ARCHIVE_STATS,
            Permission.PATIENT_READ,
            Permission.PATIENT_MERGE,
        ],
        data_scope=_ALL,
    ),
)


def apply_spec(role: Role, spec: RoleSpec, now: datetime) -> None:
    spec.check_duty()
    role.code = spec.code
    role.name, role.name_en, role.description = spec.name, spec.name_en, spec.description
    role.duty = spec.duty.value if spec.duty else None
    role.permissions = [p.value for p in spec.permissions]
    role.data_scope = spec.data_scope.model_dump()
    role.access = spec.access.model_dump()
    role.updated_at = now


def spec_of(role: Role) -> RoleSpec:
    return RoleSpec(
        code=role.code,
        name=role.name,
        name_en=role.name_en,
        description=role.description,
        duty=Duty(role.duty) if role.duty else None,
        permissions=[Permission(p) for p in role.permissions if p in _KNOWN],
        data_scope=DataScope.model_validate(role.data_scope or {}),
        access=AccessRule.model_validate(role.access or {}),
    )


_KNOWN = {p.value for p in Permission}


def seed_builtin_roles(session: Session, now: datetime) -> int:
    """Create the built-in roles that are missing (existing ones keep their edits)."""
    existing = set(session.scalars(select(Role.code)))
    added = 0
    for spec in BUILTIN_ROLES:
        if spec.code not in existing:
            role = Role(builtin=True)
            apply_spec(role, spec, now)
            session.add(role)
            added += 1
    session.flush()
    return added


def check_separation(roles: Iterable[Role]) -> None:
    """No user holds two of the three administrator duties."""
    duties = sorted({r.duty for r in roles if r.duty})
    if len(duties) > 1:
        names = "、".join(_DUTY_ZH[Duty(d)] for d in duties)
        raise Conflict(
            f"三员分立：同一用户不能兼任{names} · separation of duties: one user cannot hold "
            f"the {' and '.join(duties)} administrator roles together"
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What a user's roles allow right now, from where the request comes."""

    permissions: frozenset[Permission]
    scopes: tuple[DataScope, ...]
    """Data scopes of the roles that apply; studies visible under any of them."""
    duties: frozenset[Duty]
    role_codes: tuple[str, ...]

    @property
    def unrestricted(self) -> bool:
        return any(s.all for s in self.scopes)


class RoleRow(Protocol):
    """What :func:`grant_of` reads of a role: an ORM :class:`Role` or a Core row."""

    code: str
    duty: str | None
    permissions: list[str]
    data_scope: dict[str, Any]
    access: dict[str, Any]


def grant_of(roles: Iterable[RoleRow], address: str | None, now: datetime) -> Grant:
    permissions: set[Permission] = set()
    scopes: list[DataScope] = []
    duties: set[Duty] = set()
    codes: list[str] = []
    for role in roles:
        codes.append(role.code)
        if role.duty:
            duties.add(Duty(role.duty))
        if not _parsed(AccessRule, role.access).allows(address, now):
            continue
        permissions.update(Permission(p) for p in role.permissions if p in _KNOWN)
        scopes.append(_parsed(DataScope, role.data_scope))
    return Grant(frozenset(permissions), tuple(scopes), frozenset(duties), tuple(codes))


def _parsed(model: type[_Model], value: dict[str, Any] | None) -> _Model:
    """``value`` validated as ``model``, once per distinct value (roles change rarely and
    are read on every request)."""
    return _parse_json(model, json.dumps(value or {}, sort_keys=True))  # type: ignore[return-value]


@lru_cache(maxsize=512)
def _parse_json(model: type[BaseModel], text: str) -> BaseModel:
    return model.model_validate_json(text)


def dump(role: Role) -> dict[str, Any]:
    return {"id": role.id, "builtin": role.builtin, **spec_of(role).model_dump(mode="json")}
