"""Contract (a): a stored event, or an operator's consent change, is signalled to every
running campaign of its customer through the outbox: owed in the transaction that records
it, delivered at once or by the relay, kept while Temporal is away and delivered, in the
order owed, once it is back."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from cohortflow.api.app import create_app
from cohortflow.campaigns import visibility
from cohortflow.campaigns.visibility import CampaignHandle
from cohortflow.events.ingest import Ingestor
from cohortflow.events.relay import SignalRelay
from cohortflow.events.signals import CampaignSignal, TemporalSignaller
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage import campaigns, customers
from cohortflow.storage.db import Database, migrate
from cohortflow.temporal_client import connect
from tests.harness import bearer, decoded, issue_token, migrated, serve_app
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
    handles = await idle_campaigns(dev_client, db, alice, alice, bob)
    try:
        relay = SignalRelay(db, TemporalSignaller(lambda: asyncio.sleep(0, dev_client)))
        ingestor = Ingestor(db, PSEUDONYMISER, relay)
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
                event = await decoded(dev_client, signal.input.payloads[0])
                assert (event["event"], event["message_id"]) == ("purchase", "p1")
                assert event["occurred_at"] == T0.isoformat()

        # Temporal down: the event is still stored, its signal owed, and the outcome says so.
        down = SignalRelay(db, TemporalSignaller(_connect_refused))
        outcome = await Ingestor(db, PSEUDONYMISER, down).ingest([track("p2", "alice", amount=1.0)])
        assert (outcome.count("accepted"), outcome.temporal) == (1, "unreachable")
        assert (await relay.backlog()).owed == 1
        # Due again after its back-off, it reaches both of alice's campaigns.
        await asyncio.sleep(1.1)
        assert (await relay.deliver()).signalled == 2
        assert (await relay.backlog()).owed == 0
    finally:
        for handle in handles:
            await handle.terminate("test over")
        await db.dispose()


async def idle_campaigns(
    client: Client, db: Database, *keys: str
) -> list[WorkflowHandle[Any, Any]]:
    """Running CampaignWorkflow executions nobody works on, one per key, listed in
    visibility, with their entries recorded as the launcher records them: what the
    ingestion and the signaller find for those customers."""
    queue = f"idle-{uuid.uuid4().hex[:8]}"
    entries = [
        campaigns.EntryRecord(f"campaign:{campaign}:{key}:1", campaign, key, "1", "c", 1)
        for key in keys
        for campaign in [f"t{uuid.uuid4().hex[:6]}"]
    ]
    async with db.transaction() as session:
        await campaigns.record_entries(session, entries)
    handles = [
        await client.start_workflow(
            "CampaignWorkflow",
            id=entry.workflow_id,
            task_queue=queue,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(SA.CUSTOMER_KEY, entry.customer_key)]
            ),
        )
        for entry in entries
    ]
    query = visibility.running(visibility.one_of(SA.CUSTOMER_KEY, sorted(set(keys))))
    for _ in range(100):
        if (await client.count_workflows(query)).count == len(handles):
            break
        await asyncio.sleep(0.1)
    return handles


async def signals_of(
    client: Client, handle: WorkflowHandle[Any, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Every signal ``handle`` was sent, in order: its name and its decoded fields."""
    signals = []
    async for e in handle.fetch_history_events():
        if e.HasField("workflow_execution_signaled_event_attributes"):
            signal = e.workflow_execution_signaled_event_attributes
            signals.append((signal.signal_name, await decoded(client, signal.input.payloads[0])))
    return signals


async def signalled_ids(client: Client, handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The message ids of the customer events ``handle`` was signalled, in order."""
    return [fields["message_id"] for _, fields in await signals_of(client, handle)]


class ClosesOneFirst(TemporalSignaller):
    """A signaller that watches a campaign close between listing it and signalling it."""

    def __init__(self, client: Client, closes: str) -> None:
        super().__init__(lambda: asyncio.sleep(0, client))
        self.closes = closes

    async def _signal(self, handle: CampaignHandle, message: CampaignSignal) -> None:
        if handle.id == self.closes:
            await handle.terminate("closed between list and signal")
        await super()._signal(handle, message)


async def test_a_campaign_closed_between_list_and_signal_counts_as_delivered(
    dev_client: Client, tmp_path: Path
) -> None:
    db = await migrated(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    alice = PSEUDONYMISER.customer_key("alice")
    closing, staying = await idle_campaigns(dev_client, db, alice, alice)
    try:
        relay = SignalRelay(db, ClosesOneFirst(dev_client, closing.id))
        outcome = await Ingestor(db, PSEUDONYMISER, relay).ingest([track("c1", "alice")])
        assert (outcome.temporal, outcome.signalled) == ("ok", 1)
        assert await signalled_ids(dev_client, staying) == ["c1"]
        assert await signalled_ids(dev_client, closing) == []
        assert (await relay.backlog()).owed == 0  # done, not retried for ever
    finally:
        await staying.terminate("test over")
        await db.dispose()


def own_server(tmp_path: Path) -> Settings:
    """Settings of a dev server of the test's own (one it may stop) and an app database,
    pseudonymising as ``PSEUDONYMISER`` does."""
    return Settings(
        data_dir=tmp_path / "stack",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        pseudonymisation_key="k" * 32,
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
    )


async def drained(db: Database, seconds: float = 90.0) -> None:
    """Until the outbox owes nothing (the API's relay delivered it), at most ``seconds``."""
    for _ in range(int(seconds * 10)):
        if (await SignalRelay(db, _never()).backlog()).owed == 0:
            return
        await asyncio.sleep(0.1)


async def test_events_posted_while_temporal_is_down_reach_every_campaign_once_it_is_back(
    tmp_path: Path,
) -> None:
    settings = own_server(tmp_path)
    db = await migrated(settings.database_url or "")
    token = await issue_token(db, "source", "ingest")
    server = DevServer(settings)
    await server.start()
    client = await connect(settings, tracing=False)
    keys = {name: PSEUDONYMISER.customer_key(name) for name in ("ann", "ben", "cy")}
    handles = await idle_campaigns(client, db, *keys.values(), keys["ann"])
    expected = {h.id: ["up-ann"] if keys["ann"] in h.id else [] for h in handles}
    try:
        with serve_app(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, headers=bearer(token)) as http:

                async def send(*events: dict[str, Any]) -> dict[str, Any]:
                    response = await http.post("/v1/events", json={"batch": list(events)})
                    assert response.status_code == 200, response.text
                    return dict(response.json())

                assert (await send(track("up-ann", "ann")))["temporal"] == "ok"
                server.stop()  # Temporal goes away while events keep arriving
                for i in range(6):
                    name = ("ann", "ben", "cy")[i % 3]
                    body = await send(track(f"down-{name}-{i}", name))
                    # A customer's second event queues behind the first, still owed.
                    assert body["temporal"] == ("unreachable" if i < 3 else "queued")
                    for handle in handles:
                        if keys[name] in handle.id:
                            expected[handle.id].append(f"down-{name}-{i}")
                assert (await SignalRelay(db, _never()).backlog()).owed == 6
                await server.start()  # the same file and port: the campaigns are still there
                await drained(db)
        for handle in handles:
            assert await signalled_ids(client, handle) == expected[handle.id], handle.id
    finally:
        server.stop()
        await db.dispose()


async def test_consent_changed_while_temporal_is_down_reaches_the_campaigns_once_it_is_back(
    tmp_path: Path,
) -> None:
    settings = own_server(tmp_path)
    db = await migrated(settings.database_url or "")
    token = await issue_token(db, "dpo", "admin")
    ann, ben = PSEUDONYMISER.customer_key("ann"), PSEUDONYMISER.customer_key("ben")
    async with db.transaction() as session:
        records = [
            customers.CustomerRecord(ann, "ann", None),
            customers.CustomerRecord(ben, "ben", None),
        ]
        await customers.upsert_customers(session, records)
    server = DevServer(settings)
    await server.start()
    client = await connect(settings, tracing=False)
    handles = await idle_campaigns(client, db, ann, ann, ben)
    try:
        with serve_app(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, headers=bearer(token), timeout=30) as http:

                async def change(granted: bool) -> tuple[int, str]:
                    consent = {"channel": "email", "purpose": "marketing", "granted": granted}
                    response = await http.post(
                        "/v1/consent", json={"customer_id": "ann", **consent}
                    )
                    assert response.status_code == 200, response.text
                    assert response.json()["changed"]
                    return response.json()["signalled_campaigns"], response.json()["temporal"]

                assert await change(True) == (2, "ok")
                server.stop()  # Temporal goes away while the customer changes her mind
                assert await change(False) == (0, "unreachable")
                # Behind the revocation still owed: left to the relay, which keeps the order.
                assert await change(True) == (0, "queued")
                assert await change(False) == (0, "queued")
                assert (await SignalRelay(db, _never()).backlog()).owed == 3
                await server.start()
                await drained(db)
        told = [
            [(name, fields["granted"]) for name, fields in await signals_of(client, handle)]
            for handle in handles
        ]
        in_order = [("consent_changed", granted) for granted in (True, False, True, False)]
        assert told == [in_order, in_order, []]
    finally:
        server.stop()
        await db.dispose()


def _never() -> TemporalSignaller:
    """A signaller for reading the backlog only."""
    return TemporalSignaller(_connect_refused)
