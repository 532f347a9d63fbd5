"""Wires the campaign workflows (both types) and their activities to a Temporal client.

Two workers share one process: the campaign queue runs workflows, scoring and the local
activities; the CRM queue runs every CRM call, each process's writes coalesced into batch
calls under one request ceiling all processes share, so the whole fleet of workers stays
below the CRM's own limit however many of them run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.campaign import CampaignActivities
from activities.campaign.batcher import CrmBatcher
from activities.campaign.ceiling import CeilingConfig, RequestCeiling
from activities.campaign.crm import CrmActivities
from activities.campaign.escalation import EscalationWebhook
from activities.cohort_evaluation import CohortEvaluationActivities
from activities.launch import LaunchActivities
from cohortflow.cohorts.refresh import CohortRefresher
from cohortflow.cohorts.service import CohortService
from cohortflow.crm.factory import configured_connector
from cohortflow.events.purger import run_purges
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from workflows.campaign.workflow import CampaignWorkflow, CampaignWorkflowV2
from workflows.cohort_evaluation import CohortEvaluationWorkflow
from workflows.launch import LaunchCampaignsWorkflow

log = structlog.get_logger(__name__)


def build_workers(
    client: Client,
    activities: CampaignActivities,
    *,
    task_queue: str,
    crm_task_queue: str,
    crm_max_concurrent_activities: int = 500,
    workflow_tasks: int = 10,
    workflow_task_polls: int = 5,
    cached_workflows: int = 1000,
    launch: LaunchActivities | None = None,
    cohorts: CohortEvaluationActivities | None = None,
) -> Sequence[Worker]:
    """The campaign worker (with the bulk launcher and the scheduled cohort evaluation when
    given) and the CRM worker.

    The CRM worker runs many activities at once because they mostly wait for their batch
    and the CRM's ceiling: that is what lets their records share batch calls.
    """
    launch_activities = [launch.launch_entries] if launch is not None else []
    cohort_activities = [cohorts.evaluate_cohort] if cohorts is not None else []
    campaign = Worker(
        client,
        task_queue=task_queue,
        workflows=[
            CampaignWorkflow,
            CampaignWorkflowV2,
            LaunchCampaignsWorkflow,
            CohortEvaluationWorkflow,
        ],
        activities=[
            activities.spec.load_spec,
            activities.scoring.score_customer,
            activities.audit.record_audit,
            activities.local_time.plan_local_time,
            activities.escalation.escalate_approval,
            *launch_activities,
            *cohort_activities,
        ],
        max_concurrent_activities=50,
        max_concurrent_workflow_tasks=workflow_tasks,
        max_concurrent_workflow_task_polls=workflow_task_polls,
        max_cached_workflows=cached_workflows,
    )
    crm = Worker(
        client,
        task_queue=crm_task_queue,
        activities=[
            activities.crm.crm_write,
            activities.crm.crm_compensate,
            activities.fallback.resolve_fallback,
        ],
        max_concurrent_activities=crm_max_concurrent_activities,
    )
    return (campaign, crm)


def crm_batcher(settings: Settings, db: Database) -> CrmBatcher:
    """The process's path to the CRM: its connector, every request of which first takes a
    slot under the ceiling all processes share (named by the CRM's kind and URL), and the
    batcher that coalesces writes."""
    ceiling = RequestCeiling(
        db,
        CeilingConfig(
            name=f"{settings.crm_kind}:{settings.resolved_crm_url}",
            limit=settings.crm_rate_limit,
            window=timedelta(seconds=settings.crm_rate_window_seconds),
        ),
    )
    connector = configured_connector(settings, request_gate=ceiling.slot)
    return CrmBatcher(connector, linger=timedelta(milliseconds=settings.crm_batch_linger_ms))


def campaign_activities(
    settings: Settings,
    db: Database,
    scorer: Scorer,
    batcher: CrmBatcher,
    crm_type: type[CrmActivities] = CrmActivities,
) -> CampaignActivities:
    """Every campaign activity with the process's dependencies and CRM settings."""
    return CampaignActivities.build(
        db,
        scorer,
        batcher,
        crm_type=crm_type,
        owned_properties=settings.crm_owned_properties,
        sender_email=settings.crm_sender_email,
        webhook=escalation_webhook(settings),
    )


def escalation_webhook(settings: Settings) -> EscalationWebhook | None:
    """The webhook escalation notices go to, if one is set."""
    if not settings.escalation_webhook_url:
        return None
    secret = settings.escalation_webhook_secret
    return EscalationWebhook(
        url=settings.escalation_webhook_url,
        secret=secret.get_secret_value() if secret else None,
        public_url=settings.public_url,
    )


async def run_workers(workers: Sequence[Worker], stop: asyncio.Event) -> None:
    """Run the workers until ``stop`` is set, then shut them down gracefully."""
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        await stop.wait()


async def serve(settings: Settings, client: Client, stop: asyncio.Event) -> None:
    """Run a worker process's workers against ``client`` with real dependencies, and beside
    them the incremental cohort refresher (``cohortflow.cohorts.refresh``) and, when
    configured, the hourly event purge (``cohortflow.events.purger``)."""
    db = Database(settings.resolved_database_url)
    batcher = crm_batcher(settings, db)
    scorer = Scorer(ModelRegistry(settings.resolved_models_dir))
    cohorts = CohortService(db, settings, client)
    workers = build_workers(
        client,
        campaign_activities(settings, db, scorer, batcher),
        task_queue=settings.task_queue,
        crm_task_queue=settings.crm_task_queue,
        crm_max_concurrent_activities=settings.crm_max_concurrent_activities,
        workflow_tasks=settings.worker_workflow_tasks,
        workflow_task_polls=settings.worker_workflow_task_polls,
        cached_workflows=settings.worker_max_cached_workflows,
        launch=LaunchActivities(client, db, settings),
        cohorts=CohortEvaluationActivities(cohorts),
    )
    log.info("worker started", task_queue=settings.task_queue, crm=settings.crm_task_queue)
    # Cohorts applied while Temporal was away get their schedules now.
    log.info("cohort schedules ensured", cohorts=await cohorts.ensure_schedules())
    background = [asyncio.create_task(CohortRefresher(cohorts).run(stop))]
    if settings.event_retention_days is not None:
        background.append(asyncio.create_task(run_purges(db, settings.event_retention_days, stop)))
    try:
        await run_workers(workers, stop)
    finally:
        stop.set()
        await asyncio.gather(*background)
        await batcher.aclose()
        await db.dispose()
