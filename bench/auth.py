"""Identity benchmark: what a login costs and what authorisation adds to each request.

Run from the repository root::

    .venv/bin/python bench/auth.py
    .venv/bin/python bench/auth.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432

Measured, in a throw-away archive (SQLite in a temporary folder, or with ``--postgres`` a
throw-away database on that server, dropped at the end):

1. Password hashing with the configured argon2id parameters (and PBKDF2-HMAC-SM3 for
   comparison): one verification, median of 20.
2. A whole sign-in over HTTP (``POST /api/auth/login`` to the real app served by uvicorn
   on 127.0.0.1): median and p95 of 30, for a radiologist (no second factor).
3. Authorisation per request, in process: the ``Permit`` guard of a DICOMweb route
   (authenticate the session cookie or bearer token, load roles, check the access rule,
   build the data-scope condition, check the permission) on a fresh request each time:
   median and p95 of 2000 calls. The audit record every request also writes (one
   insert in its own transaction) is measured separately, 500 times.

No peer is involved: Orthanc's authorisation plugin delegates each request to an outside
web service, so the comparable figure is ours alone.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from starlette.requests import Request

from cloudfilm import httpaudit, migrations
from cloudfilm.app import create_app
from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.accounts import Accounts
from cloudfilm.auth.guard import Permit, cookie_names
from cloudfilm.auth.passwords import Hasher
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Stage
from cloudfilm.auth.roles import seed_builtin_roles
from cloudfilm.auth.service import create_client, issue_token
from cloudfilm.config import PasswordKdf, SecuritySettings, Settings
from cloudfilm.db import Database

PASSWORD = "Bench-Mark-2026!"


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3),
    }


def _time(action: Callable[[], Any], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


@contextmanager
def _database(postgres: str | None) -> Iterator[str | None]:
    if postgres is None:
        yield None
        return
    name = f"cloudfilm_bench_{secrets.token_hex(4)}"
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def hashing(settings: SecuritySettings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kdf in (PasswordKdf.ARGON2ID, PasswordKdf.PBKDF2_SM3):
        hasher = Hasher(settings.model_copy(update={"password_kdf": kdf}))
        stored = hasher.hash(PASSWORD)
        results[kdf.value] = _ms(
            _time(lambda h=hasher, s=stored: h.verify(s, PASSWORD), 20)  # type: ignore[misc]
        )
    results["argon2id"]["parameters"] = (
        f"t={settings.argon2_time_cost}, m={settings.argon2_memory_kib} KiB, "
        f"p={settings.argon2_parallelism}"
    )
    results["pbkdf2-sm3"]["parameters"] = f"{settings.pbkdf2_iterations} iterations"
    return results


def _serve(app: Any) -> tuple[uvicorn.Server, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def _request(app: Any, headers: dict[str, str]) -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/dicom-web/studies/1.2.3/metadata",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "scheme": "http",
            "app": app,
        }
    )


def run(postgres: str | None) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="cloudfilm-bench-auth-") as tmp,
        _database(postgres) as url,
    ):
        settings = Settings(data_dir=Path(tmp), **({"database": {"url": url}} if url else {}))
        db = Database(settings)
        migrations.upgrade(db.engine)
        archive = Archive(settings, db=db)
        accounts = Accounts(settings)
        with db.session() as session:
            seed_builtin_roles(session, accounts.clock.now())
            user, _ = accounts.create_user(
                session, username="bench", roles=["radiologist"], password=PASSWORD
            )
            user.must_change_password = False
            client, _ = create_client(session=session, name="bench", now=accounts.clock.now())
            bearer, _ = issue_token(
                session=session, client=client, now=accounts.clock.now(), minutes=600
            )
            session_token = accounts.open_session(
                session, user, Stage.FULL, source="127.0.0.1", user_agent="bench"
            )
        results: dict[str, Any] = {
            "database": "postgresql" if url else "sqlite",
            "hashing": hashing(settings.security),
        }
        app = create_app(archive)
        server, base = _serve(app)
        try:
            with httpx.Client() as http:
                body = {"username": "bench", "password": PASSWORD}
                http.post(f"{base}/api/auth/login", json=body)  # warm up
                results["login_http"] = _ms(
                    _time(lambda: http.post(f"{base}/api/auth/login", json=body), 30)
                )
        finally:
            server.should_exit = True
        permit = Permit(Permission.STUDY_READ)
        name, _ = cookie_names(True)
        for label, headers in (
            ("session_cookie", {"cookie": f"{name}={session_token.token}"}),
            ("bearer_token", {"authorization": f"Bearer {bearer}"}),
        ):

            def authorise(headers: dict[str, str] = headers) -> None:
                permit(_request(app, headers))

            _time(authorise, 50)  # warm up
            results[f"authorise_{label}"] = _ms(_time(authorise, 2000))
        audited = _request(app, {"cookie": f"{name}={session_token.token}"})
        permit(audited)
        audited.state.request_id = "bench"
        results["audit_record"] = _ms(
            _time(lambda: httpaudit._record(archive, audited, 200), 500)  # noqa: SLF001
        )
        archive.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="PostgreSQL server URL for a throw-away database")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.postgres)
    text_out = json.dumps(results, indent=2, ensure_ascii=False)
    print(text_out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text_out + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
