"""Migrations: up, down and up again on SQLite and PostgreSQL; the schema matches tables.py."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from cohortflow.storage import customers
from cohortflow.storage.db import Database, downgrade, migrate
from cohortflow.storage.tables import Base

REPO = Path(__file__).resolve().parent.parent
TABLES = set(Base.metadata.tables)
HEAD = "0017"


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def _tables(url: str) -> set[str]:
    database = Database(url)
    try:
        async with database.engine.connect() as connection:
            return await connection.run_sync(_table_names)
    finally:
        await database.dispose()


async def _revision(url: str) -> str | None:
    database = Database(url)
    try:
        async with database.transaction() as session:
            revision = await session.scalar(text("SELECT version_num FROM alembic_version"))
            return None if revision is None else str(revision)
    finally:
        await database.dispose()


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    assert {
        "customers",
        "customer_features",
        "consents",
        "campaigns",
        "campaign_specs",
        "campaign_entries",
        "approvals",
        "segment_assignments",
        "audit_log",
        "events",
        "cohorts",
        "cohort_members",
        "cohort_transitions",
        "launch_decisions",
        "outbound_reservations",
        "crm_effects",
        "crm_requests",
        "api_tokens",
        "profile_aliases",
        "signal_outbox",
        "cohort_refresh",
        "consent_history",
        "event_rollups",
        "feature_changes",
        "feature_snapshot",
    } == TABLES
    await migrate(database_url)
    assert _tables_without_alembic(await _tables(database_url)) == TABLES
    assert await _revision(database_url) == HEAD

    await downgrade(database_url)
    assert _tables_without_alembic(await _tables(database_url)) == set()
    assert await _revision(database_url) is None

    await migrate(database_url)
    assert _tables_without_alembic(await _tables(database_url)) == TABLES
    assert await _revision(database_url) == HEAD


def _tables_without_alembic(names: set[str]) -> set[str]:
    return names - {"alembic_version"}


async def test_an_unknown_time_zone_is_stored_as_null_and_down_as_utc(database_url: str) -> None:
    await migrate(database_url)
    database = Database(database_url)
    try:
        async with database.transaction() as session:
            await customers.upsert_customers(
                session, [customers.CustomerRecord("c_tz", "src-tz", None)]
            )
        async with database.transaction() as session:
            stored = await customers.get_customer(session, "c_tz")
            assert stored is not None and stored.timezone is None
    finally:
        await database.dispose()
    await downgrade(database_url, "0003")
    database = Database(database_url)
    try:
        async with database.transaction() as session:
            zone = await session.scalar(
                text("SELECT timezone FROM customers WHERE customer_key = 'c_tz'")
            )
        assert zone == "UTC"
    finally:
        await database.dispose()
    await migrate(database_url)
    assert await _revision(database_url) == HEAD


async def test_migrate_twice_is_a_no_op(database_url: str) -> None:
    await migrate(database_url)
    await migrate(database_url)
    assert await _revision(database_url) == HEAD


async def test_migrated_schema_matches_the_models(db: Database) -> None:
    async with db.engine.connect() as connection:
        diff = await connection.run_sync(_schema_diff)
    assert diff == []


async def test_alembic_command_line_reads_the_url_from_the_environment(database_url: str) -> None:
    env = {
        **os.environ,
        "COHORTFLOW_DATABASE_URL": database_url,
        "PYTHONPATH": str(REPO),
    }
    for args in (["upgrade", "head"], ["current"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "alembic",
            *args,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, stderr.decode()
    assert f"{HEAD} (head)" in stdout.decode()
    assert _tables_without_alembic(await _tables(database_url)) == TABLES
