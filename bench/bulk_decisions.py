"""Bulk approval decisions vs bare Temporal updates, on the embedded dev server.

N campaigns wait for an approval; one bulk decision (the code path of `cohortflow approvals
decide` and `POST /v1/approvals/decisions`) approves them all, each through its campaign's
`decide` update with its checks and audit row. The baseline, measured in the same run: N
hand-written workflows (at most 2,000: a rate, which more of them would not change, and
launching 10,000 bare workflows as well would double a long run) each waiting for one update
with no validator, sent at the same concurrency. Ends with one JSON line; ratio = our
decisions per second / bare updates per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from bench.campaign_throughput import SPEC, embedded, run_campaigns, sandbox_crm
from cohortflow.auth.identity import Identity, Role
from cohortflow.campaigns.bulk import ApprovalFilter, decide_all, matching
from cohortflow.campaigns.controls import Controls
from cohortflow.observability import configure_logging
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Approval
from cohortflow.temporal_client import connect

TARGET = 0.5  # each decision also reads its row, checks the worker and validates in history
CONCURRENCY = 16
BASELINE_MAX = 2_000

DOCUMENT: dict[str, Any] = {
    **SPEC,
    "campaign_id": "bench_bulk",
    "sensitive": True,
    "steps": [
        SPEC["steps"][0],
        {
            "id": "route",
            "type": "branch",
            "rules": [{"all": [{"score": "churn", "op": ">=", "value": 0.0}], "next": "approve"}],
            "default": "done",
        },
        {"id": "approve", "type": "approval", "reason": "bench"},
        {"id": "done", "type": "exit"},
    ],
}


@workflow.defn(sandboxed=False)
class WaitsForOneUpdate:
    """The baseline: a workflow that waits for one update and ends."""

    def __init__(self) -> None:
        self._answered = False

    @workflow.run
    async def run(self) -> None:
        """Wait for the update."""
        await workflow.wait_condition(lambda: self._answered)

    @workflow.update
    def answer(self, reason: str) -> str:
        """Take the answer."""
        self._answered = True
        return reason


async def _bare_updates(client: Client, n: int, queue: str) -> float:
    async with Worker(client, task_queue=queue, workflows=[WaitsForOneUpdate]):
        handles = await asyncio.gather(
            *(
                client.start_workflow(WaitsForOneUpdate.run, id=f"{queue}-{i}", task_queue=queue)
                for i in range(n)
            )
        )
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(index: int) -> None:
            async with gate:
                await handles[index].execute_update(WaitsForOneUpdate.answer, "ok")

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


async def _pending(db: Database) -> int:
    """Approvals pending now; 0 while the database is too busy to say (SQLite locked by
    the launch's writes), which only means asking again."""
    try:
        async with db.transaction() as session:
            count = await session.scalar(
                select(func.count()).select_from(Approval).where(Approval.status == "pending")
            )
    except OperationalError:
        return 0
    return int(count or 0)


async def main(n: int) -> dict[str, object]:
    """Both workloads; their figures."""
    suffix = uuid.uuid4().hex[:6]
    queues = {"task_queue": f"bulk-{suffix}", "crm_task_queue": f"bulk-crm-{suffix}"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with embedded(root, **queues) as settings:
            client = await connect(settings, tracing=False)
            bare_rate = await _bare_updates(client, min(n, BASELINE_MAX), f"bare-{suffix}")
            db = Database(settings.resolved_database_url)
            with sandbox_crm(root) as crm_url:
                with_crm = settings.model_copy(update={"crm_url": crm_url})
                # Launch and let every campaign reach its approval; then decide them all
                # while one worker process runs them.
                waiting = asyncio.create_task(run_campaigns(client, with_crm, n, 1, DOCUMENT))
                while await _pending(db) < n:
                    if waiting.done():
                        waiting.result()
                    await asyncio.sleep(1)
                controls = Controls(db, with_crm, Pseudonymiser(b"k" * 32), client)
                who = Identity("bench-approver", frozenset({Role.APPROVER}), "local")
                rows = await matching(controls, who, ApprovalFilter(campaign_id="bench_bulk"))
                started = time.perf_counter()
                summary = await decide_all(
                    controls, who, rows, approve=True, reason="bench", concurrency=CONCURRENCY
                )
                bulk_seconds = time.perf_counter() - started
                await waiting
            await db.dispose()
    rate = summary.decided / bulk_seconds
    return {
        "bench": "bulk_decisions",
        "ratio": round(rate / bare_rate, 3),
        "target": TARGET,
        "requests": n,
        "decided": summary.decided,
        "refused": summary.refused,
        "already_decided": summary.already_decided,
        "bulk_seconds": round(bulk_seconds, 1),
        "decisions_per_s": round(rate, 1),
        "bare_updates_per_s": round(bare_rate, 1),
        "concurrency": CONCURRENCY,
    }


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000, help="approvals to decide")
    args = parser.parse_args()
    figures = asyncio.run(main(args.requests))
    print(f"bare updates:   {figures['bare_updates_per_s']}/s")
    print(f"bulk decisions: {figures['decisions_per_s']}/s in {figures['bulk_seconds']} s")
    print(json.dumps(figures))
