"""Campaigns at a tight CRM ceiling, end to end on the embedded server.

Campaigns that score, label the customer and add it to a list run in `cohortflow worker`
processes against the sandbox CRM in HubSpot mode, twice in the same run: with an unlimited
CRM (the baseline) and with the CRM limited to 10 requests per 10 s. One record per call
could not pass one record a second; batched across campaigns (up to 100 records a call) the
limited run should keep at least 0.8 of the baseline's rate.

    python -m bench.crm_end_to_end [--campaigns 2000] [--workers 1]

Ends with one JSON line: bench, ratio (limited over unlimited campaigns/s), target, figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from bench.campaign_throughput import embedded, run_campaigns, sandbox_crm
from cohortflow.observability import configure_logging
from cohortflow.settings import Settings
from cohortflow.temporal_client import connect

TARGET = 0.8
TOKEN = "pat-bench"
LIMIT, WINDOW = 10, 10.0

SPEC: dict[str, Any] = {
    "campaign_id": "bench_crm",
    "name": "Bench campaign at the CRM ceiling",
    "owner": "bench",
    "entry_cohort": "bench",
    "safe_default_segment": "nurture_default",
    "steps": [
        {"id": "score", "type": "score", "models": ["churn"]},
        {
            "id": "label",
            "type": "crm",
            "action": "set_properties",
            "properties": {"cohort_label": "{cohort}", "churn_score": "{score.churn}"},
        },
        {"id": "listed", "type": "crm", "action": "add_to_list", "list_id": "4711"},
    ],
}


async def one_run(
    settings: Settings, root: Path, n: int, workers: int, limit: int | None
) -> dict[str, Any]:
    """The campaigns against a HubSpot-mode sandbox allowing ``limit`` requests a window."""
    sandbox = {
        "crm_sandbox_mode": "hubspot",
        "crm_token": TOKEN,
        "crm_sandbox_rate_limit": limit or 1_000_000,
        "crm_sandbox_rate_window_seconds": WINDOW,
    }
    suffix = uuid.uuid4().hex[:6]
    with sandbox_crm(root, **sandbox) as url:
        run = settings.model_copy(
            update={
                "crm_kind": "hubspot",
                "crm_url": url,
                "crm_token": SecretStr(TOKEN),
                "crm_user_id": "1",
                "crm_sender_email": "bench@example.com",
                "crm_rate_limit": limit or 1_000_000,
                "crm_rate_window_seconds": WINDOW,
                "task_queue": f"bench-{suffix}",
                "crm_task_queue": f"bench-crm-{suffix}",
            }
        )
        client = await connect(run, tracing=False)
        rate, events = await run_campaigns(client, run, n, workers, SPEC)
        async with httpx.AsyncClient(timeout=60) as http:
            stats = (await http.get(f"{url}/_sandbox/stats")).json()
    return {
        "campaigns_per_s": round(rate, 2),
        "history_events": events,
        "crm_requests": int(stats["total"]),
        "rate_limited": int(stats["rate_limited"]),
    }


async def main(n: int, workers: int) -> dict[str, Any]:
    """Both runs on one dev server; the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("unlimited", "limited"):
            (root / name).mkdir()
        async with embedded(root) as settings:
            unlimited = await one_run(settings, root / "unlimited", n, workers, None)
            limited = await one_run(settings, root / "limited", n, workers, LIMIT)
    return {
        "bench": "crm_end_to_end",
        "ratio": round(limited["campaigns_per_s"] / unlimited["campaigns_per_s"], 3),
        "target": TARGET,
        "campaigns": n,
        "crm_limit": f"{LIMIT} requests per {WINDOW:g} s",
        "limited_campaigns_per_s": limited["campaigns_per_s"],
        "unlimited_campaigns_per_s": unlimited["campaigns_per_s"],
        "limited_crm_requests": limited["crm_requests"],
        "limited_rate_limited": limited["rate_limited"],
        "unlimited_crm_requests": unlimited["crm_requests"],
        "history_events": limited["history_events"],
        "worker_processes": workers,
    }


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=1, help="`cohortflow worker` processes")
    args = parser.parse_args()
    figures = asyncio.run(main(args.campaigns, args.workers))
    print(
        f"{figures['campaigns']} campaigns: {figures['unlimited_campaigns_per_s']}/s with an "
        f"unlimited CRM, {figures['limited_campaigns_per_s']}/s at {figures['crm_limit']} "
        f"({figures['limited_crm_requests']} requests, {figures['limited_rate_limited']} "
        "answered 429)"
    )
    print(json.dumps(figures))
