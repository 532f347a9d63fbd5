"""What a campaign costs on the embedded dev server, against what its effects need.

Three workloads run in the same run on one dev server (SQLite, WAL), each with its workers in
processes of their own, as in every deployment ((a) and (b) in two halves, a b b a, so
neither meets only the fuller server):

- (a) **same effects**: a hand-written Temporal workflow with exactly the bench campaign's
  side effects and no engine logic (``bench/_same_effects.py``): scoring as a local
  activity, two ``crm_write`` activities, a 1 s timer;
- (b) **campaign**: the demo's shape without approval through cohortflow (score (XGBoost) ->
  branch -> consent-gated CRM label -> 1 s durable timer -> CRM enrolment), launched by the
  launcher and run by ``cohortflow worker`` processes (``--workers``) against the sandbox CRM
  over HTTP;
- (c) **bare**: a workflow that runs one activity, the least a durable write can cost.

Then the launch rate: launches through the launcher against bare ``start_workflow`` calls,
onto queues no worker polls (target 0.8).

For each: completions per second, starts per second, history events per workflow, server and
worker CPU per workflow, and the longest workflow task (started to completed) in sampled
histories; for (a) and (b) the latency from the start (the cohort entry) to the first CRM
write. ``BENCH_DATABASE_URL`` puts the app database elsewhere (PostgreSQL).

    python -m bench.campaign_throughput --campaigns 200 [--workers 1]

Ends with one JSON line: ``ratio_vs_same_effects`` is (b)/(a) completions per second (target
0.85), ``ratio`` (b)/(c), ``target`` the first's, and the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench._bare_workflow import BareWorkflow
from bench._costs import CONCURRENCY, Costs, measure
from bench._same_effects import SameEffectsInput, SameEffectsWorkflow
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
from cohortflow.temporal_client import connect
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES
from scoring.registry import ModelRegistry
from scoring.train import TrainConfig, train_churn
from workflows.campaign.contract import campaign_workflow_id

TARGET = 0.85  # (b)/(a): a campaign completes at least at 0.85 of its bare effects' rate
EVENTS_TARGET = 25  # history events of the bench campaign
LAUNCH_TARGET = 0.8  # launcher starts per second over bare start_workflow's


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
    costs = await campaign_costs(client, settings, n, workers, document)
    return costs.per_s, costs.history_events


async def campaign_costs(
    client: Client, settings: Settings, n: int, workers: int, document: dict[str, Any] = SPEC
) -> Costs:
    """(b): ``n`` campaigns of ``document`` through the launcher, run by ``workers``
    `cohortflow worker` processes, as deployments run them."""
    db = Database(settings.resolved_database_url)
    try:
        spec, version, keys = await seeded(db, document, n)
        launcher = Launcher(client, db, settings)
        by_id = {campaign_workflow_id(spec.campaign_id, k, "1"): k for k in keys}

        async def launch(workflow_id: str) -> None:
            await launcher.launch(spec, version, Entry(by_id[workflow_id], "bench"))

        worker = cohortflow_command("worker")
        return await measure(client, settings, list(by_id), launch, worker, workers, db)
    finally:
        await db.dispose()


async def launch_rates(client: Client, settings: Settings, n: int) -> tuple[float, float]:
    """Starts per second of ``n`` launches through the launcher and of ``n`` bare
    ``start_workflow`` calls, ``CONCURRENCY`` in flight, in halves a b b a, onto task queues
    no worker polls: what launching itself costs, without the workers' CPU beside it."""
    db = Database(settings.resolved_database_url)
    idle = settings.model_copy(update={"task_queue": f"idle-{uuid.uuid4().hex[:6]}"})
    try:
        spec, version, keys = await seeded(db, {**SPEC, "campaign_id": "bench_launch"}, n)
        launcher = Launcher(client, db, idle)

        async def ours(key: str) -> None:
            await launcher.launch(spec, version, Entry(key, "bench"))

        async def bare(key: str) -> None:
            await client.start_workflow(
                BareWorkflow.run, key, id=f"bare-launch-{key}", task_queue=idle.task_queue
            )

        half = n // 2
        seconds = {"ours": 0.0, "bare": 0.0}
        for name, start, chunk in (
            ("bare", bare, keys[:half]),
            ("ours", ours, keys[:half]),
            ("ours", ours, keys[half:]),
            ("bare", bare, keys[half:]),
        ):
            seconds[name] += await _timed_starts(start, chunk)
        return n / seconds["ours"], n / seconds["bare"]
    finally:
        await db.dispose()


async def _timed_starts(start: Callable[[str], Awaitable[None]], keys: list[str]) -> float:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str) -> None:
        async with gate:
            await start(key)

    began = time.perf_counter()
    await asyncio.gather(*(one(k) for k in keys))
    return time.perf_counter() - began


async def same_effects_costs(client: Client, settings: Settings, n: int, workers: int) -> Costs:
    """(a): ``n`` hand-written workflows with the campaign's effects on their own workers."""
    db = Database(settings.resolved_database_url)
    try:
        document = {**SPEC, "campaign_id": "bench_same"}
        _, _, keys = await seeded(db, document, n)
        by_id = {f"same:{k}": k for k in keys}

        async def start(workflow_id: str) -> None:
            inp = SameEffectsInput(
                "bench_same", by_id[workflow_id], "bench", settings.crm_task_queue
            )
            await client.start_workflow(
                SameEffectsWorkflow.run, inp, id=workflow_id, task_queue=settings.task_queue
            )

        return await measure(
            client, settings, list(by_id), start, _baseline("same-effects"), workers, db
        )
    finally:
        await db.dispose()


async def bare_costs(client: Client, settings: Settings, n: int) -> Costs:
    """(c): ``n`` bare one-activity workflows on a worker process of their own."""

    async def start(workflow_id: str) -> None:
        await client.start_workflow(
            BareWorkflow.run, workflow_id, id=workflow_id, task_queue=settings.task_queue
        )

    ids = [f"bare-{settings.task_queue}-{i}" for i in range(n)]
    return await measure(client, settings, ids, start, _baseline("bare"), 1)


def _baseline(kind: str) -> list[str]:
    return [sys.executable, "-m", "bench._baseline_workers", kind]


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
    """Run the three workloads on one dev server and return the figures."""
    suffix = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with embedded(root, crm_rate_limit=10_000) as settings:
            client = await connect(settings, tracing=False)
            with sandbox_crm(root) as crm_url:
                on = settings.model_copy(update={"crm_url": crm_url})

                def queues(name: str) -> Settings:
                    update = {
                        "task_queue": f"{name}-{suffix}",
                        "crm_task_queue": f"{name}-crm-{suffix}",
                    }
                    return on.model_copy(update=update)

                # Each of (a) and (b) runs twice, first and last, half the workflows each
                # time: a later run meets a fuller server.
                half, rest = n // 2, n - n // 2
                bare = await bare_costs(client, queues("bare"), n)
                same = await same_effects_costs(client, queues("same1"), half, workers)
                ours = await campaign_costs(client, queues("bench1"), half, workers)
                ours += await campaign_costs(client, queues("bench2"), rest, workers)
                same += await same_effects_costs(client, queues("same2"), rest, workers)
                launched, started = await launch_rates(client, queues("launch"), n)
    return {
        "bench": "campaign_throughput",
        "ratio_vs_same_effects": round(ours.per_s / same.per_s, 3),
        "ratio": round(ours.per_s / bare.per_s, 3),
        "target": TARGET,
        "target_for": "ratio_vs_same_effects",
        "campaign_history_events": ours.history_events,
        "same_effects_history_events": same.history_events,
        "history_events_target": EVENTS_TARGET,
        "launch_ratio": round(launched / started, 3),
        "launch_target": LAUNCH_TARGET,
        "launches_per_s": round(launched, 1),
        # Not bare_starts_per_s: bare.figures("bare") below writes that key (under load).
        "launch_bare_starts_per_s": round(started, 1),
        # Starts while the workers run the campaigns: their CPU shares the machine.
        "launch_ratio_under_load": round(ours.starts_per_s / bare.starts_per_s, 3),
        "worker_cpu_ratio": round(ours.worker_cpu_ms / same.worker_cpu_ms, 2),
        "campaigns": n,
        "worker_processes": workers,
        **ours.figures("campaign"),
        **same.figures("same_effects"),
        **bare.figures("bare"),
        "note": "campaign and same-effects include a 1 s durable timer each",
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
    for name in ("bare", "same_effects", "campaign"):
        print(
            f"{name:>13}: {figures[f'{name}_per_s']}/s, {figures[f'{name}_history_events']} events"
        )
    print(json.dumps(figures))
