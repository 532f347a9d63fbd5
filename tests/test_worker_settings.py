"""The worker settings read from the environment reach the Temporal workers that
``cohortflow worker`` runs (``workers.campaign_worker.serve``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from cohortflow.settings import Settings
from cohortflow.storage.db import migrate
from workers import campaign_worker


async def test_worker_settings_reach_the_campaign_worker(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COHORTFLOW_WORKER_MAX_CACHED_WORKFLOWS", "123")
    monkeypatch.setenv("COHORTFLOW_WORKER_WORKFLOW_TASKS", "7")
    monkeypatch.setenv("COHORTFLOW_WORKER_WORKFLOW_TASK_POLLS", "3")
    monkeypatch.setenv("COHORTFLOW_CRM_MAX_CONCURRENT_ACTIVITIES", "45")
    settings = Settings(data_dir=tmp_path)
    await migrate(settings.resolved_database_url)
    built: list[Worker] = []

    async def run_workers(workers: Sequence[Worker], stop: asyncio.Event) -> None:
        built.extend(workers)  # the workers as serve built them; none is run

    monkeypatch.setattr(campaign_worker, "run_workers", run_workers)
    await campaign_worker.serve(settings, time_skipping_env.client, asyncio.Event())

    campaign, crm = (worker.config() for worker in built)
    assert campaign.get("task_queue") == settings.task_queue
    assert campaign.get("max_cached_workflows") == 123
    assert campaign.get("max_concurrent_workflow_tasks") == 7
    assert campaign.get("max_concurrent_workflow_task_polls") == 3
    assert crm.get("max_concurrent_activities") == 45
