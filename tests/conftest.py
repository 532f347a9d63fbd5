"""Shared test fixtures.

Storage: ``database_url`` runs a test once on a SQLite file and once on a fresh PostgreSQL
database (``COHORTFLOW_TEST_POSTGRES_URL``); ``db`` is a migrated ``Database`` on it. An
unreachable PostgreSQL skips those tests, except under ``CI=true`` where it fails them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

from cohortflow.storage.db import Database, migrate

# Temporal (time-skipping), a trained model and the sandbox CRM for campaign tests.
pytest_plugins = ["tests.campaign_fixtures"]

# The test session is one deployment: every process it starts on the shared dev server
# (workers, APIs, CLI commands given the environment) seals payloads with one key ring, as
# compose gives every container one. Tests of the generated key file pass their own.
TEST_PAYLOAD_KEYS = '{"tests": "dGVzdHMtcGF5bG9hZC1rZXktMDEyMzQ1Njc4OWFiY2Q="}'
os.environ.setdefault("COHORTFLOW_PAYLOAD_KEYS", TEST_PAYLOAD_KEYS)

# ---------------------------------------------------------------- storage

POSTGRES_URL_ENV = "COHORTFLOW_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

_postgres_unreachable: list[str] = []


def _postgres_base_url() -> URL:
    return make_url(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL))


async def _postgres_admin(base: URL) -> asyncpg.Connection:
    """An admin connection to the base database, or skip (fail under CI) if unreachable."""
    if not _postgres_unreachable:
        dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            _postgres_unreachable.append(
                f"PostgreSQL unreachable at {base.render_as_string(hide_password=True)} "
                f"(set {POSTGRES_URL_ENV}): {exc!r}"
            )
    reason = _postgres_unreachable[0]
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so PostgreSQL tests may not skip", pytrace=False)
    pytest.skip(reason)


# For a test of one dialect's own behaviour: runs only there, rather than skipping elsewhere.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
postgres_only = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty database: a SQLite file, or a PostgreSQL database made for the test."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'db' / 'cohortflow.db'}"
        return
    base = _postgres_base_url()
    name = f"cohortflow_test_{uuid.uuid4().hex[:16]}"
    admin = await _postgres_admin(base)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await _postgres_admin(base)
        try:
            # FORCE: a failed test may leave connections (or child processes) behind.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A ``Database`` on ``database_url``, migrated to head."""
    await migrate(database_url)
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


# ---------------------------------------------------------------- NATS

NATS_URL_ENV = "COHORTFLOW_TEST_NATS_URL"


@pytest.fixture
async def nats_url() -> str:
    """The NATS server with JetStream the stream tests use; unreachable skips them, except
    under ``CI=true`` where it fails them."""
    import nats

    url = os.environ.get(NATS_URL_ENV, "nats://127.0.0.1:4222")
    try:
        client = await nats.connect(url, connect_timeout=3, allow_reconnect=False)
        await client.jetstream().account_info()
        await client.close()
    except Exception as exc:
        reason = f"NATS JetStream unreachable at {url} (set {NATS_URL_ENV}): {exc!r}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so stream tests may not skip", pytrace=False)
        pytest.skip(reason)
    return url
