"""The per-request read path survives a dropped database connection (no pre-ping)."""

from __future__ import annotations

from sqlalchemy import create_engine, literal, select, text

from cloudfilm.archive.ingest import Archive

from conftest import PG_ADMIN_URL


def test_read_once_recovers_from_a_dropped_connection(archive: Archive) -> None:
    db = archive.db
    assert [tuple(r) for r in db.read_once(select(literal(1)), {})] == [(1,)]
    if not db.is_sqlite:
        name = db.engine.url.database
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            ).scalar_one()
        admin.dispose()
        assert killed >= 1  # the pooled connection of the first read is gone
    assert [tuple(r) for r in db.read_once(select(literal(2)), {})] == [(2,)]
