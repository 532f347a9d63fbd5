"""The launcher: re-entry rules, idempotent launches per cohort entry, and the resumable
bulk launch killed midway (a real worker process, SIGKILLed) on the Temporal dev server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.launch import LaunchActivities
from cohortflow.campaigns.launcher import Launcher, reentry_refusal
from cohortflow.cohorts.evaluator import evaluate
from cohortflow.cohorts.rules import parse_cohort
from cohortflow.cohorts.service import CohortService
from cohortflow.settings import Settings
from cohortflow.spec import ReentrySpec, parse_spec
from cohortflow.storage import campaigns, cohorts, customers
from cohortflow.storage.db import Database, migrate
from cohortflow.temporal_client import connect
from tests.harness import save_launch_history, spec_document
from workflows.campaign.contract import SA, campaign_workflow_id
from workflows.launch import LaunchCampaignsWorkflow, LaunchInput, LaunchProgress

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 2, 1, tzinfo=UTC)


def test_the_launch_workflow_imports_only_the_sdk_and_the_standard_library() -> None:
    code = "import json, sys; import workflows.launch; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    )
    forbidden = {"sqlalchemy", "numpy", "pandas", "httpx", "cohortflow", "scoring", "activities"}
    assert [m for m in loaded if m.split(".")[0] in forbidden] == []


def test_reentry_rules() -> None:
    earlier = [("1", T0)]
    now = T0 + timedelta(days=10)
    assert reentry_refusal(ReentrySpec(), [], now, previous_running=False) is None
    assert "once" in str(reentry_refusal(ReentrySpec(), earlier, now, previous_running=False))
    after_exit = ReentrySpec(rule="after_exit")
    assert reentry_refusal(after_exit, earlier, now, previous_running=True) is not None
    assert reentry_refusal(after_exit, earlier, now, previous_running=False) is None
    cooldown = ReentrySpec(rule="cooldown", cooldown="P30D")
    assert "cooldown" in str(reentry_refusal(cooldown, earlier, now, previous_running=False))
    later = T0 + timedelta(days=30)
    assert reentry_refusal(cooldown, earlier, later, previous_running=False) is None


async def _setup(url: str, customers_count: int, **spec: object) -> tuple[str, str]:
    """A database with customers whose features put them all in a cohort, a campaign on that
    cohort and one evaluation; returns (campaign id, cohort id)."""
    await migrate(url)
    db = Database(url)
    cohort_id = f"co{uuid.uuid4().hex[:8]}"
    document = spec_document(entry_cohort=cohort_id, **spec)
    try:
        async with db.transaction() as session:
            await customers.upsert_features(
                session,
                [
                    (f"c_{i:024x}", {"monetary_total": 100.0 + i}, T0)
                    for i in range(customers_count)
                ],
            )
            await campaigns.save_spec_version(session, document["campaign_id"], document, "t")
        definition = parse_cohort(
            {
                "cohort_id": cohort_id,
                "name": "all",
                "rule": {"feature": "monetary_total", "op": ">=", "value": 0},
            }
        )
        result = await evaluate(db, definition, T0)
        assert len(result.diff.entered) == customers_count
    finally:
        await db.dispose()
    return str(document["campaign_id"]), cohort_id


def _worker_settings(dev_settings: Settings, url: str, campaign_queue: str) -> Settings:
    return Settings(
        data_dir=dev_settings.data_dir,
        temporal_port=dev_settings.temporal_port,
        database_url=url,
        task_queue=campaign_queue,
        pseudonymisation_key="k" * 32,
    )


async def _count(client: Client, query: str, expected: int, within: float = 30) -> int:
    """The visibility count of ``query`` once it reaches ``expected`` (or after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        count = (await client.count_workflows(query)).count
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.5)


@pytest.mark.devserver
async def test_bulk_launch_killed_midway_launches_each_entry_exactly_once(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    entries = int(os.environ.get("COHORTFLOW_TEST_LAUNCH_ENTRIES", "600"))
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    campaign_id, cohort_id = await _setup(url, entries)
    launch_queue = f"launch-{uuid.uuid4().hex[:8]}"
    # No worker polls the campaign queue: campaigns are started, then wait there.
    campaign_queue = f"campaigns-{uuid.uuid4().hex[:8]}"
    handle = await dev_client.start_workflow(
        LaunchCampaignsWorkflow.run,
        LaunchInput(
            campaign_id,
            1,
            cohort_id,
            up_to_seq=entries,
            total=entries,
            page_size=150,
            pages_per_run=3,
            heartbeat_seconds=2.0,
        ),
        id=f"launch:{campaign_id}:{cohort_id}:{entries}",
        task_queue=launch_queue,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        str(Path(__file__)),
        dev_settings.resolved_temporal_address,
        url,
        launch_queue,
        campaign_queue,
    ]
    started = time.monotonic()
    first = await asyncio.create_subprocess_exec(*args, env=env)
    try:
        progress: LaunchProgress | None = None
        while progress is None or progress.processed < entries // 3:
            assert first.returncode is None, "worker exited early"
            await asyncio.sleep(0.2)
            try:
                progress = await handle.query(LaunchCampaignsWorkflow.progress)
            except RPCError:  # not answerable between two runs of the chain
                progress = None
        first.send_signal(signal.SIGKILL)  # no chance to finish its page or say goodbye
        await first.wait()
    finally:
        if first.returncode is None:
            first.kill()
    assert progress is not None and progress.processed < entries
    second = await asyncio.create_subprocess_exec(*args, env=env)
    try:
        result = await asyncio.wait_for(handle.result(), timeout=300)
    finally:
        second.send_signal(signal.SIGKILL)
        await second.wait()
    elapsed = time.monotonic() - started
    assert (result.total, result.processed, result.launched, result.refused) == (
        entries,
        entries,
        entries,
        0,
    )
    db = Database(url)
    try:
        async with db.transaction() as session:
            assert await campaigns.count_entries(session, campaign_id) == entries
    finally:
        await db.dispose()
    assert await _count(dev_client, f'CampaignId = "{campaign_id}"', entries) == entries
    # The continue-as-new chain made more than one run.
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    first_run = dev_client.get_workflow_handle(handle.id, run_id=handle.result_run_id)
    assert (await first_run.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    await save_launch_history(first_run, "killed_first_run_continued")
    await save_launch_history(dev_client.get_workflow_handle(handle.id), "last_run_completed")
    print(  # the launcher's own cost, reported by `pytest -s`
        f"\nbulk launch: {entries} entries, killed once, {elapsed:.1f} s, "
        f"{1000 * elapsed / entries:.1f} ms per entry"
    )


@pytest.mark.devserver
async def test_reentry_gives_a_new_entry_id_only_when_the_rule_allows(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    campaign_id, cohort_id = await _setup(url, 1, reentry={"rule": "after_exit"})
    settings = _worker_settings(dev_settings, url, f"campaigns-{uuid.uuid4().hex[:8]}")
    db = Database(url)
    try:
        async with db.transaction() as session:
            document = await campaigns.get_spec(session, campaign_id, 1)
        assert document is not None
        spec = parse_spec(document)
        launcher = Launcher(dev_client, db, settings)
        key = f"c_{0:024x}"
        assert await launcher.launch_transitions(spec, 1, cohort_id, [(1, key)]) == ["1"]
        # The same entry again: the stored decision holds, nothing new starts.
        assert await launcher.launch_transitions(spec, 1, cohort_id, [(1, key)]) == ["1"]
        # A later entry while the first campaign still runs: after_exit refuses it.
        assert await launcher.launch_transitions(spec, 1, cohort_id, [(5, key)]) == [None]
        first = dev_client.get_workflow_handle(campaign_workflow_id(campaign_id, key, "1"))
        await first.terminate("test: the campaign ended")
        assert await launcher.launch_transitions(spec, 1, cohort_id, [(9, key)]) == ["2"]
        second = dev_client.get_workflow_handle(campaign_workflow_id(campaign_id, key, "2"))
        assert (await second.describe()).status == WorkflowExecutionStatus.RUNNING
        await second.terminate("test over")
        # Two entries of one customer in one page: the second sees the first as running.
        assert await launcher.launch_transitions(spec, 1, cohort_id, [(11, key), (12, key)]) == [
            "3",
            None,
        ]
        async with db.transaction() as session:
            assert await campaigns.count_entries(session, campaign_id) == 3
    finally:
        await db.dispose()


@pytest.mark.devserver
async def test_evaluating_twice_launches_once_and_exits_signal_running_campaigns(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    campaign_id, cohort_id = await _setup(url, 5)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    settings = _worker_settings(dev_settings, url, queue)
    db = Database(url)
    try:
        async with db.transaction() as session:
            await cohorts.save_cohort(
                session,
                cohort_id,
                {
                    "cohort_id": cohort_id,
                    "name": "rich",
                    "rule": {"feature": "monetary_total", "op": ">=", "value": 102},
                },
            )
        service = CohortService(db, settings, dev_client)
        async with Worker(
            dev_client,
            task_queue=queue,
            workflows=[LaunchCampaignsWorkflow],
            activities=[LaunchActivities(dev_client, db, settings).launch_entries],
        ):
            # Two customers leave (monetary 100 and 101); the campaigns of five are running.
            report = await service.evaluate(cohort_id, now=T0 + timedelta(days=1))
            assert report.evaluation.diff.exited == [f"c_{0:024x}", f"c_{1:024x}"]
            assert report.temporal == "ok"
            for launch in report.launches:
                await dev_client.get_workflow_handle(launch.workflow_id).result()
            again = await service.evaluate(cohort_id, now=T0 + timedelta(days=2))
            assert again.evaluation.diff.entered == again.evaluation.diff.exited == []
            for launch in again.launches:
                await dev_client.get_workflow_handle(launch.workflow_id).result()
        async with db.transaction() as session:
            assert await campaigns.count_entries(session, campaign_id) == 5
        assert await _count(dev_client, f'CampaignId = "{campaign_id}"', 5, within=5) == 5
    finally:
        await db.dispose()
    # Exits are signalled only to running campaigns of that customer and cohort: here the
    # campaigns started by the first evaluation's launch had not run yet, so check one
    # started for the purpose.
    key = f"c_{7:024x}"
    wf = await dev_client.start_workflow(
        "CampaignWorkflow",
        id=f"campaign:{campaign_id}:{key}:1",
        task_queue=f"idle-{uuid.uuid4().hex[:8]}",
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA.CUSTOMER_KEY, key),
                SearchAttributePair(SA.COHORT_ID, cohort_id),
            ]
        ),
    )
    # The session's dev server holds other tests' workflows for the same synthetic keys.
    running = f'CustomerKey = "{key}" AND CohortId = "{cohort_id}" AND ExecutionStatus = "Running"'
    assert await _count(dev_client, running, 1) == 1
    service = CohortService(Database(url), settings, dev_client)
    try:
        assert await service._signal_exits(cohort_id, [key, f"c_{8:024x}"]) == 1
    finally:
        await service.db.dispose()
    names = [
        e.workflow_execution_signaled_event_attributes.signal_name
        async for e in wf.fetch_history_events()
        if e.HasField("workflow_execution_signaled_event_attributes")
    ]
    assert names == ["cohort_exited"]
    await wf.terminate("test over")


async def _serve_launches(address: str, url: str, launch_queue: str, campaign_queue: str) -> None:
    """The worker process the kill test starts (and kills): the bulk launcher alone."""
    settings = Settings(
        temporal_address=address,
        database_url=url,
        task_queue=campaign_queue,
        pseudonymisation_key="k" * 32,
    )
    # The ring from the environment the test passes on, as the test's own client uses.
    client = await connect(settings, tracing=False)
    db = Database(url)
    async with Worker(
        client,
        task_queue=launch_queue,
        workflows=[LaunchCampaignsWorkflow],
        activities=[LaunchActivities(client, db, settings).launch_entries],
    ):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_launches(*sys.argv[1:5]))
