"""Cohorts that evaluate themselves: a Temporal Schedule per cohort runs the full
evaluation, and customers touched by new events are re-evaluated incrementally, with the
same membership a full evaluation gives."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from activities.cohort_evaluation import CohortEvaluationActivities
from activities.launch import LaunchActivities
from cohortflow.cohorts import schedules
from cohortflow.cohorts.evaluator import membership
from cohortflow.cohorts.refresh import CohortRefresher
from cohortflow.cohorts.rules import parse_cohort
from cohortflow.cohorts.service import CohortService
from cohortflow.events.ingest import Ingestor
from cohortflow.settings import Settings
from cohortflow.storage import campaigns, cohorts
from cohortflow.storage.db import Database
from tests.harness import migrated, save_cohort_evaluation_history, spec_document
from tests.test_events import KEY, PSEUDONYMISER, track
from workflows.cohort_evaluation import CohortEvaluationWorkflow
from workflows.launch import LaunchCampaignsWorkflow

REPO = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC)


def refunders_out(cohort_id: str) -> dict[str, Any]:
    """Customers who spent 50 or more and never asked for a refund."""
    return {
        "cohort_id": cohort_id,
        "name": "good spenders",
        "rule": {
            "all": [
                {"feature": "monetary_total", "op": ">=", "value": 50},
                {"not": {"event": "refund", "within": "P3650D", "op": ">=", "count": 1}},
            ]
        },
    }


def purchases(rng: random.Random, user: str, n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` purchases of ``user`` in the last year."""
    return [
        track(
            f"{tag}-{user}-{i}",
            user,
            at=NOW - timedelta(days=rng.randint(1, 300)),
            amount=float(rng.randint(1, 40)),
        )
        for i in range(n)
    ]


async def members(db: Database, cohort_id: str) -> set[str]:
    """The cohort's stored members."""
    async with db.transaction() as session:
        return await cohorts.member_keys(session, cohort_id)


async def test_the_incremental_path_keeps_the_membership_a_full_evaluation_gives(
    db: Database,
) -> None:
    rng = random.Random(7)
    ingestor = Ingestor(db, PSEUDONYMISER)
    users = [f"u{i}" for i in range(60)]
    await ingestor.ingest([e for u in users for e in purchases(rng, u, rng.randint(1, 4), "a")])
    cohort_id = "spenders"
    service = CohortService(db, Settings(pseudonymisation_key=KEY), None)
    definition, _, _ = await service.apply(refunders_out(cohort_id), "tests")
    first = await service.evaluate(cohort_id)
    assert 0 < first.evaluation.diff.members < len(users)
    refresher = CohortRefresher(service, page=25)
    # The first evaluation saw every queued customer: refreshing them changes nothing.
    while await refresher.refresh_once():
        pass
    assert await members(db, cohort_id) == set(first.evaluation.diff.entered)

    # New events: some customers spend past the threshold, some ask for a refund.
    later = [e for u in rng.sample(users, 25) for e in purchases(rng, u, 2, "b")]
    refunds = [track(f"r-{u}", u, "refund", at=NOW) for u in rng.sample(users, 10)]
    await ingestor.ingest(later + refunds)
    refreshed = 0
    while count := await refresher.refresh_once():
        refreshed += count
    assert refreshed == len({e["userId"] for e in later + refunds})
    full = await membership(db, definition)
    assert await members(db, cohort_id) == full
    assert full != set(first.evaluation.diff.entered)  # the events did change it
    # A full evaluation now finds nothing left to change.
    again = await service.evaluate(cohort_id)
    assert again.evaluation.diff.entered == again.evaluation.diff.exited == []


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``cohortflow`` against the test's database and dev server."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "COHORTFLOW_DATA_DIR": str(settings.data_dir),
        "COHORTFLOW_DATABASE_URL": settings.database_url or "",
        "COHORTFLOW_PSEUDONYMISATION_KEY": KEY,
        "COHORTFLOW_TEMPORAL_PORT": str(settings.temporal_port),
        "COHORTFLOW_TASK_QUEUE": settings.task_queue,
    }
    return subprocess.run(
        [sys.executable, "-m", "cohortflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def until(condition: Any, within: float = 60.0) -> None:
    """Wait until the async ``condition`` holds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.3)


@pytest.mark.devserver
async def test_a_cohort_is_entered_and_launched_without_anyone_running_evaluate(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    queue = f"cohorts-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=tmp_path,
        temporal_port=dev_settings.temporal_port,
        database_url=db.url,
        task_queue=queue,
        pseudonymisation_key=KEY,
    )
    # Campaigns are started on a queue nobody polls: they wait there, counted by visibility.
    idle = settings.model_copy(update={"task_queue": f"idle-{uuid.uuid4().hex[:8]}"})
    cohort_id = f"co{uuid.uuid4().hex[:8]}"
    spec = spec_document(entry_cohort=cohort_id)
    async with db.transaction() as session:
        await campaigns.save_spec_version(session, spec["campaign_id"], spec, "tests")
    rng = random.Random(3)
    ingestor = Ingestor(db, PSEUDONYMISER)
    await ingestor.ingest([e for u in ("ann", "ben", "cy") for e in purchases(rng, u, 6, "a")])
    service = CohortService(db, settings, dev_client)
    launched = f'CampaignId = "{spec["campaign_id"]}" AND CohortId = "{cohort_id}"'

    async def launched_count() -> int:
        return (await dev_client.count_workflows(launched)).count

    try:
        async with Worker(
            dev_client,
            task_queue=queue,
            workflows=[CohortEvaluationWorkflow, LaunchCampaignsWorkflow],
            activities=[
                CohortEvaluationActivities(service).evaluate_cohort,
                LaunchActivities(dev_client, db, idle).launch_entries,
            ],
        ):
            await service.apply(
                refunders_out(cohort_id), "tests"
            )  # makes the schedule, runs it once
            expected = await membership(db, parse_cohort(refunders_out(cohort_id)))
            assert expected
            await until(lambda: _equal(members(db, cohort_id), expected))
            await until(lambda: _at_least(launched_count(), len(expected)))
            state = await schedules.status(dev_client, cohort_id)
            assert (state.paused, state.every, state.runs) == (False, timedelta(hours=1), 1)
            await save_cohort_evaluation_history(dev_client, cohort_id, "entered_launched")

            # An operator pauses and resumes it from the CLI; the reason shows on it.
            done = await asyncio.to_thread(
                cli, settings, "cohort", "pause", cohort_id, "--reason", "rule review"
            )
            assert done.returncode == 0, done.stderr
            shown = await asyncio.to_thread(
                cli, settings, "cohort", "schedule", cohort_id, "--json"
            )
            assert json.loads(shown.stdout)["paused"] is True
            assert json.loads(shown.stdout)["note"] == "rule review"
            done = await asyncio.to_thread(
                cli, settings, "cohort", "resume", cohort_id, "--reason", "reviewed"
            )
            assert done.returncode == 0, done.stderr
            assert not (await schedules.status(dev_client, cohort_id)).paused
            missing = await asyncio.to_thread(
                cli, settings, "cohort", "pause", "nope", "--reason", "x"
            )
            assert missing.returncode == 2 and "nope" in missing.stderr

            # A new customer's purchases: the refresher enters and launches them in seconds.
            refresher = CohortRefresher(service)
            assert await refresher.refresh_once() == 3  # queued before the first evaluation
            await ingestor.ingest(purchases(rng, "dee", 8, "b"))
            assert await refresher.refresh_once() == 1
            await until(lambda: _at_least(launched_count(), len(expected) + 1))
            assert PSEUDONYMISER.customer_key("dee") in await members(db, cohort_id)
    finally:
        await dev_client.get_schedule_handle(schedules.schedule_id(cohort_id)).delete()
        await db.dispose()


async def _equal(found: Any, expected: set[str]) -> bool:
    return bool(await found == expected)


async def _at_least(found: Any, expected: int) -> bool:
    return bool(await found >= expected)
