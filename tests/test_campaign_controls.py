"""Operators pausing, resuming and cancelling campaigns on the real dev server, through
``Controls`` (the code behind the CLI and the API), with real activities and the sandbox CRM."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from temporalio.client import WorkflowHandle

from cohortflow.campaigns.controls import Controls
from cohortflow.crm.client import CrmClient
from cohortflow.errors import Conflict
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage import campaigns
from cohortflow.storage.tables import AuditRow
from tests.harness import Harness, spec_document, wait_for_state, who, without_approval
from workflows.campaign.contract import CampaignState, idempotency_key
from workflows.campaign.messages import CampaignResult, CampaignStatus
from workflows.campaign.workflow import CampaignWorkflow

pytestmark = pytest.mark.devserver


def with_wait(document: dict[str, Any], duration: str) -> dict[str, Any]:
    """The campaign with every wait step lasting ``duration``."""
    steps = [{**s, "duration": duration} if s["type"] == "wait" else s for s in document["steps"]]
    return {**document, "steps": steps}


def controls_for(harness: Harness) -> Controls:
    return Controls(harness.db, harness.settings, Pseudonymiser(b"k" * 32), harness.client)


async def status_until(
    handle: WorkflowHandle[Any, CampaignResult],
    condition: Callable[[CampaignStatus], bool],
    limit: float = 20.0,
) -> CampaignStatus:
    """Query ``status`` until ``condition`` holds."""
    deadline = time.monotonic() + limit
    last: CampaignStatus | None = None
    while time.monotonic() < deadline:
        last = await handle.query(CampaignWorkflow.status)
        if condition(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition never held; last status {last}")


async def audit_kinds(harness: Harness, workflow_id: str) -> list[str]:
    async with harness.db.transaction() as session:
        rows = await session.scalars(
            select(AuditRow.kind).where(AuditRow.workflow_id == workflow_id).order_by(AuditRow.seq)
        )
        return list(rows)


async def campaign_status(harness: Harness, campaign_id: str) -> str:
    async with harness.db.transaction() as session:
        campaign = await campaigns.get_campaign(session, campaign_id)
    assert campaign is not None
    return campaign.status


async def test_pause_holds_the_next_crm_step_and_resume_completes(dev_harness: Harness) -> None:
    spec, version = await dev_harness.apply(with_wait(without_approval(spec_document()), "PT1S"))
    key = await dev_harness.customer()
    controls = controls_for(dev_harness)
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        paused = await controls.change_campaign(
            spec.campaign_id, "pause", identity=who("alice"), reason="copy review"
        )
        assert (paused.status, paused.workflows) == ("paused", 1)
        assert await campaign_status(dev_harness, spec.campaign_id) == "paused"

        # The one-second wait is long over; the campaign holds before its `enrol` write.
        await asyncio.sleep(2.5)
        status = await handle.query(CampaignWorkflow.status)
        assert status.paused
        assert status.state == CampaignState.WAITING
        assert status.step_id == "enrol"
        enrol_key = idempotency_key(handle.id, "enrol")
        assert dev_harness.sandbox.attempts(enrol_key) == 0
        assert "crm_written" in await audit_kinds(dev_harness, handle.id)  # the label step
        kinds_while_paused = await audit_kinds(dev_harness, handle.id)

        resumed = await controls.change_campaign(
            spec.campaign_id, "resume", identity=who("alice"), reason="copy ok"
        )
        assert (resumed.status, resumed.workflows) == ("active", 1)
        result = await dev_harness.result(handle)

    assert result.state == CampaignState.COMPLETED
    assert kinds_while_paused.count("crm_written") == 1
    assert (await audit_kinds(dev_harness, handle.id)).count("crm_written") == 2
    assert dev_harness.sandbox.attempts(enrol_key) == 1
    async with CrmClient(dev_harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None and contact.sequences == ["winback"]
    campaign_kinds = await audit_kinds(dev_harness, f"campaign:{spec.campaign_id}")
    assert campaign_kinds == ["campaign_paused", "campaign_active"]


async def test_cancel_ends_running_workflows_as_exited_and_is_audited(
    dev_harness: Harness,
) -> None:
    spec, version = await dev_harness.apply(with_wait(without_approval(spec_document()), "PT1H"))
    keys = [await dev_harness.customer(), await dev_harness.customer()]
    controls = controls_for(dev_harness)
    async with dev_harness.workers():
        handles = [await dev_harness.launch(spec, version, k) for k in keys]
        for handle in handles:
            await wait_for_state(handle, CampaignState.WAITING)
        # Visibility lags the workflows a little; cancel must find both.
        query = f'CampaignId = "{spec.campaign_id}" AND ExecutionStatus = "Running"'
        for _ in range(50):
            if (await dev_harness.client.count_workflows(query)).count == 2:
                break
            await asyncio.sleep(0.1)
        started = time.monotonic()
        outcome = await controls.change_campaign(
            spec.campaign_id, "cancel", identity=who("alice"), reason="offer withdrawn"
        )
        assert (outcome.status, outcome.workflows) == ("cancelled", 2)
        results = [await dev_harness.result(h) for h in handles]
        took = time.monotonic() - started

    assert [r.state for r in results] == [CampaignState.EXITED] * 2
    assert took < 30
    for handle in handles:
        assert dev_harness.sandbox.attempts(idempotency_key(handle.id, "enrol")) == 0
        assert (await audit_kinds(dev_harness, handle.id))[-1] == "finished"
    assert await campaign_status(dev_harness, spec.campaign_id) == "cancelled"
    async with dev_harness.db.transaction() as session:
        cancelled = await session.scalar(
            select(func.count())
            .select_from(AuditRow)
            .where(AuditRow.campaign_id == spec.campaign_id, AuditRow.kind == "campaign_cancelled")
        )
    assert cancelled == 1
    with pytest.raises(Conflict):
        await controls.change_campaign(
            spec.campaign_id, "resume", identity=who("al"), reason="oops"
        )
    assert await campaign_status(dev_harness, spec.campaign_id) == "cancelled"


async def test_crm_write_while_the_store_says_paused_without_a_signal_waits(
    dev_harness: Harness,
) -> None:
    spec, version = await dev_harness.apply(with_wait(without_approval(spec_document()), "PT1S"))
    key = await dev_harness.customer()
    # Paused in the store only: no workflow is told, so only the CRM activity can notice.
    async with dev_harness.db.transaction() as session:
        assert await campaigns.set_campaign_status(session, spec.campaign_id, "paused")
    controls = controls_for(dev_harness)
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        status = await status_until(handle, lambda s: s.paused)
        assert status.state == CampaignState.ACTING
        assert status.step_id == "label"
        await asyncio.sleep(1.0)
        status = await handle.query(CampaignWorkflow.status)
        assert status.paused and status.state == CampaignState.ACTING
        label_key = idempotency_key(handle.id, "label")
        assert dev_harness.sandbox.attempts(label_key) == 0
        kinds = await audit_kinds(dev_harness, handle.id)
        assert "crm_written" not in kinds
        assert "consent_allowed" not in kinds  # the pause check comes before consent

        await controls.change_campaign(spec.campaign_id, "resume", identity=who("al"), reason="go")
        result = await dev_harness.result(handle)

    assert result.state == CampaignState.COMPLETED
    assert dev_harness.sandbox.attempts(label_key) == 1
    assert (await audit_kinds(dev_harness, handle.id)).count("crm_written") == 2
