"""Campaigns on the real Temporal dev server: timers in history, what the UI shows, visibility,
and operators deciding through the same code the CLI and the API use."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from cohortflow.campaigns.controls import Controls
from cohortflow.crm.client import CrmClient
from cohortflow.errors import Conflict, Forbidden, NotFound
from cohortflow.pseudonymisation import Pseudonymiser
from tests.harness import (
    Harness,
    current_details,
    decoded,
    spec_document,
    wait_for_state,
    who,
)
from workflows.campaign.contract import SA, CampaignState

pytestmark = pytest.mark.devserver


def deadline_before(moment: datetime, days: int) -> str:
    later = (moment + timedelta(days=days)).astimezone(UTC).isoformat(timespec="seconds")
    return f'ApprovalDeadline < "{later}"'


async def count_soon(harness: Harness, query: str) -> int:
    """Visibility is eventually consistent: the count once it settles on the expected side."""
    count = 0
    for _ in range(50):
        count = (await harness.client.count_workflows(query)).count
        if count:
            break
        await asyncio.sleep(0.1)
    return count


async def summaries_of(client: Client, handle: WorkflowHandle[Any, Any]) -> set[str]:
    """The summaries the UI shows on the history's activities and timers."""
    return {
        str(await decoded(client, event.user_metadata.summary))
        async for event in handle.fetch_history_events()
        if event.HasField("user_metadata") and event.user_metadata.HasField("summary")
    }


def short_wait(document: dict[str, object], duration: str = "PT1S") -> dict[str, object]:
    steps = [
        {**s, "duration": duration} if s.get("type") == "wait" else s
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
    # Waits long enough for the search attributes of the wait to be seen.
    spec, version = await dev_harness.apply(short_wait(spec_document(), "PT4S"))
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
        assert details is not None and "3. `approve` approval" in details
        shown = await current_details(handle)
        expires = datetime.fromisoformat(status.pending_approval.expires_at)
        assert f"approval `{approval_id}` until {expires:%Y-%m-%d %H:%M} UTC" in shown
        assert "route: rules[0] -> approve (churn " in shown  # the branch and its values

        # What an SRE asks the Temporal UI: approvals that expire within four days, not three.
        campaign = f'CampaignId = "{spec.campaign_id}" AND AwaitingApproval = true'
        assert await count_soon(dev_harness, f"{campaign} AND {deadline_before(expires, 1)}") == 1
        assert await count_soon(dev_harness, f"{campaign} AND {deadline_before(expires, -1)}") == 0

        listed = await controls.list_approvals(who("alice"))
        assert [a.approval_id for a in listed] == [approval_id]
        with pytest.raises(NotFound):
            await controls.decide("apr_000000000000", approve=True, identity=who("al"), reason="x")
        with pytest.raises(Forbidden) as bad:
            await controls.decide(
                approval_id, approve=True, identity=who("crm-team"), reason="mine"
            )
        assert "crm-team requested this campaign" in bad.value.message
        decided = await controls.decide(
            approval_id, approve=True, identity=who("alice"), reason="ok"
        )
        assert decided.decision == "approved"
        waiting = await wait_for_state(handle, CampaignState.WAITING)
        assert "approve: approved by alice: ok" in await current_details(handle)
        until = datetime.fromisoformat(waiting.waiting_until) + timedelta(seconds=1)
        parked = f'CampaignId = "{spec.campaign_id}" AND WaitUntil < "{until.isoformat()}"'
        assert await count_soon(dev_harness, parked) == 1
        result = await dev_harness.result(handle)
        assert result.state == CampaignState.COMPLETED
        # Every activity and timer says what it is for; the deadlines go once they are over.
        summaries = await summaries_of(dev_harness.client, handle)
        assert "approve: approval expires" in summaries and "pause: wait" in summaries
        assert "score: score churn" in summaries and "enrol: enroll_sequence winback" in summaries
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(SA.APPROVAL_DEADLINE) is None
        assert attributes.get(SA.WAIT_UNTIL) is None
        with pytest.raises(Conflict):
            await controls.decide(approval_id, approve=False, identity=who("bob"), reason="late")
