"""Session-wide real parts for campaign tests: the time-skipping server, a trained model and
the sandbox CRM, plus a fresh migrated database and task queues per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from cohortflow.runtime.binaries import temporal_test_server
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.temporal_client import connect, ensure_search_attributes
from tests.harness import Harness, Sandbox, migrated, serve_sandbox, train_small_registry


@pytest.fixture
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server of the test's own, search attributes registered first.

    Not shared: the test server keeps the timers of closed workflows (an activity's
    schedule-to-close, ten years when unset) and a later time skip jumps to them, so on a
    shared server the clock ran decades ahead within one run and later tests failed on it.
    It starts in about a tenth of a second.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(temporal_test_server())
    )
    # Upserting an unregistered attribute fails the workflow task for ever: register first.
    await ensure_search_attributes(env.client, env.client.namespace)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry with a churn champion trained on CDNOW."""
    root = tmp_path_factory.mktemp("models")
    train_small_registry(root)
    return root


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The sandbox CRM over real HTTP, with a rate limit the tests never reach."""
    with serve_sandbox(tmp_path_factory.mktemp("crm") / "crm.db", rate_limit=10_000) as crm:
        yield crm


@pytest.fixture
async def harness(
    time_skipping_env: WorkflowEnvironment, registry_root: Path, sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[Harness]:
    """Real activities over a fresh SQLite database, on the time-skipping server."""
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    yield Harness(time_skipping_env.client, db, registry_root, sandbox, time_skipping_env)
    await db.dispose()


@pytest.fixture(scope="session")
async def dev_settings(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    """One embedded dev server (SQLite file, search attributes) on free ports for the session;
    yields the settings that reach it."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("devserver"),
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
    )
    server = DevServer(settings)
    await server.start()
    try:
        yield settings
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def dev_client(dev_settings: Settings) -> Client:
    """A client of the session's dev server."""
    return await connect(dev_settings, tracing=False)


@pytest.fixture
async def dev_harness(
    dev_client: Client, registry_root: Path, sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[Harness]:
    """Real activities over a fresh SQLite database, on the dev server."""
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    yield Harness(dev_client, db, registry_root, sandbox)
    await db.dispose()
