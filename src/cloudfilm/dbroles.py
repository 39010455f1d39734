"""PostgreSQL least privilege: the owner role migrates, the business role touches only rows.

The procurement and CIS PostgreSQL 4.2 ask that the role the application connects as is no
DBA: no superuser, no CREATEROLE/CREATEDB/REPLICATION/BYPASSRLS, owner of nothing, unable
to create tables, and unable to change or remove audit records (GB/T 22239 安全审计c,
SECURITY-CHECKS F1/F2). Migrations therefore run as a separate owner role, and
:func:`grant_business_role` then gives the business role exactly the row access it needs.

The grants are computed from the tables the database has, not from a list in the code, so
running ``cloudfilm migrate --grant-to ROLE`` after every migration also covers the tables
that migration added. That re-run is the contract; no ``ALTER DEFAULT PRIVILEGES`` is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text

from cloudfilm.config import Environment, Settings
from cloudfilm.errors import CloudFilmError

logger = logging.getLogger(__name__)

APPEND_ONLY_TABLES: tuple[str, ...] = ("audit_event",)
"""Tables whose rows are never changed or removed once written: the business role may only
insert and read them, so that no application bug or stolen connection can rewrite history."""

READ_ONLY_TABLES: tuple[str, ...] = ("alembic_version",)
"""Tables the business role only reads: it checks the schema version at startup, and only
the owner role may move it."""

ROW_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
"""What the business role may do on an ordinary table."""

APPEND_PRIVILEGES = frozenset({"SELECT", "INSERT"})
READ_PRIVILEGES = frozenset({"SELECT"})
SEQUENCE_PRIVILEGES = frozenset({"USAGE", "SELECT"})
"""``nextval`` needs USAGE; UPDATE (``setval``) is left to the owner."""

#: Every table privilege ``has_table_privilege`` knows on PostgreSQL 13-16 (17 adds
#: MAINTAIN, which ``REVOKE ALL`` takes away as well).
_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
_SEQUENCE_PRIVILEGES = ("USAGE", "SELECT", "UPDATE")

#: Role attributes a business role must not have, with what each one allows.
_ROLE_ATTRIBUTES = {
    "rolsuper": "超级用户 · superuser (rolsuper)",
    "rolcreaterole": "可创建角色 · may create roles (rolcreaterole)",
    "rolcreatedb": "可创建数据库 · may create databases (rolcreatedb)",
    "rolreplication": "可复制整个集群 · may stream replication (rolreplication)",
    "rolbypassrls": "可绕过行级安全 · bypasses row-level security (rolbypassrls)",
}


class PrivilegeError(CloudFilmError):
    """A database role has other rights than least privilege gives it; the message lists them."""


@dataclass(frozen=True, slots=True)
class PrivilegeReport:
    """How the effective rights of a role differ from what :func:`grant_business_role` gives."""

    excess: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def expected_privileges(table: str, append_only: tuple[str, ...]) -> frozenset[str]:
    """The table privileges the business role gets on ``table``."""
    if table in READ_ONLY_TABLES:
        return READ_PRIVILEGES
    if table in append_only:
        return APPEND_PRIVILEGES
    return ROW_PRIVILEGES


def role_problems(conn: Connection, role: str) -> list[str]:
    """What makes ``role`` more than a business role, beyond what table grants can change:
    its attributes, and ownership (directly or through membership) of the database, the
    schema or its tables, any of which lets it alter or drop them.

    Raises
    ------
    PrivilegeError
        When the role does not exist.
    """
    row = (
        conn.execute(
            text(
                "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                "FROM pg_roles WHERE rolname = :role"
            ),
            {"role": role},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise PrivilegeError(
            f"数据库角色 {role!r} 不存在，请先由 DBA 创建 · the database role {role!r} does not "
            "exist; the DBA creates it first (docs/install.md)"
        )
    problems = [label for attribute, label in _ROLE_ATTRIBUTES.items() if row[attribute]]
    owned = conn.execute(
        text(
            "SELECT 'database', current_database() FROM pg_database "
            "WHERE datname = current_database() AND pg_has_role(:role, datdba, 'MEMBER') "
            "UNION ALL SELECT 'schema', nspname FROM pg_namespace "
            "WHERE nspname = current_schema() AND pg_has_role(:role, nspowner, 'MEMBER') "
            "UNION ALL SELECT 'relation', c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'S', 'v', 'm') "
            "AND pg_has_role(:role, c.relowner, 'MEMBER')"
        ),
        {"role": role},
    ).all()
    for kind, label in (
        ("database", "数据库 · owns the database"),
        ("schema", "模式 · owns the schema"),
    ):
        problems += [f"拥有{label} {name}" for k, name in owned if k == kind]
    relations = sorted(name for kind, name in owned if kind == "relation")
    if relations:
        shown = ", ".join(relations[:5]) + (", ..." if len(relations) > 5 else "")
        problems.append(
            f"拥有 {len(relations)} 个表或序列 · owns {len(relations)} tables or sequences: "
            f"{shown} (could ALTER or DROP them)"
        )
    return problems


def privilege_report(
    conn: Connection, role: str, *, append_only: tuple[str, ...] = APPEND_ONLY_TABLES
) -> PrivilegeReport:
    """Compare the effective rights of ``role`` (its own grants, PUBLIC's and its roles')
    with what a business role gets on the current schema."""
    report = PrivilegeReport()
    creates = conn.execute(
        text(
            "SELECT has_schema_privilege(:role, current_schema(), 'CREATE'), "
            "has_database_privilege(:role, current_database(), 'CREATE'), current_schema()"
        ),
        {"role": role},
    ).one()
    if creates[0]:
        report.excess.append(f"可在模式 {creates[2]} 中建表 · may create tables in {creates[2]}")
    if creates[1]:
        report.excess.append("可在数据库中建模式 · may create schemas in the database")
    effective = _effective_privileges(conn, role, "r", _TABLE_PRIVILEGES)
    for table, granted in effective.items():
        _compare(report, table, granted, expected_privileges(table, append_only))
    for sequence, granted in _effective_privileges(conn, role, "S", _SEQUENCE_PRIVILEGES).items():
        _compare(report, sequence, granted, SEQUENCE_PRIVILEGES)
    return report


def _effective_privileges(
    conn: Connection, role: str, kind: str, privileges: tuple[str, ...]
) -> dict[str, frozenset[str]]:
    """Relation name → privileges ``role`` holds, for every relation of ``kind`` ('r' for
    tables, including partitioned ones; 'S' for sequences) in the current schema."""
    check = "has_sequence_privilege" if kind == "S" else "has_table_privilege"
    kinds = ["S"] if kind == "S" else ["r", "p"]
    rows = conn.execute(
        text(
            f"SELECT c.relname, array_remove(array_agg(CASE WHEN {check}(:role, c.oid, p) "
            "THEN p END), NULL) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN unnest(CAST(:privileges AS text[])) AS p "
            "WHERE n.nspname = current_schema() AND CAST(c.relkind AS text) = ANY(:kinds) "
            "GROUP BY c.relname ORDER BY c.relname"
        ),
        {"role": role, "privileges": list(privileges), "kinds": kinds},
    ).all()
    return {name: frozenset(granted) for name, granted in rows}


def _compare(
    report: PrivilegeReport, name: str, granted: frozenset[str], expected: frozenset[str]
) -> None:
    if excess := granted - expected:
        report.excess.append(f"{name}: 多余权限 · more than it needs: {', '.join(sorted(excess))}")
    if missing := expected - granted:
        report.missing.append(f"{name}: 缺少权限 · lacks {', '.join(sorted(missing))}")


def check_business_role(engine: Engine, role: str) -> None:
    """Refuse ``role`` as the business role before anything is changed.

    Raises
    ------
    PrivilegeError
        When the database is not PostgreSQL, the role does not exist, or it has attributes
        or ownerships no grant can take away.
    """
    if engine.dialect.name != "postgresql":
        raise PrivilegeError(
            "只有 PostgreSQL 有数据库角色 · only PostgreSQL has database roles; "
            "--grant-to and database.app_role apply to PostgreSQL only"
        )
    with engine.connect() as conn:
        problems = role_problems(conn, role)
    if problems:
        raise PrivilegeError(
            f"数据库角色 {role!r} 不能作为业务角色 · the role {role!r} cannot be the business "
            "role; create it NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            "and owning nothing (docs/install.md):\n" + _bullets(problems)
        )


def grant_business_role(
    engine: Engine, role: str, *, append_only: tuple[str, ...] = APPEND_ONLY_TABLES
) -> None:
    """Give ``role`` row access to every table and sequence of the current schema and
    nothing more, in one transaction, then verify the rights it ends up with.

    Run it as the owner role after every migration. Privileges granted to PUBLIC on these
    tables are revoked as well: PUBLIC includes the business role.

    Raises
    ------
    PrivilegeError
        When the role is refused (see :func:`check_business_role`), or when its effective
        rights still differ afterwards, e.g. through PUBLIC's CREATE on the schema or tables
        this connection does not own. The grants made are kept.
    """
    check_business_role(engine, role)
    with engine.begin() as conn:
        quote = conn.dialect.identifier_preparer.quote_identifier
        grantee = quote(role)
        schema = quote(str(conn.scalar(text("SELECT current_schema()"))))
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {grantee}")
        conn.exec_driver_sql(f"REVOKE CREATE ON SCHEMA {schema} FROM {grantee}")
        for table in _relations(conn, ("r", "p")):
            target = f"{schema}.{quote(table)}"
            privileges = ", ".join(sorted(expected_privileges(table, append_only)))
            conn.exec_driver_sql(f"REVOKE ALL ON TABLE {target} FROM {grantee}, PUBLIC")
            conn.exec_driver_sql(f"GRANT {privileges} ON TABLE {target} TO {grantee}")
        for sequence in _relations(conn, ("S",)):
            target = f"{schema}.{quote(sequence)}"
            conn.exec_driver_sql(f"REVOKE ALL ON SEQUENCE {target} FROM {grantee}, PUBLIC")
            conn.exec_driver_sql(f"GRANT USAGE, SELECT ON SEQUENCE {target} TO {grantee}")
    with engine.connect() as conn:
        report = privilege_report(conn, role, append_only=append_only)
    if report.excess or report.missing:
        raise PrivilegeError(
            f"授权后角色 {role!r} 的权限仍不符合最小权限 · after granting, the rights of {role!r} "
            "still differ from least privilege; the DBA fixes these (e.g. REVOKE CREATE ON "
            "SCHEMA public FROM PUBLIC; run migrate as the owner of every table):\n"
            + _bullets(report.excess + report.missing)
        )


def _relations(conn: Connection, kinds: tuple[str, ...]) -> list[str]:
    return list(
        conn.scalars(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND CAST(c.relkind AS text) = ANY(:kinds) "
                "ORDER BY c.relname"
            ),
            {"kinds": list(kinds)},
        )
    )


def service_role_problems(conn: Connection) -> list[str]:
    """Why the role of ``conn`` should not serve: DBA attributes or ownership first (then
    nothing else matters), otherwise rights beyond a business role's, such as changing the
    audit trail or creating tables."""
    role = str(conn.scalar(text("SELECT current_user")))
    return role_problems(conn, role) or privilege_report(conn, role).excess


def startup_refusal(settings: Settings, engine: Engine) -> str | None:
    """The message a production start is refused with when the connected role could do
    more than the service needs (SECURITY-CHECKS F1/F2).

    Outside production the finding is only logged, so that a developer's local superuser
    keeps working. SQLite has no roles: nothing to check.
    """
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        role = str(conn.scalar(text("SELECT current_user")))
        problems = service_role_problems(conn)
    if not problems:
        return None
    findings = _bullets(problems)
    advice = (
        "请以业务角色连接，并由属主角色运行 `cloudfilm migrate --grant-to <业务角色>`（见 "
        "docs/install.md）· connect as the business role, and run `cloudfilm migrate "
        "--grant-to <business role>` as the owner role (see docs/install.md)."
    )
    if settings.environment is Environment.PRODUCTION:
        return (
            f"数据库角色 {role!r} 权限过大，生产环境拒绝启动 · the database role {role!r} may do "
            f"more than the service needs; refusing to start in production:\n{findings}\n{advice}"
        )
    logger.warning(
        "数据库角色 %r 权限过大（生产环境将拒绝启动）· the database role %r may do more than "
        "the service needs (production would refuse to start):\n%s\n%s",
        role,
        role,
        findings,
        advice,
    )
    return None


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"  - {line}" for line in lines)
