"""Wires CampaignWorkflow and its activities to a Temporal client.

Two workers share one process: the campaign queue runs workflows, scoring and the local
activities; the CRM queue runs every CRM call under a server-side rate cap, so the whole
fleet of workers stays below the CRM's own limit however many of them run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.campaign import CampaignActivities
from activities.launch import LaunchActivities
from cohortflow.crm.client import CrmClient
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from workflows.campaign.workflow import CampaignWorkflow
from workflows.launch import LaunchCampaignsWorkflow

log = structlog.get_logger(__name__)


def build_workers(
    client: Client,
    activities: CampaignActivities,
    *,
    task_queue: str,
    crm_task_queue: str,
    crm_max_activities_per_second: float,
    launch: LaunchActivities | None = None,
) -> Sequence[Worker]:
    """The campaign worker (with the bulk launcher when given) and the rate-capped CRM worker."""
    launch_activities = [launch.launch_entries] if launch is not None else []
    campaign = Worker(
        client,
        task_queue=task_queue,
        workflows=[CampaignWorkflow, LaunchCampaignsWorkflow],
        activities=[
            activities.spec.load_spec,
            activities.scoring.score_customer,
            activities.audit.record_audit,
            activities.local_time.plan_local_time,
            *launch_activities,
        ],
        max_concurrent_activities=50,
    )
    crm = Worker(
        client,
        task_queue=crm_task_queue,
        activities=[activities.crm.crm_write, activities.fallback.resolve_fallback],
        max_task_queue_activities_per_second=crm_max_activities_per_second,
        max_concurrent_activities=50,
    )
    return (campaign, crm)


async def run_workers(workers: Sequence[Worker], stop: asyncio.Event) -> None:
    """Run the workers until ``stop`` is set, then shut them down gracefully."""
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        await stop.wait()


async def serve(settings: Settings, client: Client, stop: asyncio.Event) -> None:
    """Run a worker process's workers against ``client`` with real dependencies."""
    db = Database(settings.resolved_database_url)
    token = settings.crm_token.get_secret_value() if settings.crm_token else None
    async with CrmClient(
        settings.resolved_crm_url, token=token, timeout=settings.crm_timeout_seconds
    ) as crm:
        activities = CampaignActivities.build(
            db, Scorer(ModelRegistry(settings.resolved_models_dir)), crm
        )
        workers = build_workers(
            client,
            activities,
            task_queue=settings.task_queue,
            crm_task_queue=settings.crm_task_queue,
            crm_max_activities_per_second=settings.crm_max_activities_per_second,
            launch=LaunchActivities(client, db, settings),
        )
        log.info("worker started", task_queue=settings.task_queue, crm=settings.crm_task_queue)
        try:
            await run_workers(workers, stop)
        finally:
            await db.dispose()
