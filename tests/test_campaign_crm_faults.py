"""Campaigns through a misbehaving HubSpot-shaped CRM (the sandbox in HubSpot mode, over real
HTTP, enrolments not idempotent): whatever the fault, every campaign ends as its spec says,
nothing is lost and no effect happens twice."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import WorkflowHandle

from tests.harness import (
    Harness,
    hubspot_sandbox,
    hubspot_settings,
    sandbox_view,
    spec_document,
    without_approval,
)
from workflows.campaign.contract import CampaignState
from workflows.campaign.messages import CampaignResult
from workflows.campaign.workflow import CampaignWorkflow

CAMPAIGNS = 12


def inject(url: str, fault: dict[str, Any]) -> None:
    httpx.post(f"{url}/_sandbox/faults", json=fault).raise_for_status()


async def ended(handles: list[WorkflowHandle[Any, CampaignResult]]) -> list[CampaignResult]:
    """Every campaign's result, polled with time skipping held: unlocked, the test server
    may skip past activities still in flight (sdk-java#1291). Retry backoffs are then real
    time: a fault that every retry of one coalesced batch meets costs 1, 2, 4, ... s."""
    for _ in range(1200):
        states = [(await h.query(CampaignWorkflow.status)).state for h in handles]
        if all(s.terminal for s in states):
            return [await h.result() for h in handles]
        await asyncio.sleep(0.1)
    raise AssertionError(f"campaigns still running: {states}")


@pytest.mark.parametrize(
    "fault",
    [
        # Five in a row: when one batch meets them all, 31 s of backoff (ten would be 487 s).
        pytest.param({"kind": "status", "status": 503, "count": 5}, id="5xx-burst"),
        pytest.param(
            {"kind": "status", "status": 429, "policy": "SECONDLY", "count": 15}, id="429-storm"
        ),
        pytest.param({"kind": "latency", "seconds": 5, "count": 4}, id="latency-spikes"),
        pytest.param({"kind": "drop", "count": 3}, id="replies-lost"),
    ],
)
async def test_every_campaign_ends_and_every_effect_happens_once(
    harness: Harness, tmp_path: Path, fault: dict[str, Any]
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [
        {"id": "label", "type": "crm", "action": "set_properties", "properties": {"tier": "1"}},
        {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "winback"},
        {"id": "listed", "type": "crm", "action": "add_to_list", "list_id": "55"},
    ]
    spec, version = await harness.apply(document)
    keys = [await harness.customer() for _ in range(CAMPAIGNS)]
    with hubspot_sandbox(tmp_path / "hs.db") as url:
        harness.settings = hubspot_settings(harness.settings, url, crm_batch_linger_ms=50)
        inject(url, fault)
        async with harness.workers():
            handles = [await harness.launch(spec, version, key) for key in keys]
            results = await ended(handles)
        effects = sandbox_view(url, "effects")
        contacts = sandbox_view(url, "contacts")
    assert [r.state for r in results] == [CampaignState.COMPLETED] * CAMPAIGNS
    assert contacts["count"] == CAMPAIGNS
    assert sum(e["count"] for e in effects["enrollments"]) == CAMPAIGNS
    assert effects["duplicate_enrollments"] == 0
    assert sum(m["adds"] for m in effects["list_memberships"]) == CAMPAIGNS
    assert effects["duplicate_list_adds"] == 0


# Observed 41-71 s, once over 300 s in CI: with time skipping held, each 503 costs a real
# retry backoff, and an unlucky run of them adds up. Slack until that tail is understood.
@pytest.mark.timeout(600)
async def test_a_crm_failing_at_random_still_gets_every_write_once(
    harness: Harness, tmp_path: Path
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [
        {"id": "label", "type": "crm", "action": "set_properties", "properties": {"tier": "1"}},
        {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "winback"},
    ]
    spec, version = await harness.apply(document)
    keys = [await harness.customer() for _ in range(CAMPAIGNS)]
    with hubspot_sandbox(tmp_path / "hs.db", error_rate=0.3, seed=7) as url:
        harness.settings = hubspot_settings(harness.settings, url, crm_batch_linger_ms=50)
        async with harness.workers():
            handles = [await harness.launch(spec, version, key) for key in keys]
            results = await ended(handles)
        effects = sandbox_view(url, "effects")
        stats = sandbox_view(url, "stats")
    assert [r.state for r in results] == [CampaignState.COMPLETED] * CAMPAIGNS
    assert stats["by_status"].get("500", 0) + stats["by_status"].get("503", 0) > 0
    assert sum(e["count"] for e in effects["enrollments"]) == CAMPAIGNS
    assert effects["duplicate_enrollments"] == 0


async def test_a_record_the_crm_refuses_in_a_batch_fails_only_its_own_campaign(
    harness: Harness, tmp_path: Path
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [
        {"id": "label", "type": "crm", "action": "set_properties", "properties": {"tier": "1"}}
    ]
    spec, version = await harness.apply(document)
    keys = [await harness.customer() for _ in range(CAMPAIGNS)]
    refused = keys[5]
    with hubspot_sandbox(tmp_path / "hs.db") as url:
        harness.settings = hubspot_settings(harness.settings, url, crm_batch_linger_ms=300)
        inject(url, {"kind": "reject_record", "record_id": refused, "message": "INVALID_EMAIL"})
        async with harness.workers():
            handles = [await harness.launch(spec, version, key) for key in keys]
            results = dict(zip(keys, await ended(handles), strict=True))
        stats = sandbox_view(url, "stats")
        contacts = sandbox_view(url, "contacts")
    assert results[refused].state == CampaignState.FALLBACK
    assert "INVALID_EMAIL" in results[refused].reason
    assert results[refused].segment == "nurture_default"
    others = [results[key].state for key in keys if key != refused]
    assert others == [CampaignState.COMPLETED] * (CAMPAIGNS - 1)
    held = {c["keys"]["cohortflow_key"]: c["properties"] for c in contacts["contacts"]}
    # The refused record was never written; only the safe segment landed on its contact.
    assert "tier" not in held[refused]
    assert held[refused]["cohortflow_segment"] == "nurture_default"
    assert all(held[key]["tier"] == "1" for key in keys if key != refused)
    assert stats["total"] < CAMPAIGNS, "the campaigns' writes were not batched"
