"""Event ingestion throughput: through the HTTP API (a separate `cohortflow api` process,
real sockets) and through `events import` (the same validation, storage and feature
updates, in process), each into a fresh database. Both must end with the same features.

    python -m bench.ingest                         # 20k synthetic events, SQLite
    python -m bench.ingest --events 200000 --database postgres

Campaign signalling is off (no Temporal runs here), so this is the storage path's speed.
Ends with one JSON line: bench, api_events_per_s, import_events_per_s, ratio (API over
import), peak_rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import select

from cohortflow.auth.tokens import TokenService
from cohortflow.events.importer import import_events
from cohortflow.events.ingest import Ingestor
from cohortflow.events.sources import read_jsonl
from cohortflow.events.synth import generate, write_jsonl
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.ports import free_port
from cohortflow.storage.db import Database, migrate
from cohortflow.storage.tables import CustomerFeatures

KEY = "bench-ingest-key-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# No issue names one: ours is that HTTP, tokens and the signal outbox cost at most half of
# importing the same events in process.
TARGET = 0.5


async def fresh_database(kind: str, workdir: Path, name: str) -> str:
    """A migrated empty database: a SQLite file, or a new PostgreSQL database."""
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{workdir / name}.db"
    else:
        database = f"bench_ingest_{name}_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    await migrate(url)
    return url


async def drop_databases(*urls: str) -> None:
    """Drop the PostgreSQL databases the bench made."""
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        for url in urls:
            name = url.rsplit("/", 1)[1]
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def features(url: str) -> dict[str, Any]:
    """Every stored feature vector, by customer key."""
    db = Database(url)
    try:
        async with db.transaction() as session:
            rows = await session.execute(
                select(CustomerFeatures.customer_key, CustomerFeatures.features)
            )
            return {key: value for key, value in rows}
    finally:
        await db.dispose()


async def via_api(url: str, path: Path, workdir: Path, batch: int, concurrency: int) -> float:
    """Post the JSONL file's events in batches to a `cohortflow api` process; seconds."""
    port = free_port()
    env = {
        **os.environ,
        "COHORTFLOW_DATABASE_URL": url,
        "COHORTFLOW_DATA_DIR": str(workdir),
        "COHORTFLOW_PSEUDONYMISATION_KEY": KEY,
        "COHORTFLOW_API_PORT": str(port),
        "COHORTFLOW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "COHORTFLOW_LOG_LEVEL": "WARNING",
        # One token posts everything: the bench measures ingestion, not the per-token limit.
        "COHORTFLOW_API_RATE_PER_SECOND": "1000000",
        "PYTHONPATH": str(REPO),
    }
    db = Database(url)
    try:
        token = (
            await TokenService(db).create(
                "bench-ingest", ["ingest"], lifetime=timedelta(hours=1), by="bench"
            )
        ).secret
    finally:
        await db.dispose()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cohortflow", "api", env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, timeout=120, headers=auth) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await client.get("/healthz")).is_success:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the API did not start")
                await asyncio.sleep(0.2)
            documents = [doc for _, doc in read_jsonl(path)]
            batches = [documents[i : i + batch] for i in range(0, len(documents), batch)]
            queue: asyncio.Queue[list[Any]] = asyncio.Queue()
            for item in batches:
                queue.put_nowait(item)

            async def sender() -> None:
                while not queue.empty():
                    body = queue.get_nowait()
                    response = await client.post("/v1/events", json={"batch": body})
                    response.raise_for_status()
                    if response.json()["accepted"] != len(body):
                        raise RuntimeError(f"events not accepted: {response.text[:300]}")

            started = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            return time.perf_counter() - started
    finally:
        server.terminate()
        await server.wait()


async def via_import(url: str, path: Path, batch: int) -> float:
    """Import the JSONL file in process, as `cohortflow events import` does; seconds."""
    db = Database(url)
    try:
        started = time.perf_counter()
        summary = await import_events(
            Ingestor(db, Pseudonymiser(KEY.encode())), read_jsonl(path), batch_size=batch
        )
        elapsed = time.perf_counter() - started
    finally:
        await db.dispose()
    if summary.rejected:
        raise RuntimeError(f"{summary.rejected} events rejected: {summary.problems[:3]}")
    return elapsed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    data = generate(args.customers or max(1, args.events // 10), args.events, args.seed)
    path = workdir / "events.jsonl"
    write_jsonl(data, str(path))
    api_url = await fresh_database(args.database, workdir, "api")
    import_url = await fresh_database(args.database, workdir, "import")
    try:
        api_s = await via_api(api_url, path, workdir, args.batch, args.concurrency)
        import_s = await via_import(import_url, path, args.batch)
        same = await features(api_url) == await features(import_url)
    finally:
        if args.database == "postgres":
            await drop_databases(api_url, import_url)
        shutil.rmtree(workdir, ignore_errors=True)
    if not same:
        raise SystemExit("the API and the import produced different features")
    api_rate, import_rate = data.events / api_s, data.events / import_s
    print(
        f"{data.events} events of {len(data.user_ids)} customers on {args.database}, "
        f"batches of {args.batch}\n"
        f"  HTTP API ({args.concurrency} concurrent clients): {api_s:.1f} s, "
        f"{api_rate:,.0f} events/s\n"
        f"  import (in process):                {import_s:.1f} s, {import_rate:,.0f} events/s\n"
        f"  same features both ways: {same}",
        file=sys.stderr,
    )
    return {
        "bench": "ingest",
        "api_events_per_s": round(api_rate, 1),
        "import_events_per_s": round(import_rate, 1),
        "ratio": round(api_rate / import_rate, 3),
        "target": TARGET,
        "events": data.events,
        "customers": len(data.user_ids),
        "batch": args.batch,
        "database": args.database,
        "same_features": same,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--customers", type=int, default=0, help="default: events / 10")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
