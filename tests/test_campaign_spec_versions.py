"""Spec versions and long campaigns on the time-skipping server: campaigns already running
finish on the version they started with while new entries take the newest, and a campaign
continues as new through several cycles without losing its state, approval or waits."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle, WorkflowHistory

from cohortflow.storage import campaigns
from tests.harness import Harness, wait_for_state
from workflows.campaign import (
    CONTROL_SKIPS_APPROVAL_PATCH,
    DECISIONS_RIDE_ALONG_PATCH,
    VARIANT_AUDIT_PATCH,
    CampaignWorkflow,
)
from workflows.messages import (
    CampaignInput,
    CampaignResult,
    CampaignState,
    CampaignStatus,
    CustomerEvent,
    DecideRequest,
)


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


async def status_of(handle: WorkflowHandle[Any, CampaignResult]) -> CampaignStatus:
    return await handle.query("status", result_type=CampaignStatus)


async def push_until_continued(handle: WorkflowHandle[Any, CampaignResult], runs: int) -> None:
    """Send unrelated customer events, each growing the history, until run ``runs`` starts."""
    for _ in range(40):
        status = await status_of(handle)
        if status.runs >= runs:
            return
        await handle.signal("customer_event", CustomerEvent("page_view", "2026-01-01T00:00:00Z"))
        await asyncio.sleep(0.05)
    raise AssertionError(f"the campaign never reached run {runs}")


async def test_a_long_campaign_continues_as_new_without_losing_anything(harness: Harness) -> None:
    spec, version = await harness.apply(
        {
            "campaign_id": f"l{uuid.uuid4().hex[:10]}",
            "name": "Long",
            "owner": "crm-team",
            "entry_cohort": "test_cohort",
            "safe_default_segment": "nurture_default",
            "sensitive": True,
            "approval": {"timeout": "P3D"},
            "steps": [
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
                    "properties": {"x": "1"},
                },
                {"id": "done", "type": "exit"},
                {"id": "gave_up", "type": "exit", "outcome": "exited"},
            ],
        }
    )
    key = await harness.customer()
    workflow_id = f"campaign:{spec.campaign_id}:{key}:1"
    async with harness.workers():
        handle = await harness.client.start_workflow(
            CampaignWorkflow.run,
            CampaignInput(
                spec.campaign_id,
                version,
                key,
                "1",
                "test_cohort",
                crm_task_queue=harness.settings.crm_task_queue,
                history_limit=40,
            ),
            id=workflow_id,
            task_queue=harness.settings.task_queue,
        )
        latest = harness.client.get_workflow_handle_for(CampaignWorkflow.run, workflow_id)
        asked = await wait_for_state(latest, CampaignState.AWAITING_APPROVAL)
        await push_until_continued(latest, 2)
        resumed = await wait_for_state(latest, CampaignState.AWAITING_APPROVAL)
        assert resumed.pending_approval == asked.pending_approval
        assert asked.pending_approval is not None
        await latest.execute_update(
            CampaignWorkflow.decide,
            DecideRequest(asked.pending_approval.approval_id, True, "alice", "fine"),
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
        await latest.signal("customer_event", CustomerEvent("purchase", "2026-01-01T00:00:00Z"))
        result = await harness.result(latest)
        final = await status_of(latest)
    assert handle.id == workflow_id
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["approve", "hold", "first_purchase", "label", "done"]
    assert final.runs >= 4
    assert final.scores == {} and final.variant == "treatment"


HISTORIES = Path(__file__).parent / "histories"


def test_v2_histories_of_the_new_behaviour_are_kept_for_replay() -> None:
    # tests/test_replay.py replays every campaign_v*.json on today's code.
    names = {p.stem for p in HISTORIES.glob("campaign_v2_*.json")}
    assert names >= {
        "campaign_v2_event_wait_converted",
        "campaign_v2_local_time_quiet_hours_capped",
        "campaign_v2_stratified_holdout_exit_event",
        "campaign_v2_continued_as_new_mid_approval",
        "campaign_v2_resumed_approval_completed",
    }
    # The entry audit of the holdout arm is new in v2, behind its patch id.
    assert patches("campaign_v2_event_wait_converted") == {VARIANT_AUDIT_PATCH}
    assert all(not patches(p.stem) for p in HISTORIES.glob("campaign_v1_*.json"))


def test_v3_history_records_that_control_skips_approval() -> None:
    # Saved by tests/test_campaign_spec_features.py with COHORTFLOW_SAVE_HISTORIES=1.
    assert patches("campaign_v3_control_skips_approval") == {
        VARIANT_AUDIT_PATCH,
        CONTROL_SKIPS_APPROVAL_PATCH,
    }


def test_v4_history_records_that_decisions_ride_along() -> None:
    # Saved by tests/test_campaign_workflow.py with COHORTFLOW_SAVE_HISTORIES=1.
    assert DECISIONS_RIDE_ALONG_PATCH in patches("campaign_v4_decisions_ride_along")


def patches(name: str) -> set[str]:
    """The patch ids recorded in a saved history."""
    history = WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())
    found = set()
    for event in history.events:
        marker = event.marker_recorded_event_attributes
        if (
            event.HasField("marker_recorded_event_attributes")
            and marker.marker_name == "core_patch"
        ):
            found |= {json.loads(p.data)["id"] for p in marker.details["patch-data"].payloads}
    return found
