"""The gateway's own state database on PostgreSQL (``gateway.database_url``) for the tests:
one throw-away database per run, its gateway tables dropped and created again per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cloudfilm.gateway.models import GatewayBase

from conftest import PG_ADMIN_URL


@pytest.fixture(scope="session")
def gateway_postgres_server() -> Iterator[str]:
    """A fresh PostgreSQL database for the gateway's state (never the archive's)."""
    if os.environ.get("CLOUDFILM_TEST_NO_POSTGRES") == "1":
        pytest.skip("CLOUDFILM_TEST_NO_POSTGRES=1")
    name = f"cloudfilm_gw_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def gateway_postgres_url(gateway_postgres_server: str) -> str:
    """The gateway database with empty tables (the gateway creates them at start)."""
    engine = create_engine(gateway_postgres_server)
    GatewayBase.metadata.drop_all(engine)
    engine.dispose()
    return gateway_postgres_server
