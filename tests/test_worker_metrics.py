"""The worker's Prometheus endpoint on the dev server: after a campaign, the SDK's counters
and the campaign's own (started, finished by state, CRM writes, requests, records, 429s,
ceiling, scoring latency) have moved; while it waits, the API's ``/metrics`` counts it
among the running campaigns in that state."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from cohortflow.api.app import create_app
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.temporal_client import connect, metrics_runtime
from tests.harness import (
    Harness,
    Sandbox,
    api_settings,
    migrated,
    serve_app,
    spec_document,
    wait_for_state,
    without_approval,
)
from tests.test_compose import dashboard_metrics
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


async def waiting_in_api(url: str) -> float:
    """The API's count of running campaigns waiting, once visibility shows one (or 0)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(50):
            text = (await http.get("/metrics")).text
            if (count := sample(text, "cohortflow_campaigns_running", state="waiting")) >= 1:
                return count
            await asyncio.sleep(0.1)
    return 0.0


async def test_a_campaign_moves_the_workers_counters(
    dev_settings: Settings, registry_root: Path, sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    client = await connect(dev_settings, tracing=False, runtime=metrics_runtime("127.0.0.1", port))
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    harness = Harness(client, db, registry_root, sandbox)
    document = without_approval(spec_document())
    document["steps"] = [
        {**s, "duration": "PT3S"} if s["type"] == "wait" else s for s in document["steps"]
    ]
    spec, version = await harness.apply(document)
    api = create_app(api_settings(harness, dev_settings, tmp_path, "m" * 32))
    try:
        async with harness.workers():
            # The first CRM request is told to slow down; the batcher waits and sends again.
            sandbox.inject(429, 1, retry_after=0.2)
            handle = await harness.launch(spec, version, await harness.customer())
            await wait_for_state(handle, CampaignState.WAITING)
            with serve_app(api) as url:
                waiting = await waiting_in_api(url)
            assert (await harness.result(handle)).state == CampaignState.COMPLETED
            async with httpx.AsyncClient(timeout=10) as http:
                scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        sandbox.clear()
        await db.dispose()
    assert waiting >= 1
    campaign = {"campaign_id": spec.campaign_id}
    assert sample(scraped, "cohortflow_campaigns_started", **campaign) == 1
    assert sample(scraped, "cohortflow_campaigns_finished", **campaign, state="completed") == 1
    assert sample(scraped, "cohortflow_crm_writes", action="set_properties") >= 1
    assert sample(scraped, "cohortflow_crm_writes", action="enroll_sequence") >= 1
    # The upsert was sent twice (429, then accepted), the enrolment once.
    assert sample(scraped, "cohortflow_crm_rate_limited") == 1
    assert sample(scraped, "cohortflow_crm_requests") == 3
    assert sample(scraped, "cohortflow_crm_records", operation="upsert") == 2
    assert sample(scraped, "cohortflow_crm_ceiling_wait_seconds_count") == 3
    assert 0 < sample(scraped, "cohortflow_crm_ceiling_used") <= 1
    assert sample(scraped, "cohortflow_scoring_seconds_count") == 1
    assert 0 < sample(scraped, "cohortflow_scoring_seconds_sum") < 5
    assert sample(scraped, "temporal_workflow_completed") >= 1
    assert sample(scraped, "temporal_workflow_task_schedule_to_start_latency_count") >= 1
    # Every SDK metric the Grafana dashboard queries is one this worker serves.
    served = set(re.findall(r"^(\w+?)(?:_bucket|_sum|_count)?[{ ]", scraped, re.MULTILINE))
    sdk = {name for name in dashboard_metrics() if name.startswith("temporal_")}
    assert len(sdk) >= 5
    assert sdk - served == set()
