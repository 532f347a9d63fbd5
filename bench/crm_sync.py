"""CRM writes through the campaign's own write path, from several processes, at the CRM's rate
ceiling: records per second against that ceiling, the share of requests answered 429, and,
counted in the sandbox's store against the keys issued, writes lost and effects duplicated.

Each process runs the real ``crm_write`` activity (consent gate, frequency cap, ledger,
batcher, shared ceiling, connector) for its share of the customers, many at once, as a CRM
worker does. By default the CRM is the sandbox in HubSpot mode in its own process, at 100
requests per 10 s with batches of 100 (a ceiling of 1,000 records a second); ``--crm-kind``,
``--crm-url`` and ``--crm-token`` point it at any HubSpot-compatible endpoint instead (lost
and duplicated writes are then not counted: only the sandbox's store can say).

    python -m bench.crm_sync [--records 20000] [--processes 2] [--database-url URL]

Ends with one JSON line: bench, ratio, target, records_per_s, rate_limited_share, lost,
duplicates and the other figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from activities.campaign.crm import CrmActivities
from bench.campaign_throughput import sandbox_crm
from cohortflow.observability import configure_logging
from cohortflow.settings import Settings
from cohortflow.storage import consent, customers
from cohortflow.storage.db import Database, migrate
from tests.harness import crm_env
from workers.campaign_worker import crm_batcher
from workflows.campaign.activity_io import CrmOutcome, CrmWriteInput

TARGET = 0.9
TOKEN = "pat-bench"
POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
IN_FLIGHT = 2_000  # activities one process runs at once, as a CRM worker's slots allow


@dataclass(frozen=True)
class Crm:
    """Where the writes go and how much it takes."""

    kind: str
    url: str
    token: str
    limit: int
    window: float
    sandbox: bool


def write_input(key: str, run: str) -> CrmWriteInput:
    """One campaign's label write for ``key``."""
    return CrmWriteInput(
        workflow_id=f"campaign:crmsync:{key}:1",
        step_id="label",
        campaign_id="crmsync",
        customer_key=key,
        action="set_properties",
        channel="email",
        purpose="marketing",
        properties={"bench_run": run},
    )


async def worker(args: argparse.Namespace, keys: list[str]) -> None:
    """One process: write its share of the keys, print what it did as one JSON line."""
    settings = Settings(
        crm_kind=args.crm_kind,
        crm_url=args.crm_url,
        crm_token=args.crm_token or None,
        crm_user_id="1",
        crm_sender_email="bench@example.com",
        crm_rate_limit=args.rate_limit,
        crm_rate_window_seconds=args.window,
        crm_batch_linger_ms=args.linger_ms,
        log_level="WARNING",
    )
    db = Database(args.database_url)
    batcher = crm_batcher(settings, db)
    activities = CrmActivities(db, batcher)
    gate = asyncio.Semaphore(IN_FLIGHT)
    env = crm_env()

    async def one(key: str) -> bool:
        async with gate:
            result = await env.run(activities.crm_write, write_input(key, args.run))
        return result.outcome == CrmOutcome.WRITTEN

    started = time.time()  # wall clock: the processes' spans are compared with each other
    try:
        written = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        ended = time.time()  # every write answered: each waits for its batch's result
    finally:
        await batcher.aclose()
        await db.dispose()
    stats = batcher.stats
    print(
        json.dumps(
            {
                "written": sum(1 for w in written if w is True),
                "failed": sum(1 for w in written if w is not True),
                "errors": sorted({repr(w)[:300] for w in written if w is not True})[:5],
                "requests": stats.requests,
                "records": stats.records,
                "rate_limited": stats.rate_limited,
                "started": started,
                "ended": ended,
            }
        )
    )


@contextlib.asynccontextmanager
async def database(url: str | None, root: Path) -> AsyncIterator[str]:
    """A migrated app database: ``url``, else a fresh PostgreSQL database if the local server
    answers (the write path's transactions are what it measures), else a SQLite file."""
    if url:
        await migrate(url)
        yield url
        return
    base = make_url(POSTGRES)
    name = f"bench_crm_{uuid.uuid4().hex[:10]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        sqlite = f"sqlite+aiosqlite:///{root / 'app.db'}"
        await migrate(sqlite)
        yield sqlite
        return
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    created = base.set(database=name).render_as_string(hide_password=False)
    try:
        await migrate(created)
        yield created
    finally:
        admin = await asyncpg.connect(dsn, timeout=5)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.contextmanager
def hubspot_sandbox(root: Path, limit: int, window: float) -> Iterator[Crm]:
    """The sandbox CRM in HubSpot mode, in its own process, at the given rate limit."""
    config = {
        "crm_sandbox_mode": "hubspot",
        "crm_sandbox_rate_limit": limit,
        "crm_sandbox_rate_window_seconds": window,
        "crm_token": TOKEN,
    }
    with sandbox_crm(root, **config) as url:
        yield Crm("hubspot", url, TOKEN, limit, window, sandbox=True)


async def seed(url: str, n: int) -> list[str]:
    """``n`` customers who consented to e-mail marketing."""
    keys = [f"c_{uuid.uuid4().hex[:24]}" for _ in range(n)]
    db = Database(url)
    try:
        async with db.transaction() as session:
            await customers.upsert_customers(
                session, [customers.CustomerRecord(k, f"src-{k}", None) for k in keys]
            )
            await consent.bulk_set_consent(
                session, [(k, "email", "marketing", True) for k in keys], source="bench"
            )
    finally:
        await db.dispose()
    return keys


def run_processes(
    args: argparse.Namespace, crm: Crm, url: str, keys_file: Path, run: str
) -> tuple[float, list[dict[str, Any]]]:
    """Start the writer processes together; the time from the first one's first write to
    the last one's last, and their reports. Starting Python and importing are not counted:
    they are no part of the write path, and they took a quarter of the wall time."""
    common = [
        "--database-url", url, "--keys", str(keys_file), "--run", run,
        "--processes", str(args.processes), "--crm-kind", crm.kind, "--crm-url", crm.url,
        "--crm-token", crm.token, "--rate-limit", str(crm.limit), "--window", str(crm.window),
        "--linger-ms", str(args.linger_ms),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.crm_sync", "--worker", "--shard", str(i), *common],
            stdout=subprocess.PIPE,
            env=env,
        )
        for i in range(args.processes)
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a writer process failed")
    reports = [json.loads(out.decode().strip().splitlines()[-1]) for out in outputs]
    return max(r["ended"] for r in reports) - min(r["started"] for r in reports), reports


def sandbox_counts(crm: Crm, keys: list[str], run: str) -> dict[str, int]:
    """Requests and 429s the sandbox answered; keys without the write (lost) and contacts
    written more than once (duplicate effects)."""
    stats = httpx.get(f"{crm.url}/_sandbox/stats", timeout=60).json()
    contacts = httpx.get(f"{crm.url}/_sandbox/contacts", timeout=120).json()["contacts"]
    by_key = {c["keys"].get("cohortflow_key", ""): c for c in contacts}
    lost = sum(1 for k in keys if by_key.get(k, {}).get("properties", {}).get("bench_run") != run)
    duplicates = sum(max(0, int(c["upserts"]) - 1) for c in contacts)
    return {
        "requests": int(stats["total"]),
        "rate_limited": int(stats["rate_limited"]),
        "lost": lost,
        "duplicates": duplicates,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Seed, write, count; the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with database(args.database_url, root) as url:
            keys = await seed(url, args.records)
            keys_file = root / "keys.json"
            keys_file.write_text(json.dumps(keys))
            run = uuid.uuid4().hex[:8]
            with contextlib.ExitStack() as stack:
                if args.crm_url:
                    crm = Crm(args.crm_kind, args.crm_url, args.crm_token, args.rate_limit,
                              args.window, sandbox=False)  # fmt: skip
                else:
                    crm = stack.enter_context(hubspot_sandbox(root, args.rate_limit, args.window))
                elapsed, reports = run_processes(args, crm, url, keys_file, run)
                counts = sandbox_counts(crm, keys, run) if crm.sandbox else None
    requests = counts["requests"] if counts else sum(r["requests"] for r in reports)
    limited = counts["rate_limited"] if counts else sum(r["rate_limited"] for r in reports)
    records_per_s = args.records / elapsed
    ceiling = crm.limit * 100 / crm.window
    # An idle client may send a whole window's requests at once: for this many records, the
    # best any client can do is one window fewer than it needs requests for.
    windows = math.ceil(math.ceil(args.records / 100) / crm.limit) - 1
    best = round(args.records / (windows * crm.window), 1) if windows else None
    return {
        "bench": "crm_sync",
        "ratio": round(records_per_s / ceiling, 3),
        "target": TARGET,
        "records_per_s": round(records_per_s, 1),
        "ceiling_records_per_s": ceiling,
        "best_possible_records_per_s": best,
        "rate_limited_share": round(limited / max(requests, 1), 4),
        "lost": counts["lost"] if counts else None,
        "duplicates": counts["duplicates"] if counts else None,
        "records": args.records,
        "written": sum(r["written"] for r in reports),
        "failed": sum(r["failed"] for r in reports),
        "errors": sorted({e for r in reports for e in r["errors"]})[:5],
        "requests": requests,
        "processes": args.processes,
        "seconds": round(elapsed, 2),
        "database": make_url(url).get_backend_name(),
        "crm_kind": crm.kind,
    }


def cli() -> None:
    """Parse arguments; run the bench, or one writer process of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--crm-kind", default="hubspot", choices=["hubspot", "sandbox"])
    parser.add_argument("--crm-url", default="")
    parser.add_argument("--crm-token", default="")
    parser.add_argument("--rate-limit", type=int, default=100, help="requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="the rate window, seconds")
    parser.add_argument("--linger-ms", type=int, default=200)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keys", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    if args.worker:
        keys = json.loads(Path(args.keys).read_text())[args.shard :: args.processes]
        asyncio.run(worker(args, keys))
        return
    figures = asyncio.run(main(args))
    print(
        f"crm_sync: {figures['records']} writes from {figures['processes']} processes in "
        f"{figures['seconds']} s: {figures['records_per_s']} records/s against a ceiling of "
        f"{figures['ceiling_records_per_s']:g} (best possible for this size "
        f"{figures['best_possible_records_per_s']}); 429 share {figures['rate_limited_share']}; "
        f"lost {figures['lost']}, duplicates {figures['duplicates']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    cli()
