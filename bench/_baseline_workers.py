"""Worker processes for the campaign bench's baselines, each part in its own process as the
campaign's `cohortflow worker` is, configured by the same COHORTFLOW_* variables.

    python -m bench._baseline_workers bare|same-effects
"""

from __future__ import annotations

import asyncio
import signal
import sys

from temporalio.worker import Worker

from bench._bare_workflow import BareWorkflow, noop
from bench._same_effects import SameEffectsWorkflow
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from workers.campaign_worker import campaign_activities, crm_batcher, run_workers


async def serve(kind: str) -> None:
    """Run the baseline's workers until SIGTERM: the bare workflow with its one activity,
    or the same-effects workflow with the activities `cohortflow worker` builds."""
    settings = Settings()
    client = await connect(settings, tracing=False)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "bare":
        bare = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[BareWorkflow],
            activities=[noop],
            max_concurrent_workflow_tasks=settings.worker_workflow_tasks,
            max_concurrent_workflow_task_polls=settings.worker_workflow_task_polls,
            max_cached_workflows=settings.worker_max_cached_workflows,
        )
        await run_workers([bare], stop)
        return
    db = Database(settings.resolved_database_url)
    batcher = crm_batcher(settings, db)
    scorer = Scorer(ModelRegistry(settings.resolved_models_dir))
    built = campaign_activities(settings, db, scorer, batcher)
    workers = [
        Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[SameEffectsWorkflow],
            activities=[built.scoring.score_customer],
            max_concurrent_activities=50,
            max_concurrent_workflow_tasks=settings.worker_workflow_tasks,
            max_concurrent_workflow_task_polls=settings.worker_workflow_task_polls,
            max_cached_workflows=settings.worker_max_cached_workflows,
        ),
        Worker(
            client,
            task_queue=settings.crm_task_queue,
            activities=[built.crm.crm_write],
            max_concurrent_activities=settings.crm_max_concurrent_activities,
        ),
    ]
    try:
        await run_workers(workers, stop)
    finally:
        await batcher.aclose()
        await db.dispose()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
