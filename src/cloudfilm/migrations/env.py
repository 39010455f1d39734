"""Alembic environment: the engine comes from the caller or from the cloudfilm settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from cloudfilm.config import Settings
from cloudfilm.db import create_db_engine
from cloudfilm.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine: Engine | None = config.attributes.get("engine")
    owned = engine is None
    if engine is None:
        engine = create_db_engine(Settings())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Our SQLite engine emits BEGIN itself; give Alembic a plain transaction.
                connection = connection.execution_options(cloudfilm_readonly=False)
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them online")
run_migrations_online()
