"""Spec versions and long campaigns on the time-skipping server: campaigns already running
finish on the version they started with while new entries take the newest, and a campaign
continues as new through several cycles without losing its state, approval or waits."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowHistory

from cohortflow.crm.client import CrmClient
from cohortflow.storage import approvals, campaigns
from tests.harness import Harness, push_until_continued, status_of, wait_for_state
from workflows.campaign.contract import (
    CampaignState,
)
from workflows.campaign.messages import CampaignResult, CustomerEvent, DecideRequest
from workflows.campaign.workflow import CampaignWorkflow

# ---------------------------------------------------------------- runs continued before the split

# The spec the histories campaign_v4_carried_* ran (saved on the code before the campaign
# package split): each of their runs ended by continuing as new, and the input it handed to the
# next run is in its last event.
CARRIED_SPEC: dict[str, Any] = {
    "campaign_id": "carried_before_split",
    "name": "Carried across the package split",
    "owner": "crm-team",
    "entry_cohort": "test_cohort",
    "safe_default_segment": "nurture_default",
    "sensitive": True,
    "approval": {"timeout": "P3D"},
    "steps": [
        {"id": "score", "type": "score", "models": ["churn"]},
        {"id": "approve", "type": "approval", "reason": "long campaign"},
        {"id": "hold", "type": "wait", "duration": "P1D"},
        {
            "id": "first_purchase",
            "type": "wait",
            "event": "purchase",
            "timeout": "P2D",
            "on_event": "label",
            "on_timeout": "gave_up",
        },
        {
            "id": "label",
            "type": "crm",
            "action": "set_properties",
            "properties": {"churn": "{score.churn}", "variant": "{variant}"},
        },
        {"id": "done", "type": "exit"},
        {"id": "gave_up", "type": "exit", "outcome": "exited"},
    ],
}


def versioned(campaign_id: str, last_step: str) -> dict[str, Any]:
    return {
        "campaign_id": campaign_id,
        "name": "Versioned",
        "owner": "crm-team",
        "entry_cohort": "test_cohort",
        "safe_default_segment": "nurture_default",
        "steps": [
            {"id": "hold", "type": "wait", "duration": "P2D"},
            {"id": last_step, "type": "exit"},
        ],
    }


async def test_running_campaigns_finish_on_their_version_and_new_entries_take_the_newest(
    harness: Harness,
) -> None:
    campaign_id = f"v{uuid.uuid4().hex[:10]}"
    old_spec, old_version = await harness.apply(versioned(campaign_id, "old_path"))
    old_keys = [await harness.customer() for _ in range(50)]
    new_keys = [await harness.customer() for _ in range(5)]
    async with harness.workers():
        old = [await harness.launch(old_spec, old_version, key) for key in old_keys]
        for handle in old:
            await wait_for_state(handle, CampaignState.WAITING)
        new_spec, new_version = await harness.apply(versioned(campaign_id, "new_path"))
        assert new_version == old_version + 1
        new = [await harness.launch(new_spec, new_version, key) for key in new_keys]
        assert harness.env is not None
        async with harness.env.time_skipping_unlocked():
            results = await asyncio.gather(*(h.result() for h in [*old, *new]))
    old_results, new_results = results[:50], results[50:]
    assert {tuple(r.steps_run) for r in old_results} == {("hold", "old_path")}
    assert {tuple(r.steps_run) for r in new_results} == {("hold", "new_path")}
    assert all(r.state == CampaignState.COMPLETED for r in results)
    async with harness.db.transaction() as session:
        assert await campaigns.count_entries(session, campaign_id) == 55


async def test_a_long_campaign_continues_as_new_without_losing_anything(harness: Harness) -> None:
    # The campaign of the histories saved before the split, without its score step.
    document = {**CARRIED_SPEC, "campaign_id": f"l{uuid.uuid4().hex[:10]}", "name": "Long"}
    spec, version = await harness.apply({**document, "steps": CARRIED_SPEC["steps"][1:]})
    key = await harness.customer()
    workflow_id = f"campaign:{spec.campaign_id}:{key}:1"
    async with harness.workers():
        handle = await harness.start(spec, version, key, history_limit=40)
        latest = harness.client.get_workflow_handle_for(CampaignWorkflow.run, workflow_id)
        asked = await wait_for_state(latest, CampaignState.AWAITING_APPROVAL)
        await push_until_continued(latest, 2)
        resumed = await wait_for_state(latest, CampaignState.AWAITING_APPROVAL)
        assert resumed.pending_approval == asked.pending_approval
        assert asked.pending_approval is not None
        await latest.execute_update(
            CampaignWorkflow.decide,
            DecideRequest(asked.pending_approval.approval_id, True, "alice", "fine", ["approver"]),
        )
        waiting = await wait_for_state(latest, CampaignState.WAITING)
        assert waiting.step_id == "hold"
        await push_until_continued(latest, 3)
        still = await wait_for_state(latest, CampaignState.WAITING)
        assert (still.step_id, still.waiting_until) == ("hold", waiting.waiting_until)
        assert harness.env is not None
        # Jump past the one-day wait only, not into the two-day wait for an event after it.
        await harness.env.sleep(timedelta(days=1, minutes=1))
        for _ in range(100):
            awaiting = await status_of(latest)
            if awaiting.waiting_for_event:
                break
            await asyncio.sleep(0.05)
        assert awaiting.waiting_for_event == "purchase"
        await push_until_continued(latest, 4)
        after = await wait_for_state(latest, CampaignState.WAITING)
        assert (after.waiting_for_event, after.waiting_until) == (
            "purchase",
            awaiting.waiting_until,
        )
        await latest.signal(
            CampaignWorkflow.customer_event, CustomerEvent("purchase", "2026-01-01T00:00:00Z")
        )
        result = await harness.result(latest)
        final = await status_of(latest)
    assert handle.id == workflow_id
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["approve", "hold", "first_purchase", "label", "done"]
    assert final.runs >= 4
    assert final.scores == {} and final.variant == "treatment"


HISTORIES = Path(__file__).parent / "histories"


def handed_over(name: str) -> dict[str, Any]:
    """The input a run saved before the split handed to its continuation, as JSON."""
    path = HISTORIES / f"campaign_v4_carried_{name}.json"
    history = WorkflowHistory.from_json(name, path.read_text())
    last = history.events[-1].workflow_execution_continued_as_new_event_attributes
    document: dict[str, Any] = json.loads(last.input.payloads[0].data)
    return document


def shifted(document: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The same JSON with its instants moved so the oldest is ``now``: the resumed waits keep
    their length whenever this test runs."""
    carried = document["carried"]
    entered = datetime.fromisoformat(carried["entered_at"])

    def moved(text: str) -> str:
        return (now + (datetime.fromisoformat(text) - entered)).isoformat() if text else ""

    carried["entered_at"] = moved(carried["entered_at"])
    carried["deadline"] = moved(carried["deadline"])
    pending = carried.get("pending_approval")
    if pending:
        pending["requested_at"] = moved(pending["requested_at"])
        pending["expires_at"] = moved(pending["expires_at"])
    return document


@pytest.mark.parametrize("name", ["mid_approval", "mid_wait", "mid_event_wait"])
async def test_a_run_continued_as_new_before_the_split_resumes_on_this_code(
    harness: Harness, name: str
) -> None:
    document = shifted(handed_over(name), await server_now(harness))
    carried = document["carried"]
    assert "current" not in carried  # the old JSON, not this code's
    spec, version = await harness.apply(CARRIED_SPEC)
    assert (spec.campaign_id, version) == (document["campaign_id"], document["version"])
    key = await harness.customer(key=document["customer_key"])
    document["crm_task_queue"] = harness.settings.crm_task_queue
    workflow_id = f"campaign:{spec.campaign_id}:{key}:{name}"
    pending = carried["pending_approval"]
    if name == "mid_approval":
        await store_pending(harness, workflow_id, key, pending)
    async with harness.workers():
        handle = await harness.client.start_workflow(
            "CampaignWorkflow",
            document,
            id=workflow_id,
            task_queue=harness.settings.task_queue,
            result_type=CampaignResult,
        )
        status = await wait_for_state(
            handle,
            CampaignState.AWAITING_APPROVAL if pending else CampaignState.WAITING,
        )
        assert status.step_id == carried["step_id"]
        assert (status.scores, status.variant) == (carried["scores"], carried["variant"])
        assert status.runs == carried["runs"]
        if pending:
            assert status.pending_approval is not None
            assert status.pending_approval.expires_at == pending["expires_at"]
            await handle.execute_update(
                CampaignWorkflow.decide,
                DecideRequest(
                    pending["approval_id"], True, "alice", "resumed after the split", ["approver"]
                ),
            )
        else:
            assert status.waiting_until == datetime.fromisoformat(carried["deadline"]).isoformat(
                timespec="seconds"
            )
        result = await resume_to_the_end(harness, handle)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["score", "approve", "hold", "first_purchase", "label", "done"]
    async with CrmClient(harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None
    assert contact.properties["churn"] == f"{carried['scores']['churn']:.4f}"


async def server_now(harness: Harness) -> datetime:
    """The time-skipping server's clock, which runs ahead of the wall clock after skips."""
    assert harness.env is not None
    return await harness.env.get_current_time()


async def store_pending(harness: Harness, workflow_id: str, key: str, pending: Any) -> None:
    """The approval row the old run stored when it asked."""
    async with harness.db.transaction() as session:
        await approvals.add_pending(
            session,
            approval_id=pending["approval_id"],
            workflow_id=workflow_id,
            step_id=pending["step_id"],
            campaign_id=CARRIED_SPEC["campaign_id"],
            customer_key=key,
            reason=pending["reason"],
            scores={},
            requested_at=datetime.fromisoformat(pending["requested_at"]),
            expires_at=datetime.fromisoformat(pending["expires_at"]),
        )


async def resume_to_the_end(
    harness: Harness, handle: WorkflowHandle[Any, CampaignResult]
) -> CampaignResult:
    """Let the one-day wait pass, then buy during the wait for a purchase."""
    assert harness.env is not None
    for _ in range(200):
        status = await status_of(handle)
        if status.waiting_for_event == "purchase":
            break
        if status.step_id == "hold" and status.state == CampaignState.WAITING:
            await harness.env.sleep(timedelta(days=1, minutes=1))
        await asyncio.sleep(0.05)
    assert status.waiting_for_event == "purchase", status
    await handle.signal(
        CampaignWorkflow.customer_event, CustomerEvent("purchase", "2026-01-01T00:00:00Z")
    )
    # Waited for with time skipping locked: unlocked, the test server may skip past the
    # workflow and activity tasks still to come (sdk-java#1291).
    assert (await harness.closed(handle)).status == WorkflowExecutionStatus.COMPLETED
    return await handle.result()
