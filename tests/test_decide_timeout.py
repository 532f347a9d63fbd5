"""A decision its campaign does not confirm in time: the operator gets 503-class
``Unavailable`` saying it may still land, after ``decide_timeout_seconds``, instead of a
call that hangs (a real worker polls, but its campaign never answers the update)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from cohortflow.campaigns.controls import Controls
from cohortflow.errors import Unavailable
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage import approvals
from cohortflow.temporal_client import wait_for_pollers
from tests.harness import migrated, who
from workflows.campaign.contract import CAMPAIGN_WORKFLOW
from workflows.campaign.messages import DecideRequest, DecideResult

pytestmark = pytest.mark.devserver


@workflow.defn(name=CAMPAIGN_WORKFLOW, sandboxed=False)
class Unanswering:
    """A campaign whose ``decide`` never returns (a worker stuck mid-task, say)."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.update
    async def decide(self, request: DecideRequest) -> DecideResult:
        await workflow.wait_condition(lambda: False)
        raise AssertionError("never answers")


async def test_an_unconfirmed_decision_is_unavailable_after_its_timeout(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    queue = f"stuck-{uuid.uuid4().hex[:8]}"
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    settings = dev_settings.model_copy(update={"task_queue": queue, "decide_timeout_seconds": 2})
    workflow_id = f"campaign:stuck:c_{uuid.uuid4().hex[:24]}:1"
    now = datetime.now(UTC)
    async with db.transaction() as session:
        await approvals.add_pending(
            session, approval_id="apr_stuck0000001", workflow_id=workflow_id, step_id="approve",
            campaign_id="stuck", customer_key="c_stuck", reason="r", scores={},
            requested_at=now, expires_at=now + timedelta(days=1),
        )  # fmt: skip
    controls = Controls(db, settings, Pseudonymiser(b"k" * 32), dev_client)
    try:
        async with Worker(dev_client, task_queue=queue, workflows=[Unanswering]):
            handle = await dev_client.start_workflow(
                Unanswering.run, id=workflow_id, task_queue=queue
            )
            await wait_for_pollers(dev_client, queue)  # the decision checks one polls
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await controls.decide(
                    "apr_stuck0000001", approve=True, identity=who("alice", "approver"), reason="ok"
                )
            waited = time.monotonic() - started
            await handle.terminate("test over")
    finally:
        await db.dispose()
    assert "did not confirm the decision within 2s; it may still land" in caught.value.message
    assert 1.5 < waited < 15
