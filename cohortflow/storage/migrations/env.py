"""Alembic environment: async engines, the schema in ``cohortflow.storage.tables``.

``cohortflow.storage.db.migrate`` hands in an open connection through
``config.attributes["connection"]``; the ``alembic`` command line instead gets its URL from
``sqlalchemy.url`` or ``COHORTFLOW_DATABASE_URL`` and opens its own engine.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from cohortflow.storage.db import create_engine
from cohortflow.storage.tables import Base

config = context.config
target_metadata = Base.metadata

# Programmatic runs carry no ini file and leave the application's logging alone.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("COHORTFLOW_DATABASE_URL")
    if not url:
        raise RuntimeError(
            "no database URL: set COHORTFLOW_DATABASE_URL or sqlalchemy.url in alembic.ini"
        )
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; autogenerate must emit batch operations there.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def _run_on(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


def _run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (connection := config.attributes.get("connection")) is not None:
    _run_on(connection)
else:
    asyncio.run(_run_online())
