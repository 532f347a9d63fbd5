"""Campaign throughput on the embedded dev server, against a bare one-activity workflow.

On one machine the Temporal server is the ceiling (docs/architecture.md, "What a campaign
costs"), so
the baseline is the least a durable external write can cost: a workflow that runs one
activity, with an in-process worker. Both run on the same dev server (SQLite, WAL). The
campaign is the demo's shape without approval: score (XGBoost) -> branch -> consent-gated
CRM label -> 1 s durable timer -> CRM enrolment, run by `cohortflow worker` processes
(`--workers`) against the sandbox CRM over HTTP, each part in its own process as in every
deployment. `BENCH_DATABASE_URL` puts the app database elsewhere (PostgreSQL).

    python -m bench.campaign_throughput --campaigns 200 [--workers 2]

Ends with one JSON line: bench, ratio (campaigns/s over bare workflows/s), target, figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from bench._bare_workflow import BareWorkflow, noop
from cohortflow.campaigns.launcher import Entry, Launcher
from cohortflow.observability import configure_logging
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.runtime.process import spawn, stop, tail
from cohortflow.runtime.supervisor import child_env, cohortflow_command, http_ok
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns, consent, customers
from cohortflow.storage.db import Database, migrate
from cohortflow.temporal_client import connect, wait_for_pollers
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES
from scoring.registry import ModelRegistry
from scoring.train import TrainConfig, train_churn
from workflows.campaign.contract import campaign_workflow_id

TARGET = 0.3  # a campaign makes 3 activities, 1 timer and 2 local activities; bare makes 1


SPEC: dict[str, Any] = {
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


async def seeded(
    db: Database, document: dict[str, Any], n: int
) -> tuple[CampaignSpec, int, list[str]]:
    """``document`` applied (by "bench") and ``n`` new consenting customers with features;
    the spec, its version and the customers' keys."""
    spec = CampaignSpec.model_validate(document)
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
    return spec, version, keys


async def run_campaigns(
    client: Client, settings: Settings, n: int, workers: int, document: dict[str, Any] = SPEC
) -> tuple[float, int]:
    """Launch ``n`` campaigns of ``document`` run by ``workers`` worker processes; their
    rate from the first launch to the last end, and one campaign's history events."""
    db = Database(settings.resolved_database_url)
    spec, version, keys = await seeded(db, document, n)
    launcher = Launcher(client, db, settings)
    # `cohortflow worker` processes, as deployments run them.
    root = settings.data_dir
    processes = [
        spawn(cohortflow_command("worker"), env=child_env(settings), log_path=root / f"w{i}.log")
        for i in range(workers)
    ]
    try:
        await wait_for_pollers(client, settings.task_queue, workers, limit_seconds=120)
        started = time.perf_counter()
        gate = asyncio.Semaphore(32)

        async def one(key: str) -> None:
            async with gate:
                await launcher.launch(spec, version, Entry(key, "bench"))

        await asyncio.gather(*(one(k) for k in keys))
        handles = [
            client.get_workflow_handle(campaign_workflow_id(spec.campaign_id, k, "1")) for k in keys
        ]

        async def ended(handle: WorkflowHandle[Any, Any]) -> None:
            # A result is a long poll: the dev server allows only so many at once.
            async with gate:
                await handle.result()

        await asyncio.gather(*(ended(h) for h in handles))
        elapsed = time.perf_counter() - started
    finally:
        for process in processes:
            stop(process)
        await db.dispose()
    events = len([e async for e in handles[0].fetch_history_events()])
    return n / elapsed, events


@contextlib.contextmanager
def sandbox_crm(root: Path, **config: Any) -> Iterator[str]:
    """The sandbox CRM in its own process, as in `cohortflow up` and every deployment: the
    CRM's CPU is not the worker's. ``config``: its ``crm_sandbox_*`` and token settings."""
    settings = Settings(
        data_dir=root,
        crm_sandbox_port=free_port(),
        **{"crm_sandbox_rate_limit": 1_000_000, **config},
    )
    url = settings.resolved_crm_url
    with serving("crm-sandbox", settings, url, root / "crm.log"):
        yield url


@contextlib.contextmanager
def serving(subcommand: str, settings: Settings, url: str, log_path: Path) -> Iterator[None]:
    """``cohortflow <subcommand>`` in its own process with ``settings``, for as long as the
    block runs, once ``url``/healthz answers (its log's tail if it never does)."""
    proc = spawn(cohortflow_command(subcommand), env=child_env(settings), log_path=log_path)
    try:
        healthy = http_ok(f"{url}/healthz")
        deadline = time.monotonic() + 60
        while not healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{subcommand} did not start:\n{tail(log_path)}")
            time.sleep(0.1)
        yield
    finally:
        stop(proc)


async def prepared(root: Path, **overrides: Any) -> Settings:
    """A trained churn model and a migrated app database under ``root``, and the settings of
    a dev server on free ports there (not started), with ``overrides``."""
    registry = ModelRegistry(root / "models")
    registry.register(
        train_churn(load_transactions(), TrainConfig(bootstrap_resamples=0)),
        promoted_by="bench",
    )
    # BENCH_DATABASE_URL runs the app database elsewhere (e.g. PostgreSQL).
    url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{root / 'app.db'}"
    await migrate(url)
    return Settings(
        data_dir=root,
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
        database_url=url,
        models_dir=registry.root,
        log_level="WARNING",
        **overrides,
    )


@contextlib.asynccontextmanager
async def embedded(root: Path, **overrides: Any) -> AsyncIterator[Settings]:
    """:func:`prepared`'s settings with their dev server running, for as long as the block
    runs."""
    settings = await prepared(root, **overrides)
    server = DevServer(settings)
    await server.start()
    try:
        yield settings
    finally:
        server.stop()


async def main(n: int, workers: int) -> dict[str, object]:
    """Run both workloads and return the figures."""
    suffix = uuid.uuid4().hex[:6]
    queues = {"task_queue": f"bench-{suffix}", "crm_task_queue": f"bench-crm-{suffix}"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with embedded(root, crm_rate_limit=10_000, **queues) as settings:
            client = await connect(settings, tracing=False)
            with sandbox_crm(root) as crm_url:
                bare_rate = await _bare(client, n, f"bare-{suffix}")
                with_crm = settings.model_copy(update={"crm_url": crm_url})
                campaign_rate, events = await run_campaigns(client, with_crm, n, workers)
    return {
        "bench": "campaign_throughput",
        "ratio": round(campaign_rate / bare_rate, 3),
        "target": TARGET,
        "campaigns": n,
        "campaigns_per_s": round(campaign_rate, 2),
        "bare_workflows_per_s": round(bare_rate, 2),
        "campaign_history_events": events,
        "worker_processes": workers,
        "note": "includes each campaign's 1 s durable timer",
    }


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=200, help="workflows of each kind")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="campaign worker processes (`cohortflow worker`, as `cohortflow up` starts one)",
    )
    args = parser.parse_args()
    figures = asyncio.run(main(args.campaigns, args.workers))
    print(f"bare one-activity workflows: {figures['bare_workflows_per_s']}/s")
    print(f"campaigns:                   {figures['campaigns_per_s']}/s")
    print(json.dumps(figures))
