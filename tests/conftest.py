"""Shared fixtures: settings per test, SQLite and PostgreSQL, sample data, free ports."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.accounts import Accounts
from cloudfilm.clock import Clock, MovableClock
from cloudfilm.config import Settings
from cloudfilm.db import Database
from cloudfilm.models import Base

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLOUDFILM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
CT_134 = SHARED / "ct" / "pancreas_ct_cb_001_axial_134"

#: The server that holds the throw-away test database (trust auth on this machine).
PG_ADMIN_URL = os.environ.get(
    "CLOUDFILM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def shared_data(relative: str = "") -> Path:
    """A path in the shared sample data; skips the test when this machine has none."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared sample data not found at {path} (set CLOUDFILM_SAMPLE_DATA)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped at the end."""
    if os.environ.get("CLOUDFILM_TEST_NO_POSTGRES") == "1":
        pytest.skip("CLOUDFILM_TEST_NO_POSTGRES=1")
    name = f"cloudfilm_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once on SQLite and once on PostgreSQL."""
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    data_dir = tmp_path / "var"
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
        return Settings(data_dir=data_dir, database={"url": url})
    return Settings(data_dir=data_dir)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    db = Database(settings)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    archive = Archive(settings, db=db)
    yield archive
    archive.close()


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    """The real 134-slice CT (skips without the shared data)."""
    return sorted(shared_data("ct/pancreas_ct_cb_001_axial_134").glob("*.dcm"))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (Debian package dcmtk)")
    return path


@dataclass
class LiveServer:
    url: str
    archive: Archive
    token: str
    """A bearer token of the integration client ``pytest`` (every study permission)."""
    accounts: Accounts
    clock: MovableClock

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def live_server(archive: Archive) -> Iterator[LiveServer]:
    """The HTTP application on a loopback port (uvicorn in a thread), with a client token
    and a clock the test can move."""
    import threading
    import time

    import uvicorn

    from cloudfilm.app import create_app

    clock = MovableClock()
    app = create_app(archive, clock=clock)
    token = client_token(archive, clock)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    yield LiveServer(f"http://127.0.0.1:{port}", archive, token, app.state.accounts, clock)
    server.should_exit = True
    thread.join(timeout=10)


def client_token(archive: Archive, clock: Clock, name: str = "pytest") -> str:
    """A bearer token for integration client ``name`` (created with every study scope)."""
    from sqlalchemy import select

    from cloudfilm.auth.models import ApiClient
    from cloudfilm.auth.service import create_client, issue_token

    with archive.db.session() as session:
        client = session.scalars(select(ApiClient).where(ApiClient.name == name)).one_or_none()
        if client is None:
            client, _ = create_client(session=session, name=name, now=clock.now())
        token, _ = issue_token(session=session, client=client, now=clock.now(), minutes=600)
    return token
