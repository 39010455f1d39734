"""PostgreSQL least privilege (SECURITY-CHECKS F1, F2) on a real server.

The DBA's part is done with the ``postgres`` superuser, as docs/install.md says: an owner
role, a business role without DBA rights, a database owned by the owner. Everything after
that runs as those two roles: ``cloudfilm migrate --grant-to`` as the owner, the archive
as the business role.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from typer.testing import CliRunner, Result

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.cli import app
from cloudfilm.config import Settings
from cloudfilm.db import Database
from cloudfilm.dbroles import PrivilegeError, grant_business_role

from conftest import DATA, PG_ADMIN_URL

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Cluster:
    """The throw-away roles and database of this module."""

    owner: str
    app: str
    database: str

    def url(self, role: str | None = None) -> str:
        """The test database as ``role`` (trust auth), or as the superuser of the server."""
        url = make_url(PG_ADMIN_URL).set(database=self.database)
        if role is not None:
            url = url.set(username=role, password=None)
        return url.render_as_string(hide_password=False)


def _admin(cluster: Cluster | None = None) -> Engine:
    url = cluster.url() if cluster else PG_ADMIN_URL
    return create_engine(url, isolation_level="AUTOCOMMIT")


def _cli(*args: str, **env: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Roles and database as the DBA creates them (docs/install.md 2.1), migrated and
    granted as the owner."""
    if os.environ.get("CLOUDFILM_TEST_NO_POSTGRES") == "1":
        pytest.skip("CLOUDFILM_TEST_NO_POSTGRES=1")
    suffix = secrets.token_hex(4)
    cluster = Cluster(f"cf_owner_{suffix}", f"cf_app_{suffix}", f"cf_priv_{suffix}")
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE ROLE "{cluster.owner}" LOGIN NOSUPERUSER NOCREATEROLE'))
            conn.execute(
                text(
                    f'CREATE ROLE "{cluster.app}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                    "NOREPLICATION NOBYPASSRLS"
                )
            )
            conn.execute(text(f'CREATE DATABASE "{cluster.database}" OWNER "{cluster.owner}"'))
        database_admin = _admin(cluster)
        with database_admin.connect() as conn:
            conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            conn.execute(text(f'ALTER SCHEMA public OWNER TO "{cluster.owner}"'))
            conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{cluster.database}" FROM PUBLIC'))
        database_admin.dispose()
        result = _cli(
            "migrate", "--grant-to", cluster.app, CLOUDFILM_DATABASE__URL=cluster.url(cluster.owner)
        )
        assert result.exit_code == 0, result.output
        yield cluster
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": cluster.database},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{cluster.database}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{cluster.app}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{cluster.owner}"'))
        admin.dispose()


@pytest.fixture
def as_app(cluster: Cluster) -> Iterator[Engine]:
    engine = create_engine(cluster.url(cluster.app))
    yield engine
    engine.dispose()


@pytest.fixture
def as_owner(cluster: Cluster) -> Iterator[Engine]:
    engine = create_engine(cluster.url(cluster.owner))
    yield engine
    engine.dispose()


def _denied(engine: Engine, sql: str) -> None:
    """``sql`` fails with PostgreSQL's insufficient_privilege (42501)."""
    with pytest.raises(ProgrammingError, match="permission denied") as caught:
        with engine.begin() as conn:
            conn.execute(text(sql))
    assert getattr(caught.value.orig, "sqlstate", None) == "42501"


def _production(url: str) -> dict[str, str]:
    return {
        "CLOUDFILM_ENVIRONMENT": "production",
        "CLOUDFILM_SECRET_KEY": secrets.token_urlsafe(30),
        "CLOUDFILM_DATABASE__URL": url,
    }


def test_business_role__has_no_dba_attributes(as_app: Engine) -> None:
    with as_app.connect() as conn:
        row = (
            conn.execute(
                text(
                    "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                    "FROM pg_roles WHERE rolname = current_user"
                )
            )
            .mappings()
            .one()
        )
    assert not any(row.values()), dict(row)


def test_business_role__owns_nothing_migrations_ran_as_owner(
    cluster: Cluster, as_app: Engine
) -> None:
    with as_app.connect() as conn:
        owners = dict(
            conn.execute(
                text(
                    "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S', 'v', 'm')"
                )
            ).all()
        )
        schemas = conn.scalar(
            text(
                "SELECT count(*) FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner "
                "WHERE r.rolname = current_user"
            )
        )
    assert {"audit_event", "instance", "alembic_version"} <= owners.keys()
    assert set(owners.values()) == {cluster.owner}
    assert schemas == 0


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE intruder (id int)",
        "CREATE TABLE public.intruder (id int)",
        "CREATE SCHEMA intruder",
        "CREATE TEMPORARY TABLE intruder (id int)",
    ],
)
def test_business_role__cannot_create_tables(as_app: Engine, sql: str) -> None:
    _denied(as_app, sql)


@pytest.mark.parametrize(
    "sql", ["ALTER TABLE audit_event ADD COLUMN intruder int", "DROP TABLE audit_event"]
)
def test_business_role__cannot_alter_or_drop_tables(as_app: Engine, sql: str) -> None:
    with pytest.raises(ProgrammingError, match="must be owner of table audit_event"):
        with as_app.begin() as conn:
            conn.execute(text(sql))


def test_audit_event__insert_and_select(as_app: Engine) -> None:
    """The application's own writer (hash chain, advisory lock) works as the app role."""
    from sqlalchemy.orm import Session

    from cloudfilm.audit import service as audit
    from cloudfilm.audit.enums import AuditAction, AuditEventType

    with Session(as_app) as session, session.begin():
        audit.record(
            session=session,
            actor=Actor.cli("pytest"),
            event_type=AuditEventType.APPLICATION_START,
            action=AuditAction.EXECUTE,
        )
    with as_app.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM audit_event WHERE actor_id = 'pytest'"))


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_event SET message = 'rewritten'",
        "DELETE FROM audit_event",
        "TRUNCATE audit_event",
        "UPDATE alembic_version SET version_num = 'x'",
        "DELETE FROM alembic_version",
        "INSERT INTO alembic_version VALUES ('x')",
    ],
)
def test_append_only_and_version_tables__refuse_changes(as_app: Engine, sql: str) -> None:
    _denied(as_app, sql)


def test_ordinary_tables__no_truncate(as_app: Engine) -> None:
    _denied(as_app, "TRUNCATE instance CASCADE")


def test_archive__ingests_and_reads_back_as_business_role(cluster: Cluster, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", database={"url": cluster.url(cluster.app)})
    archive = Archive(settings, db=Database(settings))
    try:
        result = archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=Actor.cli("pytest"))
        assert result.ok, result.reason
        with archive.db.read_session() as session:
            instance = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == result.sop_instance_uid)
            ).one()
            audited = session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.object_id == result.sop_instance_uid)
            )
        with archive.storage.open(instance.storage_key) as stored:
            assert dcmread(stored).SOPInstanceUID == result.sop_instance_uid
        assert audited
    finally:
        archive.close()


def test_migrate__setting_grants_tables_added_later(
    cluster: Cluster, as_owner: Engine, as_app: Engine
) -> None:
    with as_owner.begin() as conn:
        conn.execute(text("CREATE TABLE added_later (id serial PRIMARY KEY, note text)"))
    try:
        _denied(as_app, "INSERT INTO added_later (note) VALUES ('x')")
        result = _cli(
            "migrate",
            CLOUDFILM_DATABASE__URL=cluster.url(cluster.owner),
            CLOUDFILM_DATABASE__APP_ROLE=cluster.app,
        )
        assert result.exit_code == 0, result.output
        with as_app.begin() as conn:
            conn.execute(text("INSERT INTO added_later (note) VALUES ('x')"))
            conn.execute(text("UPDATE added_later SET note = 'y'"))
        _denied(as_app, "TRUNCATE added_later")
    finally:
        with as_owner.begin() as conn:
            conn.execute(text("DROP TABLE added_later"))


def test_grant__new_append_only_table_gets_insert_and_select_only(
    cluster: Cluster, as_owner: Engine, as_app: Engine
) -> None:
    with as_owner.begin() as conn:
        conn.execute(text("CREATE TABLE journal (id serial PRIMARY KEY, note text)"))
    try:
        grant_business_role(as_owner, cluster.app, append_only=("audit_event", "journal"))
        with as_app.begin() as conn:
            conn.execute(text("INSERT INTO journal (note) VALUES ('x')"))
            assert conn.scalar(text("SELECT note FROM journal")) == "x"
        _denied(as_app, "UPDATE journal SET note = 'y'")
        _denied(as_app, "DELETE FROM journal")
    finally:
        with as_owner.begin() as conn:
            conn.execute(text("DROP TABLE journal"))


def test_grant__reports_create_left_to_public(cluster: Cluster, as_owner: Engine) -> None:
    admin = _admin(cluster)
    with admin.connect() as conn:
        conn.execute(text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    try:
        with pytest.raises(PrivilegeError, match="may create tables in public"):
            grant_business_role(as_owner, cluster.app)
    finally:
        with admin.connect() as conn:
            conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        admin.dispose()


@pytest.mark.parametrize("who", ["missing", "superuser", "owner"])
def test_migrate__refuses_a_role_that_is_not_a_business_role(cluster: Cluster, who: str) -> None:
    role, reason = {
        "missing": (f"cf_nobody_{secrets.token_hex(4)}", "does not exist"),
        "superuser": (make_url(PG_ADMIN_URL).username or "postgres", "superuser"),
        "owner": (cluster.owner, "owns the database"),
    }[who]
    result = _cli("migrate", "--grant-to", role, CLOUDFILM_DATABASE__URL=cluster.url(cluster.owner))
    assert result.exit_code == 2, result.output
    assert "不能作为业务角色" in result.output or "不存在" in result.output
    assert reason in result.output


def test_serve__refuses_superuser_in_production(cluster: Cluster) -> None:
    # A subprocess with a timeout: should the refusal ever regress, serve would run forever.
    process = subprocess.run(
        [sys.executable, "-m", "cloudfilm", "serve", "--http-port", "0", "--dicom-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **_production(cluster.url())},
    )
    assert process.returncode == 2, process.stderr
    assert "权限过大，生产环境拒绝启动" in process.stderr
    assert "refusing to start in production" in process.stderr
    assert "superuser (rolsuper)" in process.stderr


def test_open_archive__business_role_allowed_in_production(cluster: Cluster) -> None:
    result = _cli("client", "list", **_production(cluster.url(cluster.app)))
    assert result.exit_code == 0, result.output


def test_open_archive__superuser_refused_in_production(cluster: Cluster) -> None:
    result = _cli("client", "list", **_production(cluster.url()))
    assert result.exit_code == 2
    assert "生产环境拒绝启动" in result.output


def test_open_archive__superuser_only_warned_in_development(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    result = _cli(
        "client", "list", CLOUDFILM_ENVIRONMENT="development", CLOUDFILM_DATABASE__URL=cluster.url()
    )
    assert result.exit_code == 0, result.output
    assert "production would refuse to start" in caplog.text
