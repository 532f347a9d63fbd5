"""Engines, sessions and migrations for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from cohortflow.observability import trace_statements
from cohortflow.storage.write_turns import WriteTurns

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A point read runs on the event loop: if SQLite cannot answer it at once (a WAL reader only
# waits in rare cases, such as another connection recovering the WAL), it gives up after
# this long and the caller reads through the async driver instead.
POINT_READ_BUSY_TIMEOUT_MS = 20
# Execution option naming the SQLite BEGIN mode; only read-only sessions use DEFERRED.
_SQLITE_BEGIN = "cohortflow_sqlite_begin"
# Held for the whole migration transaction so two processes starting together on one
# PostgreSQL database do not both try to create the same tables.
MIGRATION_LOCK_ID = 0x636F686F72746D67  # "cohortmg"


def create_engine(url: str) -> AsyncEngine:
    """Create an async engine tuned for several processes sharing the database.

    SQLite: the file's directory is created; every connection runs in WAL mode with a busy
    timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so writers queue on the
    lock instead of failing with "database is locked" when a read turns into a write.
    PostgreSQL: a pre-pinged, recycled connection pool. Statements are traced where the
    process records spans.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        _install_sqlite_transaction_control(engine)
    else:
        engine = create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            pool_timeout=30,
            pool_recycle=1800,
            pool_pre_ping=True,
        )
    trace_statements(engine)
    return engine


def _install_sqlite_transaction_control(engine: AsyncEngine) -> None:
    """SQLAlchemy's recipe for taking BEGIN away from the sqlite3 driver, made IMMEDIATE."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # None stops the driver from issuing its own deferred BEGIN (and COMMIT before DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine and its session factories; one per process and database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        if self.engine.dialect.name == "sqlite":
            reader = self.engine.execution_options(**{_SQLITE_BEGIN: "DEFERRED"})
        else:
            reader = self.engine.execution_options(postgresql_readonly=True)
        self._read_sessionmaker = async_sessionmaker(reader, expire_on_commit=False)
        self._point_path = _sqlite_file(url)
        self._point_reader: sqlite3.Connection | None = None
        # SQLite file: writers take turns before they begin (``storage.write_turns``).
        self._turns = None if self._point_path is None else WriteTurns(self._point_path)

    @property
    def dialect(self) -> str:
        """The dialect name: ``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on error.

        On SQLite the transaction holds the database's write lock from its first statement
        (``BEGIN IMMEDIATE``): keep it short, and never wait inside it for another
        transaction of the same database. Writers take turns before they begin, in the
        process and across processes (a SQLite file only, ``storage.write_turns``).
        """
        # The wait is read at each call, so a test can shorten it as it shortens SQLite's.
        turn = (
            self._turns.take(SQLITE_BUSY_TIMEOUT_MS / 1000)
            if self._turns is not None
            else contextlib.nullcontext()
        )
        async with turn, self.sessionmaker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read_transaction(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction for long reads such as verifying the audit chain.

        On SQLite it begins DEFERRED, so it reads a WAL snapshot without taking the write
        lock that every ``transaction()`` holds from its start; writing inside it is not
        supported. On PostgreSQL it is a ``READ ONLY`` transaction.
        """
        async with self._read_sessionmaker() as session, session.begin():
            yield session

    def point_read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
        """The raw rows of one SELECT, run on the calling thread; None where the caller must
        read through a session instead (PostgreSQL, an in-memory SQLite, SQLite busy).

        For the hot path's single-row lookups on a SQLite file: a key lookup costs tens of
        microseconds, where a session's round trips to the async driver's thread cost over
        a millisecond. One statement reads one WAL snapshot, as a read transaction does;
        the connection cannot write (``query_only``).
        """
        reader = self._point_reader or self._open_point_reader()
        if reader is None:
            return None
        try:
            return reader.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return None

    def _open_point_reader(self) -> sqlite3.Connection | None:
        if self._point_path is None:
            return None
        # Not thread-bound: activities of one worker may run on more than one thread; the
        # SQLite library serialises use of one connection.
        reader = sqlite3.connect(
            self._point_path,
            isolation_level=None,
            check_same_thread=False,
            timeout=POINT_READ_BUSY_TIMEOUT_MS / 1000,
        )
        reader.execute("PRAGMA query_only=ON")
        self._point_reader = reader
        return reader

    async def dispose(self) -> None:
        """Close every pooled connection (and the turn file)."""
        if self._turns is not None:
            self._turns.close()
        if self._point_reader is not None:
            self._point_reader.close()
            self._point_reader = None
        await self.engine.dispose()


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases, in-memory and ``file:`` URIs."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database).expanduser()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _run_alembic(connection: Connection, direction: str, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
    config = _alembic_config()
    # env.py runs on this connection instead of opening its own event loop and engine.
    config.attributes["connection"] = connection
    if direction == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def _run_migrations(url: str, direction: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_alembic, direction, revision)
    finally:
        await engine.dispose()


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``, in one transaction."""
    await _run_migrations(url, "upgrade", revision)


async def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``, in one transaction."""
    await _run_migrations(url, "downgrade", revision)


async def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url``; None when it has none (or no file).

    Never creates anything: operator commands call this before touching the database.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        # A cheap stat; an async file API would add a dependency for nothing.
        missing = not Path(database).expanduser().exists()  # noqa: ASYNC240
        if database and database != ":memory:" and missing:
            return None
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()
