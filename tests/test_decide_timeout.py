"""A decision its campaign does not confirm in time: the operator gets 503-class
``Unavailable`` saying it may still land, after ``decide_timeout_seconds``, instead of a
call that hangs (a real worker polls, but its campaign never answers the update). The same
when Temporal goes away under the call: a lost connection says nothing about the decision,
so only Temporal's settled answers (no such campaign, closed) are a 409. The chaos bench met
a 409 "transport error" (gRPC UNKNOWN on a connection cut mid-call), which this timing
does not reproduce every time; the bench is its regression check."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from cohortflow.campaigns.controls import Controls
from cohortflow.errors import Conflict, Unavailable
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage import approvals
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect, wait_for_pollers
from tests.harness import migrated, who
from workflows.campaign.contract import CAMPAIGN_WORKFLOW, DecideRefusal
from workflows.campaign.messages import DecideRequest, DecideResult

pytestmark = pytest.mark.devserver


@workflow.defn(name=CAMPAIGN_WORKFLOW, sandboxed=False)
class Behind:
    """A campaign that has not reached its approval again: its worker lost the workflow task
    that asked, after the request's record landed, and the retried task is not there yet."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.update
    async def decide(self, request: DecideRequest) -> DecideResult:
        raise AssertionError("refused by the validator")

    @decide.validator
    def _not_asking(self, request: DecideRequest) -> None:
        message = f"approval {request.approval_id} is not pending"
        raise ApplicationError(message, "approval_id", type=DecideRefusal.CONFLICT)


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


async def pending(tmp_path: Path, *workflow_ids: str) -> Database:
    """A migrated app database holding a pending approval for each workflow, the first
    apr_stuck0000001, the next apr_stuck0000002 and so on."""
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    now = datetime.now(UTC)
    async with db.transaction() as session:
        for n, workflow_id in enumerate(workflow_ids, start=1):
            await approvals.add_pending(
                session, approval_id=f"apr_stuck{n:07d}", workflow_id=workflow_id,
                step_id="approve", campaign_id="stuck", customer_key="c_stuck", reason="r",
                scores={}, requested_at=now, expires_at=now + timedelta(days=1),
            )  # fmt: skip
    return db


async def test_an_unconfirmed_decision_is_unavailable_after_its_timeout(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    queue = f"stuck-{uuid.uuid4().hex[:8]}"
    settings = dev_settings.model_copy(update={"task_queue": queue, "decide_timeout_seconds": 2})
    workflow_id = f"campaign:stuck:c_{uuid.uuid4().hex[:24]}:1"
    db = await pending(tmp_path, workflow_id)
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


async def test_a_decision_cut_off_by_a_server_crash_is_unavailable_not_a_conflict(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, temporal_port=free_port(), temporal_ui_port=free_port())
    server = DevServer(settings)
    await server.start()
    client = await connect(settings, tracing=False)
    gone, stuck = (f"campaign:stuck:c_{uuid.uuid4().hex[:24]}:1" for _ in range(2))
    db = await pending(tmp_path, stuck, gone)
    controls = Controls(db, settings, Pseudonymiser(b"k" * 32), client)
    alice = who("alice", "approver")
    worker = Worker(client, task_queue=settings.task_queue, workflows=[Unanswering])
    running = asyncio.create_task(worker.run())
    try:
        await client.start_workflow(Unanswering.run, id=stuck, task_queue=settings.task_queue)
        await wait_for_pollers(client, settings.task_queue)
        # A campaign that never ran is a settled answer: still 409.
        with pytest.raises(Conflict):
            await controls.decide("apr_stuck0000002", approve=True, identity=alice, reason="ok")
        deciding = asyncio.create_task(
            controls.decide("apr_stuck0000001", approve=True, identity=alice, reason="ok")
        )
        await asyncio.sleep(1.0)  # the update is with the server, which never answers
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        with pytest.raises(Unavailable) as caught:
            await deciding
    finally:
        running.cancel()
        server.stop()
        await db.dispose()
    assert caught.value.message.startswith("approval apr_stuck0000001: Temporal:")


async def test_a_request_the_campaign_has_not_reached_again_is_unavailable_until_it_has(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    queue = f"behind-{uuid.uuid4().hex[:8]}"
    settings = dev_settings.model_copy(update={"task_queue": queue})
    workflow_id = f"campaign:stuck:c_{uuid.uuid4().hex[:24]}:1"
    db = await pending(tmp_path, workflow_id)
    controls = Controls(db, settings, Pseudonymiser(b"k" * 32), dev_client)
    alice = who("alice", "approver")
    try:
        async with Worker(dev_client, task_queue=queue, workflows=[Behind]):
            handle = await dev_client.start_workflow(Behind.run, id=workflow_id, task_queue=queue)
            await wait_for_pollers(dev_client, queue)
            # The record says pending, the campaign says not yet: send it again later.
            with pytest.raises(Unavailable) as behind:
                await controls.decide("apr_stuck0000001", approve=True, identity=alice, reason="ok")
            # Once the record says someone else decided it, the refusal is a conflict.
            async with db.transaction() as session:
                await approvals.mark_decided(
                    session, "apr_stuck0000001", status="approved", operator="bob", reason="ok",
                    decided_at=datetime.now(UTC),
                )  # fmt: skip
            with pytest.raises(Conflict):
                await controls.decide("apr_stuck0000001", approve=True, identity=alice, reason="ok")
            await handle.terminate("test over")
    finally:
        await db.dispose()
    assert "has not caught up with this request yet" in behind.value.message
