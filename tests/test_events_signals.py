"""Contract (a): a stored event is signalled to every running campaign of its customer."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from cohortflow.events.ingest import Ingestor, TemporalSignaller
from cohortflow.settings import Settings
from cohortflow.storage.db import Database, migrate
from tests.test_events import PSEUDONYMISER, T0, track
from workflows.campaign.contract import SA

pytestmark = pytest.mark.devserver


async def _connect_refused() -> Client:
    raise RuntimeError("Failed client connect: connection refused")


async def test_new_events_are_signalled_to_running_campaigns_once(
    dev_client: Client, dev_settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    await migrate(url)
    db = Database(url)
    alice, bob = PSEUDONYMISER.customer_key("alice"), PSEUDONYMISER.customer_key("bob")
    queue = f"idle-{uuid.uuid4().hex[:8]}"  # nobody runs these: they stay Running
    handles = [
        await dev_client.start_workflow(
            "CampaignWorkflow",
            id=f"campaign:t{uuid.uuid4().hex[:6]}:{key}:1",
            task_queue=queue,
            search_attributes=TypedSearchAttributes([SearchAttributePair(SA.CUSTOMER_KEY, key)]),
        )
        for key in (alice, alice, bob)
    ]
    for _ in range(100):
        query = f'CustomerKey = "{alice}" AND ExecutionStatus = "Running"'
        if (await dev_client.count_workflows(query)).count == 2:
            break
        await asyncio.sleep(0.1)
    try:
        ingestor = Ingestor(
            db, PSEUDONYMISER, TemporalSignaller(lambda: asyncio.sleep(0, dev_client))
        )
        batch = [track("p1", "alice", amount=12.0, sku="x"), track("v1", "carol", "page_view")]
        outcome = await ingestor.ingest(batch)
        assert (outcome.temporal, outcome.signalled) == ("ok", 2)
        again = await ingestor.ingest(batch)  # duplicates: nothing stored, nothing signalled
        assert (again.count("duplicate"), again.signalled, again.temporal) == (2, 0, "skipped")

        for handle, expected in zip(handles, (1, 1, 0), strict=True):
            signals = [
                e.workflow_execution_signaled_event_attributes
                async for e in handle.fetch_history_events()
                if e.HasField("workflow_execution_signaled_event_attributes")
            ]
            assert len(signals) == expected
            for signal in signals:
                assert signal.signal_name == "customer_event"
                payload = signal.input.payloads[0].data.decode()
                assert '"event":"purchase"' in payload.replace(" ", "")
                assert '"message_id":"p1"' in payload.replace(" ", "")
                assert T0.isoformat() in payload

        # Temporal down: the event is still stored and the outcome says so.
        down = Ingestor(db, PSEUDONYMISER, TemporalSignaller(_connect_refused))
        outcome = await down.ingest([track("p2", "alice", amount=1.0)])
        assert (outcome.count("accepted"), outcome.temporal) == (1, "unreachable")
    finally:
        for handle in handles:
            await handle.terminate("test over")
        await db.dispose()
