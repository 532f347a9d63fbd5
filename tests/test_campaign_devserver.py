"""Campaigns on the real Temporal dev server: timers in history, what the UI shows, visibility,
and operators deciding through the same code the CLI and the API use."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata

from cohortflow.controls import Controls
from cohortflow.crm.client import CrmClient
from cohortflow.errors import Conflict, Invalid, NotFound
from cohortflow.ids import Pseudonymiser
from tests.harness import Harness, spec_document, wait_for_state
from workflows.messages import CampaignState

pytestmark = pytest.mark.devserver


def short_wait(document: dict[str, object]) -> dict[str, object]:
    steps = [
        {**s, "duration": "PT1S"} if s.get("type") == "wait" else s
        for s in document["steps"]  # type: ignore[attr-defined]
    ]
    return {**document, "steps": steps}


async def test_a_campaign_runs_through_the_sandbox_crm_over_http_with_a_durable_timer(
    dev_harness: Harness,
) -> None:
    document = short_wait(spec_document())
    document["steps"] = [s for s in document["steps"] if s["id"] not in ("route", "approve")]  # type: ignore[index]
    document["sensitive"] = False
    spec, version = await dev_harness.apply(document)
    key = await dev_harness.customer()
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        result = await dev_harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    types = [e.event_type async for e in handle.fetch_history_events()]
    assert EventType.EVENT_TYPE_TIMER_STARTED in types
    assert EventType.EVENT_TYPE_TIMER_FIRED in types
    async with CrmClient(dev_harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None
    assert contact.properties["cohort_label"] == "test_cohort"
    assert float(contact.properties["churn_score"]) > 0
    assert contact.sequences == ["winback"]


async def test_summary_details_and_visibility_while_awaiting_approval_then_operator_decides(
    dev_harness: Harness,
) -> None:
    spec, version = await dev_harness.apply(short_wait(spec_document()))
    key = await dev_harness.customer()
    settings = dev_harness.settings
    controls = Controls(dev_harness.db, settings, Pseudonymiser(b"k" * 32), dev_harness.client)
    async with dev_harness.workers():
        handle = await dev_harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert status.pending_approval is not None
        approval_id = status.pending_approval.approval_id

        description = await handle.describe()
        assert (
            await description.static_summary()
            == f"Test campaign v{version} · {key} · entered test_cohort"
        )
        details = await description.static_details()
        assert details is not None and "`approve` approval" in details
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert approval_id in metadata.current_details
        assert status.pending_approval.expires_at in metadata.current_details

        query = f'CampaignId = "{spec.campaign_id}" AND AwaitingApproval = true'
        for _ in range(50):
            if (await dev_harness.client.count_workflows(query)).count == 1:
                break
            await asyncio.sleep(0.1)
        assert (await dev_harness.client.count_workflows(query)).count == 1

        listed = await controls.list_approvals()
        assert [a.approval_id for a in listed] == [approval_id]
        with pytest.raises(NotFound):
            await controls.decide("apr_000000000000", approve=True, operator="al", reason="x")
        with pytest.raises(Invalid) as bad:
            await controls.decide(approval_id, approve=True, operator="crm-team", reason="mine")
        assert bad.value.field == "operator"
        decided = await controls.decide(approval_id, approve=True, operator="alice", reason="ok")
        assert decided.decision == "approved"
        result = await dev_harness.result(handle)
        assert result.state == CampaignState.COMPLETED
        with pytest.raises(Conflict):
            await controls.decide(approval_id, approve=False, operator="bob", reason="late")
