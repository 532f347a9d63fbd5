"""Campaign throughput on the embedded dev server, against a bare one-activity workflow.

On one machine the Temporal server is the ceiling (DESIGN.md, "What a campaign costs"), so
the baseline is the least a durable external write can cost: a workflow that runs one
activity. Both run in the same process, on the same dev server (SQLite, WAL), with the same
worker settings. The campaign is the demo's shape without approval: score (XGBoost) ->
branch -> consent-gated CRM label -> 1 s durable timer -> CRM enrolment, through the sandbox
CRM over HTTP (its own process, as in every deployment).

    python -m bench.campaign_throughput --campaigns 200

Ends with one JSON line: bench, ratio (campaigns/s over bare workflows/s), target, figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities.campaign import CampaignActivities
from bench._bare_workflow import BareWorkflow, noop
from cohortflow.crm.client import CrmClient
from cohortflow.launcher import Entry, Launcher
from cohortflow.observability import configure_logging
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.runtime.process import spawn, stop, tail
from cohortflow.runtime.supervisor import child_env, cohortflow_command, http_ok
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns, consent, customers
from cohortflow.storage.db import Database, migrate
from cohortflow.temporal_client import connect
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, train_churn
from workers.campaign_worker import build_workers
from workflows.messages import campaign_workflow_id

TARGET = 0.3  # a campaign makes 3 activities, 1 timer and 3 local activities; bare makes 1


SPEC = {
    "campaign_id": "bench",
    "name": "Bench campaign",
    "owner": "bench",
    "entry_cohort": "bench",
    "safe_default_segment": "nurture_default",
    "steps": [
        {"id": "score", "type": "score", "models": ["churn"]},
        {
            "id": "route",
            "type": "branch",
            "rules": [{"all": [{"score": "churn", "op": ">", "value": 2.0}], "next": "done"}],
            "default": "label",
        },
        {
            "id": "label",
            "type": "crm",
            "action": "set_properties",
            "properties": {"cohort_label": "{cohort}", "churn_score": "{score.churn}"},
        },
        {"id": "pause", "type": "wait", "duration": "PT1S"},
        {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "bench"},
        {"id": "done", "type": "exit"},
    ],
}


async def _bare(client: Client, n: int, queue: str) -> float:
    async with Worker(client, task_queue=queue, workflows=[BareWorkflow], activities=[noop]):
        started = time.perf_counter()
        handles = await asyncio.gather(
            *(
                client.start_workflow(
                    BareWorkflow.run, str(i), id=f"bare-{queue}-{i}", task_queue=queue
                )
                for i in range(n)
            )
        )
        await asyncio.gather(*(h.result() for h in handles))
        return n / (time.perf_counter() - started)


async def _campaigns(
    client: Client, db: Database, registry: Path, crm_url: str, n: int
) -> tuple[float, int]:
    suffix = uuid.uuid4().hex[:6]
    settings = Settings(
        task_queue=f"bench-{suffix}", crm_task_queue=f"bench-crm-{suffix}", crm_url=crm_url
    )
    spec = CampaignSpec.model_validate(SPEC)
    keys = [f"c_{uuid.uuid4().hex[:24]}" for _ in range(n)]
    features = dict.fromkeys(FEATURE_NAMES, 1.0)
    async with db.transaction() as session:
        version, _ = await campaigns.save_spec_version(
            session, spec.campaign_id, spec.model_dump(mode="json"), created_by="bench"
        )
        await customers.upsert_customers(
            session, [customers.CustomerRecord(k, f"src-{k}", None) for k in keys]
        )
        await customers.upsert_features(session, [(k, features, datetime.now(UTC)) for k in keys])
        await consent.bulk_set_consent(
            session, [(k, "email", "marketing", True) for k in keys], source="bench"
        )
    launcher = Launcher(client, db, settings)
    async with CrmClient(crm_url) as crm, contextlib.AsyncExitStack() as stack:
        for worker in build_workers(
            client,
            CampaignActivities(db, Scorer(ModelRegistry(registry)), crm),
            task_queue=settings.task_queue,
            crm_task_queue=settings.crm_task_queue,
            crm_max_activities_per_second=1000.0,
        ):
            await stack.enter_async_context(worker)
        started = time.perf_counter()
        gate = asyncio.Semaphore(32)

        async def one(key: str) -> None:
            async with gate:
                await launcher.launch(spec, version, Entry(key, "bench"))

        await asyncio.gather(*(one(k) for k in keys))
        handles = [
            client.get_workflow_handle(campaign_workflow_id(spec.campaign_id, k, "1")) for k in keys
        ]
        await asyncio.gather(*(h.result() for h in handles))
        elapsed = time.perf_counter() - started
    events = len([e async for e in handles[0].fetch_history_events()])
    return n / elapsed, events


@contextlib.contextmanager
def _sandbox(root: Path) -> Iterator[str]:
    """The sandbox CRM in its own process, as in `cohortflow up` and every deployment: the
    CRM's CPU is not the worker's."""
    settings = Settings(
        data_dir=root, crm_sandbox_port=free_port(), crm_sandbox_rate_limit=1_000_000
    )
    url = settings.resolved_crm_url
    proc = spawn(
        cohortflow_command("crm-sandbox"), env=child_env(settings), log_path=root / "crm.log"
    )
    try:
        healthy = http_ok(f"{url}/healthz")
        deadline = time.monotonic() + 60
        while not healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox CRM did not start:\n{tail(root / 'crm.log')}")
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)


async def main(n: int) -> dict[str, object]:
    """Run both workloads and return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = ModelRegistry(root / "models")
        registry.register(
            train_churn(load_transactions(), TrainConfig(bootstrap_resamples=0)),
            promoted_by="bench",
        )
        settings = Settings(data_dir=root, temporal_port=free_port(), temporal_ui_port=free_port())
        url = f"sqlite+aiosqlite:///{root / 'app.db'}"
        await migrate(url)
        db = Database(url)
        server = DevServer(settings)
        await server.start()
        try:
            client = await connect(settings, tracing=False)
            with _sandbox(root) as crm_url:
                bare_rate = await _bare(client, n, f"bare-{uuid.uuid4().hex[:6]}")
                campaign_rate, events = await _campaigns(client, db, registry.root, crm_url, n)
        finally:
            server.stop()
            await db.dispose()
    return {
        "bench": "campaign_throughput",
        "ratio": round(campaign_rate / bare_rate, 3),
        "target": TARGET,
        "campaigns": n,
        "campaigns_per_s": round(campaign_rate, 2),
        "bare_workflows_per_s": round(bare_rate, 2),
        "campaign_history_events": events,
        "note": "includes each campaign's 1 s durable timer",
    }


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=200, help="workflows of each kind")
    figures = asyncio.run(main(parser.parse_args().campaigns))
    print(f"bare one-activity workflows: {figures['bare_workflows_per_s']}/s")
    print(f"campaigns:                   {figures['campaigns_per_s']}/s")
    print(json.dumps(figures))
