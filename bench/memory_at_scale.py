"""Memory at scale: N campaigns waiting at once, and how long a restarted worker takes to
resume them all (issue 16, parts 5 and 8).

Real parts: the embedded dev server, one `cohortflow worker` process, the sandbox CRM in its
own process. N campaigns are launched through the launcher: half wait for an approval
(score, branch, approval), half on a six-hour timer (the demo-shaped campaign: score, branch,
CRM label, then the wait). Once visibility shows all N resting (``awaiting_approval`` or
``waiting``), the worker's and the dev server's RSS are read (peak while launching, and
settled). Then the worker is SIGKILLed and a new one started, with each ``--cache`` in turn
(``max_cached_workflows``, the ``COHORTFLOW_WORKER_MAX_CACHED_WORKFLOWS`` setting).

"Resumed" means: every one of the N campaigns has answered its ``status`` query, sent at
most 32 at a time from the moment the new worker process is spawned (its start-up
included). A query on a worker that does not hold the campaign replays its whole history
first, so this is the time to rebuild every campaign's state on a cold worker. Then 2,000 of
them (a seeded sample, fewer for a smaller N) are queried again ("requery"): answered from
the cache for the campaigns it kept, replayed again for those it had to evict, which is what
a cache smaller than N costs whenever their timers fire or signals come.

    python -m bench.memory_at_scale --campaigns 10000 [--cache 1000 4000]

Ends with one JSON line: ``ratio`` is 1500 MB (the issue's target) over the worker's peak RSS
with the first ``--cache`` (launching, and after its restart; at least 1 meets it), ``target``
1.0, and the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError

from bench._costs import CONCURRENCY, server_pid
from bench.bulk_decisions import DOCUMENT as APPROVAL_DOCUMENT
from bench.campaign_throughput import SPEC, embedded, sandbox_crm, seeded
from bench.load import Memory, Stack, launch
from cohortflow.campaigns.visibility import CampaignHandle, one_of, running
from cohortflow.observability import configure_logging
from cohortflow.runtime.process import spawn, stop
from cohortflow.runtime.supervisor import child_env, cohortflow_command
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect, wait_for_pollers
from workflows.campaign.contract import SA, CampaignState, campaign_workflow_id
from workflows.campaign.workflow import CampaignWorkflow

TARGET_MB = 1500.0  # the ceiling for the worker's RSS with 10,000 campaigns waiting
SETTLE_SECONDS = 10.0  # from the last campaign at rest (or answering) to "settled" RSS
REQUERY_SAMPLE = 2_000
RESTING = (CampaignState.AWAITING_APPROVAL, CampaignState.WAITING)

APPROVAL: dict[str, Any] = {**APPROVAL_DOCUMENT, "campaign_id": "mem_approval"}
TIMER: dict[str, Any] = {
    **SPEC,
    "campaign_id": "mem_timer",
    "steps": [{**s, "duration": "PT6H"} if s["type"] == "wait" else s for s in SPEC["steps"]],
}


@dataclass
class Resume:
    """One restart: how long until every campaign answered, and the new worker's RSS."""

    cache: int
    resume_s: float  # from spawning the worker to the last of N answers
    first_answer_s: float  # from spawning the worker to the first answer
    requeried: int  # a sample of the campaigns (REQUERY_SAMPLE at most) queried again
    requery_s: float  # how long those took, once all had answered
    retries: dict[str, int]  # queries that failed and were sent again, by error
    not_resting: int  # answers in a state other than awaiting_approval or waiting
    rss_peak_mb: float
    rss_settled_mb: float


def worker_process(settings: Settings, cache: int, name: str) -> subprocess.Popen[bytes]:
    """A `cohortflow worker` on ``settings`` keeping at most ``cache`` workflows."""
    env = child_env(settings.model_copy(update={"worker_max_cached_workflows": cache}))
    return spawn(cohortflow_command("worker"), env=env, log_path=settings.data_dir / f"{name}.log")


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash or an OOM kill ends a worker: nothing is handed over."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.asynccontextmanager
async def sampled(memory: Memory, every: float = 1.0) -> AsyncIterator[None]:
    """Read RSS every ``every`` seconds while the block runs, so ``peak`` holds its peak."""

    async def sample() -> None:
        while True:
            memory.mark("peak-sample")
            await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        memory.mark("peak-sample")


async def resting(client: Client) -> int:
    """Campaigns of both specs that visibility shows at rest (approval or timer)."""
    campaigns = one_of(SA.CAMPAIGN_ID, [APPROVAL["campaign_id"], TIMER["campaign_id"]])
    query = running(campaigns, one_of(SA.CAMPAIGN_STATE, RESTING))
    return (await client.count_workflows(query)).count


async def all_resting(client: Client, n: int, limit: float) -> float:
    """Wait until all ``n`` campaigns rest, reporting progress; seconds it took."""
    began = time.monotonic()
    reported = 0.0
    while (count := await resting(client)) < n:
        elapsed = time.monotonic() - began
        if elapsed > limit:
            raise RuntimeError(f"only {count} of {n} campaigns at rest after {limit:g} s")
        if elapsed - reported >= 15:
            print(f"  {count} of {n} at rest after {elapsed:.0f} s", file=sys.stderr, flush=True)
            reported = elapsed
        await asyncio.sleep(2)
    return time.monotonic() - began


async def launch_waiting(client: Client, settings: Settings, db: Database, n: int) -> list[str]:
    """Seed and launch ``n`` campaigns, half of each spec, both halves at once; their ids."""
    stack = Stack(settings, db, client, api_url="", processes={})
    halves = [(APPROVAL, n // 2), (TIMER, n - n // 2)]
    ids: list[str] = []
    launches = []
    for document, count in halves:
        spec, version, keys = await seeded(db, document, count)
        ids += [campaign_workflow_id(spec.campaign_id, k, "1") for k in keys]
        launches.append(launch(stack, spec, version, keys))
    await asyncio.gather(*launches)
    return ids


async def query_all(
    client: Client, ids: Sequence[str], began: float
) -> tuple[float, dict[str, int], int]:
    """Every campaign's ``status``, ``CONCURRENCY`` at a time, each sent again until it is
    answered; seconds from ``began`` to the first answer, failed sends by error, answers not
    at rest."""
    gate = asyncio.Semaphore(CONCURRENCY)
    states: Counter[str] = Counter()
    first: list[float] = []
    retries: Counter[str] = Counter()

    async def one(workflow_id: str) -> None:
        handle: CampaignHandle = client.get_workflow_handle_for(CampaignWorkflow.run, workflow_id)
        async with gate:
            while True:
                try:
                    status = await handle.query(
                        CampaignWorkflow.status, rpc_timeout=timedelta(seconds=60)
                    )
                    break
                except (RPCError, WorkflowQueryFailedError) as exc:
                    status_name = f" {exc.status.name}" if isinstance(exc, RPCError) else ""
                    retries[type(exc).__name__ + status_name] += 1
                    await asyncio.sleep(0.5)
        first.append(time.perf_counter() - began)
        states[status.state] += 1

    await asyncio.gather(*(one(i) for i in ids))
    not_resting = sum(count for state, count in states.items() if state not in RESTING)
    return min(first), dict(retries), not_resting


async def resume(
    client: Client, ids: Sequence[str], worker: subprocess.Popen[bytes], cache: int, began: float
) -> Resume:
    """``worker``, spawned at ``began`` keeping ``cache`` workflows, timed until all of
    ``ids`` answered, then a sample of them queried again; the figures."""
    memory = Memory({"worker": worker.pid})
    async with sampled(memory):
        first, retries, not_resting = await query_all(client, ids, began)
        resumed = time.perf_counter() - began
        again = time.perf_counter()
        sample = random.Random(0).sample(list(ids), min(len(ids), REQUERY_SAMPLE))
        await query_all(client, sample, again)
        requery = time.perf_counter() - again
    await asyncio.sleep(SETTLE_SECONDS)
    memory.mark("settled")
    marks = memory.marks["worker"]
    return Resume(
        cache=cache,
        resume_s=round(resumed, 1),
        first_answer_s=round(first, 1),
        requeried=len(sample),
        requery_s=round(requery, 1),
        retries=retries,
        not_resting=not_resting,
        rss_peak_mb=marks["peak"],
        rss_settled_mb=marks["settled"],
    )


async def at_rest(
    client: Client, settings: Settings, n: int, cache: int
) -> tuple[subprocess.Popen[bytes], list[str], dict[str, Any]]:
    """Start a worker keeping ``cache`` workflows, launch ``n`` campaigns and wait until
    they all rest; the worker, the campaigns' ids, and RSS while launching and settled."""
    db = Database(settings.resolved_database_url)
    worker = worker_process(settings, cache, "worker-launch")
    try:
        await wait_for_pollers(client, settings.task_queue, 1, limit_seconds=120)
        memory = Memory({"worker": worker.pid, "server": server_pid(settings)})
        memory.mark("start")
        began = time.monotonic()
        async with sampled(memory):
            ids = await launch_waiting(client, settings, db, n)
            launched = time.monotonic() - began
            await all_resting(client, n, limit=300 + 0.15 * n)
        at_rest_s = time.monotonic() - began
        await asyncio.sleep(SETTLE_SECONDS)
        memory.mark("settled")
    except BaseException:
        stop(worker)
        raise
    finally:
        await db.dispose()
    figures = {
        "launch_s": round(launched, 1),
        "all_at_rest_s": round(at_rest_s, 1),
        "rss_mb": {
            name: {k: v for k, v in marks.items() if k != "peak-sample"}
            for name, marks in memory.marks.items()
        },
    }
    return worker, ids, figures


async def main(n: int, caches: Sequence[int]) -> dict[str, Any]:
    """Launch ``n`` waiting campaigns with the first cache size, then restart the worker with
    each in turn; the figures."""
    suffix = uuid.uuid4().hex[:6]
    queues = {"task_queue": f"mem-{suffix}", "crm_task_queue": f"mem-crm-{suffix}"}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with embedded(root, crm_rate_limit=1_000_000, **queues) as base:
            client = await connect(base, tracing=False)
            with sandbox_crm(root) as crm_url:
                settings = base.model_copy(update={"crm_url": crm_url})
                worker, ids, rested = await at_rest(client, settings, n, caches[0])
                resumed: list[Resume] = []
                try:
                    for cache in caches:
                        kill(worker)
                        began = time.perf_counter()
                        worker = worker_process(settings, cache, f"worker-cache-{cache}")
                        figures = await resume(client, ids, worker, cache, began)
                        resumed.append(figures)
                        print(f"  {figures}", file=sys.stderr, flush=True)
                finally:
                    stop(worker)
    return summary(n, rested, resumed, load_before)


def summary(
    n: int, rested: dict[str, Any], resumed: list[Resume], load_before: tuple[float, ...]
) -> dict[str, Any]:
    """The JSON line: the first cache size's figures on top, every one's under ``by_cache``."""
    head = resumed[0]
    rss = rested["rss_mb"]
    worker_mb = max(rss["worker"]["peak"], head.rss_peak_mb)
    return {
        "bench": "memory_at_scale",
        "ratio": round(TARGET_MB / worker_mb, 3),
        "target": 1.0,
        "target_mb": TARGET_MB,
        "campaigns": n,
        "cache": head.cache,
        "worker_rss_mb": worker_mb,
        "worker_rss_settled_mb": rss["worker"]["settled"],
        "server_rss_mb": rss["server"]["peak"],
        "server_rss_settled_mb": rss["server"]["settled"],
        "resume_s": head.resume_s,
        "resumed": "every campaign answered its status query, 32 in flight, from the"
        " new worker's spawn",
        **{k: v for k, v in rested.items() if k != "rss_mb"},
        "rss_mb": rss,
        "by_cache": [asdict(r) for r in resumed],
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
    }


def _report(figures: dict[str, Any]) -> str:
    rss = figures["rss_mb"]
    lines = [
        f"{figures['campaigns']} campaigns launched in {figures['launch_s']} s, all at rest "
        f"after {figures['all_at_rest_s']} s (cache {figures['cache']})",
        f"worker RSS (MB): {rss['worker']}",
        f"dev server RSS (MB): {rss['server']}",
        "after SIGKILL, a new worker per cache size (resumed = every campaign answered"
        " `status`, 32 in flight, from the spawn):",
    ]
    for r in figures["by_cache"]:
        lines.append(
            f"  cache {r['cache']:>6}: resumed in {r['resume_s']} s (first answer "
            f"{r['first_answer_s']} s, sent again: {r['retries']}, {r['not_resting']} not at "
            f"rest), {r['requeried']} queried again in {r['requery_s']} s; RSS peak "
            f"{r['rss_peak_mb']} MB, settled {r['rss_settled_mb']} MB"
        )
    lines.append(f"load average (1, 5, 15 min) before, after: {figures['load_average']}")
    return "\n".join(lines)


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=10_000, help="campaigns left waiting")
    parser.add_argument(
        "--cache",
        type=int,
        nargs="+",
        default=[Settings().worker_max_cached_workflows],
        help="max_cached_workflows of the worker, one restart each (the first also launches)",
    )
    args = parser.parse_args()
    result = asyncio.run(main(args.campaigns, args.cache))
    print(_report(result))
    print(json.dumps(result))
