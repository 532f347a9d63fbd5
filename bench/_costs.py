"""What a workload of workflows costs on one dev server: rates, history events, CPU of the
server and of the worker processes, the longest workflow tasks, and the latency from each
start to its first CRM write. A helper of ``bench/campaign_throughput.py``, not a bench."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from cohortflow.runtime.process import spawn, stop
from cohortflow.runtime.supervisor import child_env
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow
from cohortflow.temporal_client import wait_for_pollers
from workflows.campaign.contract import AuditKind

CONCURRENCY = 32  # starts in flight, and result long polls (the dev server allows so many)
SAMPLED_HISTORIES = 100


@dataclass
class Costs:
    """One workload's figures; CPU in seconds over all its workflows."""

    workflows: int
    seconds: float  # from the first start to the last end
    start_seconds: float  # from the first start to the last
    history_events: int
    server_cpu_s: float
    worker_cpu_s: float
    task_seconds: list[float]  # every workflow task's, started to completed, sampled
    first_write_ms: list[float]  # from each start to its first CRM write (none if no CRM)

    @property
    def per_s(self) -> float:
        """Workflows completed per second."""
        return self.workflows / self.seconds

    @property
    def starts_per_s(self) -> float:
        """Workflows started per second."""
        return self.workflows / self.start_seconds

    def __add__(self, other: Costs) -> Costs:
        """Two runs of the same workload as one (the order of a run in the server's life
        weighs on its rate, so the bench runs each twice, first and last)."""
        return Costs(
            self.workflows + other.workflows,
            self.seconds + other.seconds,
            self.start_seconds + other.start_seconds,
            max(self.history_events, other.history_events),
            self.server_cpu_s + other.server_cpu_s,
            self.worker_cpu_s + other.worker_cpu_s,
            self.task_seconds + other.task_seconds,
            self.first_write_ms + other.first_write_ms,
        )

    def figures(self, prefix: str) -> dict[str, Any]:
        """The figures under ``prefix``, rounded for the JSON line."""
        out: dict[str, Any] = {
            f"{prefix}_per_s": round(self.per_s, 2),
            f"{prefix}_starts_per_s": round(self.starts_per_s, 1),
            f"{prefix}_history_events": self.history_events,
            f"{prefix}_server_cpu_ms": round(self.server_cpu_ms, 1),
            f"{prefix}_worker_cpu_ms": round(self.worker_cpu_ms, 1),
            f"{prefix}_slowest_task_s": round(max(self.task_seconds), 3),
            f"{prefix}_tasks_over_1s": sum(1 for t in self.task_seconds if t > 1.0),
        }
        if self.first_write_ms:
            out[f"{prefix}_first_write_p50_ms"] = round(statistics.median(self.first_write_ms))
            out[f"{prefix}_first_write_p99_ms"] = round(percentile(self.first_write_ms, 0.99))
        return out

    @property
    def server_cpu_ms(self) -> float:
        """Server CPU per workflow, milliseconds."""
        return self.server_cpu_s * 1000 / self.workflows

    @property
    def worker_cpu_ms(self) -> float:
        """Worker CPU per workflow, milliseconds."""
        return self.worker_cpu_s * 1000 / self.workflows


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(settings: Settings) -> int:
    """The embedded dev server's process, found by its command line."""
    port = str(settings.temporal_port).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in args and port in args:
            return int(entry.name)
    raise RuntimeError(f"no dev server on port {settings.temporal_port}")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def measure(
    client: Client,
    settings: Settings,
    ids: Sequence[str],
    start: Callable[[str], Awaitable[object]],
    worker: list[str],
    workers: int,
    db: Database | None = None,
) -> Costs:
    """Start ``ids`` with ``start`` (``CONCURRENCY`` at a time) on ``workers`` processes
    running ``worker``, wait for every result, and measure. ``db``: where the first CRM
    writes are on record (their ``crm_written`` audit rows)."""
    env = child_env(settings)
    processes = [
        spawn(worker, env=env, log_path=settings.data_dir / f"{settings.task_queue}-{i}.log")
        for i in range(workers)
    ]
    try:
        await wait_for_pollers(client, settings.task_queue, workers, limit_seconds=120)
        server = server_pid(settings)
        cpu_before = [cpu_seconds(p.pid) for p in processes], cpu_seconds(server)
        gate = asyncio.Semaphore(CONCURRENCY)
        entered: dict[str, float] = {}

        async def begin(workflow_id: str) -> None:
            async with gate:
                entered[workflow_id] = time.time()
                await start(workflow_id)

        async def end(workflow_id: str) -> None:
            async with gate:
                await client.get_workflow_handle(workflow_id).result()

        began = time.perf_counter()
        await asyncio.gather(*(begin(i) for i in ids))
        started = time.perf_counter() - began
        await asyncio.gather(*(end(i) for i in ids))
        elapsed = time.perf_counter() - began
        worker_cpu = sum(cpu_seconds(p.pid) for p in processes) - sum(cpu_before[0])
        server_cpu = cpu_seconds(server) - cpu_before[1]
    finally:
        for process in processes:
            stop(process)
    n = len(ids)
    tasks = await _task_seconds(client, ids[:: max(1, n // SAMPLED_HISTORIES)])
    events = len([e async for e in client.get_workflow_handle(ids[0]).fetch_history_events()])
    waits: list[float] = []
    if db is not None:
        written = await _first_writes(db, ids)
        waits = [(written[i] - entered[i]) * 1000 for i in ids if i in written]
    return Costs(n, elapsed, started, events, server_cpu, worker_cpu, tasks, waits)


async def _task_seconds(client: Client, ids: Sequence[str]) -> list[float]:
    """Every workflow task's time from started to completed in these histories."""
    seconds: list[float] = []
    for workflow_id in ids:
        began: datetime | None = None
        async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
            at = event.event_time.ToDatetime()
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                began = at
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and began:
                seconds.append((at - began).total_seconds())
    return seconds


async def _first_writes(db: Database, ids: Sequence[str]) -> dict[str, float]:
    """Each workflow's first ``crm_written`` row's time (epoch seconds)."""
    first: dict[str, float] = {}
    async with db.transaction() as session:
        rows = await session.execute(
            select(AuditRow.workflow_id, AuditRow.created_at).where(
                AuditRow.kind == AuditKind.CRM_WRITTEN, AuditRow.workflow_id.in_(list(ids))
            )
        )
        for workflow_id, created_at in rows:
            at = datetime.fromisoformat(created_at).timestamp()
            first[workflow_id] = min(at, first.get(workflow_id, at))
    return first
