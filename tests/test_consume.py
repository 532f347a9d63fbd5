"""Events from NATS JetStream into the store: at least once, acknowledged after the commit,
idempotent by message id, refused events to the dead-letter stream; a consumer killed
mid-batch and restarted loses nothing and applies nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import func, select

from cohortflow.events.ingest import Ingestor
from cohortflow.events.nats_source import JetStreamSource
from cohortflow.events.stream import StreamConsumer
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage import campaigns
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CustomerFeatures, Event, SignalOutbox
from tests.harness import migrated
from tests.test_events import KEY, PSEUDONYMISER, track

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def stream_settings(nats_url: str, tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings naming a stream, consumer and dead-letter subject of this test only; the
    streams are deleted afterwards."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        data_dir=tmp_path / "data",
        pseudonymisation_key=KEY,
        nats_url=nats_url,
        events_stream=f"TEST_EVENTS_{tag}",
        events_subject=f"test.{tag}.events",
        events_consumer=f"test-{tag}",
        dead_letter_subject=f"test.{tag}.dead",
        consume_ack_wait_seconds=2.0,
        temporal_address=f"127.0.0.1:{free_port()}",  # nobody: signals stay owed
    )
    # The consumer makes its streams when absent; sources may publish from then on.
    await (await JetStreamSource.connect(settings)).close()
    yield settings
    client = await nats.connect(nats_url)
    js = client.jetstream()
    for name in (settings.events_stream, f"{settings.events_stream}_DEAD"):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    await client.close()


async def publish(settings: Settings, *messages: bytes) -> None:
    """Publish to the events subject, each stored by the stream before the next."""
    client = await nats.connect(settings.nats_url)
    js = client.jetstream()
    for message in messages:
        await js.publish(settings.events_subject, message)
    await client.close()


async def count(db: Database, table: Any) -> int:
    """Rows in ``table``."""
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """Every dead letter so far."""
    client = await nats.connect(settings.nats_url)
    js = client.jetstream()
    subscription = await js.pull_subscribe(
        settings.dead_letter_subject, stream=f"{settings.events_stream}_DEAD"
    )
    try:
        messages = await subscription.fetch(100, timeout=2)
    except nats.errors.TimeoutError:
        messages = []
    await client.close()
    return [json.loads(m.data) for m in messages]


async def test_events_are_stored_acknowledged_and_refusals_dead_lettered(
    db: Database, stream_settings: Settings
) -> None:
    good = [json.dumps(track(f"g{i}", f"user-{i % 2}")).encode() for i in range(5)]
    no_amount = {**track("bad", "user-0"), "properties": {}}
    batch = json.dumps({"batch": [track("b1", "user-1", "visit"), no_amount]}).encode()
    await publish(stream_settings, *good, batch, b"{not json")
    source = await JetStreamSource.connect(stream_settings)
    consumer = StreamConsumer(source, Ingestor(db, PSEUDONYMISER), batch=3)
    try:
        while await consumer.run_once(wait=1.0):
            pass
        lag = await source.lag()
        assert (lag.pending, lag.unacknowledged, lag.dead_letters) == (0, 0, 2)
        assert await count(db, Event) == 6
        dead = await dead_letters(stream_settings)
        assert dead[0]["event"]["messageId"] == "bad"
        assert dead[0]["errors"][0]["loc"] == ["properties", "amount"]
        assert dead[1]["data"] == "{not json" and dead[1]["errors"][0]["type"] == "json_invalid"
        # The same events again (a producer's retry): acknowledged, nothing stored twice.
        await publish(stream_settings, *good)
        assert await consumer.run_once(wait=2.0) == 3
        assert await consumer.run_once(wait=2.0) == 2
        assert await count(db, Event) == 6
        assert consumer.stats.duplicates == 5
    finally:
        await source.close()


def consumer_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points ``cohortflow consume`` at the test's stream."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "COHORTFLOW_NATS_URL": settings.nats_url,
        "COHORTFLOW_EVENTS_STREAM": settings.events_stream,
        "COHORTFLOW_EVENTS_SUBJECT": settings.events_subject,
        "COHORTFLOW_EVENTS_CONSUMER": settings.events_consumer,
        "COHORTFLOW_DEAD_LETTER_SUBJECT": settings.dead_letter_subject,
        "COHORTFLOW_CONSUME_ACK_WAIT_SECONDS": "2",
        **extra,
    }


def start_consumer(
    settings: Settings, database_url: str, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """``cohortflow consume`` as its own process, configured by environment."""
    env = consumer_env(
        settings,
        COHORTFLOW_DATABASE_URL=database_url,
        COHORTFLOW_DATA_DIR=str(settings.data_dir),
        COHORTFLOW_PSEUDONYMISATION_KEY=KEY,
        COHORTFLOW_TEMPORAL_ADDRESS=settings.temporal_address or "",
        **extra,
    )
    command = [sys.executable, "-m", "cohortflow", "consume", "--batch", "200"]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_a_consumer_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    stream_settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    db = await migrated(url)
    customers, each = 20, 100
    # Every customer entered a campaign, so each of their events owes a signal.
    keys = [PSEUDONYMISER.customer_key(f"cust-{c}") for c in range(customers)]
    async with db.transaction() as session:
        await campaigns.record_entries(
            session, [campaigns.EntryRecord(f"campaign:c:{k}:1", "c", k, "1", "c", 1) for k in keys]
        )
    await publish(
        stream_settings,
        *(
            json.dumps(track(f"k{c}-{i}", f"cust-{c}", amount=1.0)).encode()
            for c in range(customers)
            for i in range(each)
        ),
    )
    log = tmp_path / "consume.log"
    first = start_consumer(stream_settings, url, log)
    try:
        for _ in range(1200):  # until some, not all, are stored
            if await count(db, Event) >= 300:
                break
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        stored_at_kill = await count(db, Event)
        assert 0 < stored_at_kill < customers * each, log.read_text()[-2000:]
        port = free_port()
        second = start_consumer(
            stream_settings, url, log, COHORTFLOW_CONSUME_METRICS_PORT=str(port)
        )
        try:
            for _ in range(1200):
                if await count(db, Event) == customers * each:
                    break
                await asyncio.sleep(0.1)
            # Its metrics: caught up, and it stored exactly what the killed one had not.
            gauges = await scrape_until(port, "cohortflow_consumer_pending", 0.0)
            assert gauges["cohortflow_consumer_accepted"] == customers * each - stored_at_kill
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log.read_text()[-2000:]
        assert await count(db, Event) == customers * each, log.read_text()[-2000:]
        # Each purchase counted once in the features, each signal owed once.
        async with db.transaction() as session:
            features = [f for (f,) in await session.execute(select(CustomerFeatures.features))]
        assert len(features) == customers
        assert {f["count:purchase"] for f in features} == {each}
        assert {f["monetary_total"] for f in features} == {float(each)}
        assert await count(db, SignalOutbox) == customers * each
        source = await JetStreamSource.connect(stream_settings)
        try:
            lag = await source.lag()
        finally:
            await source.close()
        assert (lag.pending, lag.unacknowledged) == (0, 0)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cohortflow", "consume", "--status"],
            env=consumer_env(stream_settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(done.stdout) == {"pending": 0, "unacknowledged": 0, "dead_letters": 0}
    finally:
        first.kill()
        await db.dispose()


async def scrape_until(port: int, name: str, value: float) -> dict[str, float]:
    """The consumer's gauges once ``name`` reads ``value`` (it reports every 5 s)."""
    gauges: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(60):
            with contextlib.suppress(httpx.HTTPError):
                text = (await http.get("/metrics")).text
                gauges = {
                    line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("cohortflow_consumer_")
                }
                if gauges.get(name) == value and "cohortflow_consumer_accepted" in gauges:
                    return gauges
            await asyncio.sleep(0.5)
    raise AssertionError(f"{name} never read {value}: {gauges}")
