"""Campaigns and their CRM, end to end through workers: a spent daily limit parks a campaign
visibly until the CRM's reset, and a consent revocation undoes what the campaign did."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata

from cohortflow.crm.client import CrmClient
from tests.harness import (
    Harness,
    hubspot_sandbox,
    hubspot_settings,
    sandbox_view,
    spec_document,
    wait_for_state,
    without_approval,
)
from workflows.campaign.contract import SA, CampaignState
from workflows.campaign.messages import ConsentChanged
from workflows.campaign.workflow import CampaignWorkflow


@pytest.mark.devserver
async def test_a_spent_daily_limit_parks_the_campaign_until_the_reset_visibly(
    dev_harness: Harness, tmp_path: Path
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [s for s in document["steps"] if s["id"] in ("label", "enrol")]
    spec, version = await dev_harness.apply(document)
    key = await dev_harness.customer()
    with hubspot_sandbox(tmp_path / "hs.db", daily_limit=1) as url:
        dev_harness.settings = hubspot_settings(dev_harness.settings, url)
        async with dev_harness.workers():
            handle = await dev_harness.launch(spec, version, key)
            # The label takes the day's one request; the enrolment finds the window spent.
            status = await wait_for_state(handle, CampaignState.WAITING)
            metadata = await handle.query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata
            )
            attributes = (await handle.describe()).typed_search_attributes
            await handle.cancel()
        requests = sandbox_view(url, "stats")["total"]
    midnight = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    assert status.step_id == "enrol"
    assert datetime.fromisoformat(status.waiting_until) == midnight
    assert "the CRM's rate window until" in str(metadata.current_details)
    assert attributes.get(SA.WAIT_UNTIL) == midnight
    assert requests <= 4, "the campaign kept asking a CRM whose day was spent"


async def test_revoking_consent_undoes_what_the_campaign_did_in_the_crm(harness: Harness) -> None:
    document = without_approval(spec_document())
    document["on_consent_revoked"] = ["unenroll", "remove_from_lists", "clear_properties"]
    document["steps"] = [
        {"id": "label", "type": "crm", "action": "set_properties", "properties": {"tier": "1"}},
        {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "winback"},
        {"id": "listed", "type": "crm", "action": "add_to_list", "list_id": "vip"},
        {"id": "hold", "type": "wait", "duration": "P7D"},
    ]
    spec, version = await harness.apply(document)
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        async with CrmClient(harness.sandbox.url) as crm:
            before = await crm.get_contact(key)
        await handle.signal(
            CampaignWorkflow.consent_changed, ConsentChanged("email", "marketing", False)
        )
        await wait_for_state(handle, CampaignState.CONSENT_BLOCKED)
        result = await handle.result()
    async with CrmClient(harness.sandbox.url) as crm:
        after = await crm.get_contact(key)
    assert result.state == CampaignState.CONSENT_BLOCKED
    assert before is not None and after is not None
    assert (before.sequences, before.lists, before.properties["tier"]) == (
        ["winback"],
        ["vip"],
        "1",
    )
    assert (after.sequences, after.lists, after.properties["tier"]) == ([], [], "")
