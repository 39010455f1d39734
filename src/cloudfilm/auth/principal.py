"""Who is calling, with what they may do: the result of authentication, input to every
authorisation decision (HTTP routes, DIMSE services, object-level study checks)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, and_, false, or_

from cloudfilm.archive.matching import study_has_modality
from cloudfilm.archive.models import Study
from cloudfilm.audit.enums import ActorType
from cloudfilm.audit.service import Actor
from cloudfilm.auth.permissions import Duty, Permission
from cloudfilm.auth.roles import DataScope, Grant


class Stage(StrEnum):
    """How far a web session has come through login."""

    MFA = "mfa"
    """Password right; the second factor (or its enrolment) is pending."""
    PASSWORD = "password"
    """Must change the password before anything else."""
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: ActorType
    name: str
    roles: tuple[str, ...] = ()
    permissions: frozenset[Permission] = frozenset()
    study_scope: ColumnElement[bool] | None = None
    """Condition on :class:`Study` rows the caller may see; ``None``: every study."""
    duties: frozenset[Duty] = frozenset()
    stage: Stage = Stage.FULL
    user_id: int | None = None
    session_id: int | None = None
    csrf_token: str | None = field(default=None, repr=False)
    via_cookie: bool = False

    @property
    def authenticated(self) -> bool:
        return self.kind is not ActorType.ANONYMOUS

    def may(self, permission: Permission) -> bool:
        return self.stage is Stage.FULL and permission in self.permissions

    def actor(self, source: str | None, request_id: str | None = None) -> Actor:
        return Actor(
            self.kind,
            self.name,
            source=source,
            role=",".join(self.roles)[:64] or None,
            request_id=request_id,
        )


ANONYMOUS = Principal(ActorType.ANONYMOUS, "anonymous")


_LIKE_SPECIAL = re.compile(r"([\\%_])")


def _names_match(column: Any, names: list[str]) -> ColumnElement[bool]:
    """A PN column holding ``Alphabetic=Ideographic=Phonetic`` equals one of ``names`` in
    any of its groups."""
    parts: list[ColumnElement[bool]] = []
    for name in names:
        escaped = _LIKE_SPECIAL.sub(r"\\\1", name)
        parts += [
            column == name,
            column.like(f"{escaped}=%", escape="\\"),
            column.like(f"%={escaped}", escape="\\"),
            column.like(f"%={escaped}=%", escape="\\"),
        ]
    return or_(*parts)


def study_condition(
    grant: Grant, *, department: str | None, person_names: list[str]
) -> ColumnElement[bool] | None:
    """The SQL condition on :class:`Study` for the data scopes in ``grant`` (``None``: all).
    Built once per distinct scope, department and names: expressions are immutable."""
    if grant.unrestricted:
        return None
    return _condition(
        tuple(s.model_dump_json() for s in grant.scopes),
        department,
        tuple(n for n in person_names if n.strip()),
    )


@lru_cache(maxsize=1024)
def _condition(
    scopes: tuple[str, ...], department: str | None, names: tuple[str, ...]
) -> ColumnElement[bool]:
    alternatives: list[ColumnElement[bool]] = []
    for text in scopes:
        scope = DataScope.model_validate_json(text)
        narrowing: list[ColumnElement[bool]] = []
        if scope.own_department or scope.departments:
            departments = list(scope.departments)
            if scope.own_department and department:
                departments.append(department)
            narrowing.append(Study.department.in_(departments) if departments else false())
        if scope.modalities:
            narrowing.append(study_has_modality(scope.modalities))
        if scope.institutions:
            narrowing.append(Study.institution_name.in_(scope.institutions))
        if narrowing:
            alternatives.append(and_(*narrowing))
        if scope.own_patients and names:
            alternatives.append(_names_match(Study.referring_physician_name, list(names)))
    return or_(*alternatives) if alternatives else false()
