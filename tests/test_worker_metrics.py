"""The worker's Prometheus endpoint on the dev server: after a campaign, the SDK's counters
and the campaign's own (started, finished by state, CRM writes) have moved."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.temporal_client import connect, metrics_runtime
from tests.harness import Harness, Sandbox, migrated, spec_document, without_approval
from workflows.campaign.contract import CampaignState

pytestmark = pytest.mark.devserver


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 for none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def test_a_campaign_moves_the_workers_counters(
    dev_settings: Settings, registry_root: Path, sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    client = await connect(dev_settings, tracing=False, runtime=metrics_runtime("127.0.0.1", port))
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    harness = Harness(client, db, registry_root, sandbox)
    document = without_approval(spec_document())
    document["steps"] = [
        {**s, "duration": "PT1S"} if s["type"] == "wait" else s for s in document["steps"]
    ]
    spec, version = await harness.apply(document)
    try:
        async with harness.workers():
            handle = await harness.launch(spec, version, await harness.customer())
            assert (await harness.result(handle)).state == CampaignState.COMPLETED
            async with httpx.AsyncClient(timeout=10) as http:
                scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        await db.dispose()
    campaign = {"campaign_id": spec.campaign_id}
    assert sample(scraped, "cohortflow_campaigns_started", **campaign) == 1
    assert sample(scraped, "cohortflow_campaigns_finished", **campaign, state="completed") == 1
    assert sample(scraped, "cohortflow_crm_writes", action="set_properties") >= 1
    assert sample(scraped, "cohortflow_crm_writes", action="enroll_sequence") >= 1
    assert sample(scraped, "temporal_workflow_completed") >= 1
