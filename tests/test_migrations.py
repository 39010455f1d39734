"""One linear Alembic history that builds exactly the tables the models declare."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from cloudfilm import migrations
from cloudfilm.config import Settings
from cloudfilm.db import create_db_engine
from cloudfilm.models import Base


def test_history_is_linear() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config())
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        assert revision.doc, f"revision {revision.revision} has no message"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_head_on_empty_database_matches_models(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        engine = create_db_engine(Settings(data_dir=tmp_path))
    else:
        admin_url = request.getfixturevalue("postgres_url")
        # A second, empty database next to the session's one.
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        name = "cf_migrate_" + tmp_path.name[-8:].replace("-", "_").lower()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = create_engine(admin.url.set(database=name))
        request.addfinalizer(lambda: _drop(admin, name))
    migrations.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert diff == []


def _drop(admin: object, name: str) -> None:
    from sqlalchemy import Engine

    assert isinstance(admin, Engine)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()
