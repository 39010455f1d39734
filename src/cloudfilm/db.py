"""Engine, sessions and the declarative base.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a
commit is on disk when it returns. Writers start with ``BEGIN IMMEDIATE``: two
deferred transactions that both try to upgrade to a write lock would fail with
"database is locked" instead of waiting for each other. Read-only sessions
(:func:`read_session`) start deferred and never block writers in WAL mode.

PostgreSQL runs with the server's defaults (``READ COMMITTED``); writers that
update aggregate rows lock them first (``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Executable,
    MetaData,
    Row,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from cloudfilm.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


_READONLY = "cloudfilm_readonly"


def database_url(settings: Settings) -> URL:
    url = make_url(settings.database_url)
    if settings.database.password is not None:
        url = url.set(password=settings.database.password.get_secret_value())
    return url


def create_db_engine(settings: Settings) -> Engine:
    """Create the engine for ``settings`` with the pragmas and pool the backend needs."""
    url = database_url(settings)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            from pathlib import Path

            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=settings.database.echo,
            connect_args={"check_same_thread": False, "timeout": 30},
            # pysqlite's own transaction handling is switched off: we emit BEGIN ourselves.
            isolation_level=None,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(
        url,
        echo=settings.database.echo,
        pool_size=settings.database.pool_size,
        pool_pre_ping=True,
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    readonly = conn.get_execution_options().get(_READONLY, False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def settings_of(session: Session) -> Settings:
    """The settings of the database ``session`` belongs to (``Database.info``): domain code
    that needs the application secret, or a section of the settings, finds them here."""
    settings = session.info.get("settings")
    if not isinstance(settings, Settings):
        raise RuntimeError("this session carries no settings: open it with Database.session()")
    return settings


class Database:
    """The engine and the two session factories of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings)
        # Sessions carry the settings: domain code that needs a key derived from the
        # application secret (the MPI's sealed identifiers) finds them in ``session.info``.
        info: dict[str, object] = {"settings": settings}
        self.info = info
        """What every session of this database carries in ``session.info``: ``settings``,
        and ``storage`` once an :class:`~cloudfilm.archive.ingest.Archive` opened one."""
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False, info=info)
        self._readonly_engine = self.engine.execution_options(**{_READONLY: True})
        self.read_factory = sessionmaker(self._readonly_engine, expire_on_commit=False, info=info)
        self._single_engine = (
            self._readonly_engine
            if self.is_sqlite
            else create_engine(
                database_url(settings),
                pool_size=2,
                max_overflow=settings.database.pool_size,
                pool_pre_ping=False,
                isolation_level="AUTOCOMMIT",
            )
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with self.session_factory.begin() as session:
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only transaction; it never takes the SQLite write lock."""
        with self.read_factory() as session:
            yield session

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A read-only Core connection, for hot paths that need no ORM session."""
        with self._readonly_engine.connect() as conn:
            yield conn

    def read_once(self, statement: Executable, params: dict[str, Any]) -> list[Row[Any]]:
        """The rows of one read statement, for the per-request authentication lookups.

        On PostgreSQL it runs in autocommit mode on a pool without pre-ping: no ``BEGIN``,
        ``ROLLBACK`` or ping round trips (one statement sees one snapshot anyway). A
        connection the server dropped is detected by the failure and the statement runs
        once more on a fresh one.
        """
        for attempt in (1, 2):
            try:
                with self._single_engine.connect() as conn:
                    return list(conn.execute(statement, params))
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
        self._single_engine.dispose()
