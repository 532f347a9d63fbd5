"""Event ingestion over real HTTP and from files, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select

from cohortflow import schedule
from cohortflow.api.app import create_app
from cohortflow.events.importer import import_events
from cohortflow.events.ingest import Ingestor
from cohortflow.events.sources import cdnow_events
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage import campaigns
from cohortflow.storage import events as event_store
from cohortflow.storage.customers import get_features, timezone_name
from cohortflow.storage.db import Database
from cohortflow.storage.feature_store import recompute_all
from cohortflow.storage.tables import Customer, CustomerFeatures, Event
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, rfm_features
from tests.harness import bearer, issue_token, serve_app

REPO = Path(__file__).resolve().parent.parent
KEY = "k" * 32
PSEUDONYMISER = Pseudonymiser(KEY.encode())
T0 = datetime(2026, 3, 1, 10, tzinfo=UTC)


def settings_for(database_url: str, data_dir: Path) -> Settings:
    """Settings for a test API: our database, a fixed key, a Temporal nobody listens on."""
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        pseudonymisation_key=KEY,
        temporal_address=f"127.0.0.1:{free_port()}",
    )


@dataclass(frozen=True)
class Served:
    """A served API and the headers of an ingest token on it."""

    url: str
    headers: dict[str, str]


@contextlib.asynccontextmanager
async def serve_api(settings: Settings) -> AsyncIterator[Served]:
    """The real API over a socket on a free port, in a thread, until the block ends; with an
    ingest token issued in its database."""
    db = Database(settings.resolved_database_url)
    try:
        token = await issue_token(db, "tests-ingest", "ingest")
    finally:
        await db.dispose()
    with serve_app(create_app(settings)) as url:
        yield Served(url, bearer(token))


@pytest.fixture
async def api(db: Database, database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """The API, over the migrated test database."""
    async with serve_api(settings_for(database_url, tmp_path)) as served:
        yield served


def track(
    message_id: str,
    user: str,
    event: str = "purchase",
    at: datetime = T0,
    **properties: Any,
) -> dict[str, Any]:
    """A Segment-style track event."""
    if event == "purchase":
        properties.setdefault("amount", 10.0)
    return {
        "type": "track",
        "messageId": message_id,
        "userId": user,
        "event": event,
        "timestamp": at.isoformat(),
        "properties": properties,
    }


async def post(api: Served, body: Any) -> httpx.Response:
    """POST a batch (or raw bytes) to /v1/events with the ingest token."""
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=api.headers) as client:
        if isinstance(body, bytes):
            return await client.post(
                "/v1/events", content=body, headers={"content-type": "application/json"}
            )
        return await client.post("/v1/events", json=body)


async def features_table(db: Database) -> dict[str, tuple[dict[str, Any], datetime]]:
    """Every stored feature row: key -> (features, as_of)."""
    async with db.transaction() as session:
        rows = await session.execute(
            select(CustomerFeatures.customer_key, CustomerFeatures.features, CustomerFeatures.as_of)
        )
        return {key: (dict(features), as_of) for key, features, as_of in rows}


async def test_batch_accepts_good_events_rejects_bad_ones_by_path(
    api: Served, db: Database
) -> None:
    future = datetime.now(UTC) + timedelta(days=2)
    batch = [
        track("m1", "alice", amount=30.0, quantity=2),
        track("m2", "alice", at=T0 + timedelta(days=3), amount=20.0),
        track("bad-future", "bob", at=future),
        track("bad-1969", "bob", at=datetime(1969, 12, 31, tzinfo=UTC)),
        track("bad-negative", "bob", amount=-5.0),
        track("bad-type", "bob", amount="a lot"),
        track("bad-big", "bob", event="page_view", blob="x" * 40_000),
        {"type": "track", "userId": "bob", "event": "purchase"},
        {
            "type": "identify",
            "messageId": "i1",
            "userId": "alice",
            "timestamp": T0.isoformat(),
            "traits": {"email": "alice@example.com", "plan": "gold"},
        },
        track("m1", "alice", amount=30.0, quantity=2),  # repeated within the batch
    ]
    alice, bob = PSEUDONYMISER.customer_key("alice"), PSEUDONYMISER.customer_key("bob")
    # Alice entered a campaign, so her new events owe its run a signal; Temporal is down.
    async with db.transaction() as session:
        entry = campaigns.EntryRecord(f"campaign:c:{alice}:1", "c", alice, "1", "c", 1)
        await campaigns.record_entries(session, [entry])
    response = await post(api, {"batch": batch})
    assert response.status_code == 200, response.text
    body = response.json()
    statuses = [r["status"] for r in body["results"]]
    assert statuses == ["accepted", "accepted"] + ["rejected"] * 6 + ["accepted", "duplicate"]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (3, 1, 6)
    # Events were stored although Temporal is down, and the response says it was not told.
    assert body["temporal"] == "unreachable"
    locs = {r["messageId"]: [e["loc"] for e in r["errors"]] for r in body["results"]}
    assert locs["bad-future"] == [["body", "batch", 2, "timestamp"]]
    assert locs["bad-1969"] == [["body", "batch", 3, "timestamp"]]
    assert locs["bad-negative"] == [["body", "batch", 4, "properties", "amount"]]
    assert locs["bad-type"] == [["body", "batch", 5, "properties", "amount"]]
    assert locs["bad-big"] == [["body", "batch", 6]]  # Segment's 32 KB an event
    # Without a timestamp the receive time stands in; without a message id, nothing does.
    missing = body["results"][7]["errors"]
    assert [e["loc"] for e in missing] == [["body", "batch", 7, "messageId"]]

    stored = await features_table(db)
    assert set(stored) == {alice}  # rejected events touched no features
    features, as_of = stored[alice]
    assert as_of == datetime(2026, 3, 4, tzinfo=UTC)
    assert features["monetary_total"] == 50.0
    assert features["frequency"] == 1.0
    assert features["cds_total"] == 3.0
    assert features["recency_days"] == 0.0
    assert features["count:purchase"] == 2.0
    assert features["mean_interpurchase_days"] == 3.0
    async with db.transaction() as session:
        customer = await session.get(Customer, alice)
        assert customer is not None
        assert (customer.source_id, customer.email) == ("alice", "alice@example.com")
        assert customer.attributes == {"plan": "gold"}
        assert await session.get(Customer, bob) is None
        events = list(await session.scalars(select(Event)))
    # Raw ids and contact traits never reach the event log.
    assert {e.customer_key for e in events} == {alice}
    assert "alice" not in json.dumps([e.properties for e in events])

    # Re-sending the batch changes nothing: no new rows, features not rewritten.
    async with db.transaction() as session:
        updated_before = await session.scalar(
            select(CustomerFeatures.updated_at).where(CustomerFeatures.customer_key == alice)
        )
    again = (await post(api, {"batch": batch})).json()
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 4, 6)
    async with db.transaction() as session:
        assert await event_store.count_all_events(session) == 3
        assert updated_before == await session.scalar(
            select(CustomerFeatures.updated_at).where(CustomerFeatures.customer_key == alice)
        )
    # Carol never entered a campaign: her event owes no signal, so nothing waits on Temporal.
    carol = (await post(api, {"batch": [track("c1", "carol", amount=5.0)]})).json()
    assert (carol["accepted"], carol["temporal"]) == (1, "skipped")


async def test_a_later_track_event_keeps_the_contact_data_an_identify_stored(
    api: Served, db: Database
) -> None:
    def identify(message_id: str, **traits: Any) -> dict[str, Any]:
        return {
            "type": "identify",
            "messageId": message_id,
            "userId": "carol",
            "timestamp": T0.isoformat(),
            "traits": traits,
        }

    carol = PSEUDONYMISER.customer_key("carol")

    async def contact() -> tuple[str | None, str]:
        async with db.transaction() as session:
            customer = await session.get(Customer, carol)
            assert customer is not None
            return customer.email, customer.timezone

    first = identify("i-c1", email="carol@example.com", timezone="Pacific/Honolulu")
    assert (await post(api, {"batch": [first]})).status_code == 200
    # A purchase (no traits) must not reset the zone quiet hours are computed in.
    assert (await post(api, {"batch": [track("t-c1", "carol")]})).status_code == 200
    assert await contact() == ("carol@example.com", "Pacific/Honolulu")
    moved = identify("i-c2", timezone="Asia/Tokyo")
    assert (await post(api, {"batch": [moved]})).status_code == 200
    assert await contact() == ("carol@example.com", "Asia/Tokyo")
    # A customer known only from a track event has no zone: campaigns use their default.
    assert (await post(api, {"batch": [track("t-d1", "dave")]})).status_code == 200
    async with db.transaction() as session:
        dave = await session.get(Customer, PSEUDONYMISER.customer_key("dave"))
        assert dave is not None and dave.timezone is None
        name = await timezone_name(session, dave.customer_key)
    assert name == ""
    assert schedule.zone(name, "Europe/London").key == "Europe/London"


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        (b'{"batch": [', 400, ["body"]),
        (b'{"batch": [{"amount": NaN}]}', 400, ["body"]),
        (b'{"events": []}', 422, ["body", "batch"]),
        (b'{"batch": []}', 422, ["body", "batch"]),
        (b'{"batch": [{}], "sentAt": "yesterday"}', 422, ["body", "sentAt"]),
    ],
)
async def test_malformed_requests_name_the_field(
    api: Served, db: Database, body: bytes, status: int, loc: list[str]
) -> None:
    response = await post(api, body)
    assert response.status_code == status
    assert response.json()["detail"][0]["loc"] == loc
    async with db.transaction() as session:
        assert await event_store.count_all_events(session) == 0


async def test_oversized_and_all_rejected_batches(api: Served, db: Database) -> None:
    too_many = [track(f"m{i}", "u") for i in range(1001)]
    response = await post(api, {"batch": too_many})
    assert response.status_code == 413
    assert response.json()["detail"][0]["loc"] == ["body", "batch"]
    response = await post(api, {"batch": [track("n", "u", amount=float("-1"))]})
    assert response.status_code == 422
    assert response.json()["results"][0]["errors"][0]["loc"][-1] == "amount"
    async with db.transaction() as session:
        assert await event_store.count_all_events(session) == 0


def _random_events(seed: int, customers: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    kinds = ["purchase", "page_view", "email_open"]
    return [
        track(
            f"r{i}",
            f"user{rng.randrange(customers)}",
            event=rng.choice(kinds),
            at=T0 + timedelta(days=rng.randrange(400), hours=rng.randrange(24)),
            amount=round(rng.uniform(1, 100), 2),
            quantity=rng.randrange(1, 4),
        )
        for i in range(count)
    ]


async def test_incremental_features_equal_a_full_recompute(db: Database) -> None:
    events = _random_events(7, customers=40, count=1500)
    random.Random(8).shuffle(events)  # out of order, in many small batches
    ingestor = Ingestor(db, PSEUDONYMISER)
    for start in range(0, len(events), 37):
        await ingestor.ingest(events[start : start + 37])
    incremental = await features_table(db)
    assert len(incremental) == 40
    async with db.transaction() as session:
        await session.execute(delete(CustomerFeatures))
    assert await recompute_all(db, page=7) == 40
    assert await features_table(db) == incremental


async def test_count_events_counts_a_half_open_window(db: Database) -> None:
    batch = [
        track("a", "u1", at=T0),
        track("b", "u1", at=T0 + timedelta(days=1)),
        track("c", "u1", event="page_view", at=T0),
        track("d", "u2", at=T0 + timedelta(days=2)),
    ]
    await Ingestor(db, PSEUDONYMISER).ingest(batch)
    u1, u2, u3 = (PSEUDONYMISER.customer_key(u) for u in ("u1", "u2", "u3"))
    async with db.transaction() as session:
        counts = await event_store.count_events(
            session, [u1, u2, u3], "purchase", T0, T0 + timedelta(days=2)
        )
    assert counts == {u1: 2, u2: 0, u3: 0}


def _cdnow_sample(customers: int) -> Any:
    transactions = load_transactions()
    ids = sorted(transactions["customer_id"].unique())[:customers]
    return transactions[transactions["customer_id"].isin(ids)].reset_index(drop=True)


async def test_cdnow_via_api_and_via_import_give_the_same_features(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    sample = _cdnow_sample(60)
    docs = [doc for _, doc in cdnow_events(sample)]
    async with serve_api(settings_for(database_url, tmp_path)) as served:
        for start in range(0, len(docs), 100):
            response = await post(served, {"batch": docs[start : start + 100]})
            assert response.json()["accepted"] == len(docs[start : start + 100])
    via_api = await features_table(db)
    assert len(via_api) == 60

    # The same log through the importer into an empty feature table and event log.
    async with db.transaction() as session:
        await session.execute(delete(CustomerFeatures))
        await session.execute(delete(Event))
    summary = await import_events(Ingestor(db, PSEUDONYMISER), cdnow_events(sample), batch_size=250)
    assert (summary.accepted, summary.rejected) == (len(docs), 0)
    assert await features_table(db) == via_api

    # And both equal the scoring library's RFM, each customer as of their last purchase.
    for customer_id, rows in sample.groupby("customer_id"):
        expected = rfm_features(rows, rows["date"].max().date()).iloc[0]
        stored, _ = via_api[PSEUDONYMISER.customer_key(str(customer_id))]
        for name in FEATURE_NAMES:
            if expected[name] != expected[name]:  # NaN: stored as missing
                assert stored[name] is None
            else:
                assert stored[name] == pytest.approx(expected[name]), (customer_id, name)


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cohortflow",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, stdout.decode(), stderr.decode()


def cli_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """Environment for a cohortflow subprocess on the test database."""
    return {
        **os.environ,
        "COHORTFLOW_DATABASE_URL": database_url,
        "COHORTFLOW_DATA_DIR": str(data_dir),
        "COHORTFLOW_PSEUDONYMISATION_KEY": KEY,
        "COHORTFLOW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "PYTHONPATH": str(REPO),
    }


async def test_cli_imports_jsonl_and_csv_keeping_good_lines(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    jsonl = tmp_path / "events.jsonl"
    lines = [json.dumps(track(f"j{i}", f"user{i % 3}", amount=float(i))) for i in range(10)]
    lines.insert(4, "{not json")
    lines.insert(6, json.dumps(track("neg", "user9", amount=-1.0)))
    jsonl.write_text("\n".join(lines) + "\n")
    env = cli_env(database_url, tmp_path)
    code, out, err = await _cli(env, "events", "import", str(jsonl), "--json", "--no-signal")
    assert code == 2, err
    assert json.loads(out.strip().splitlines()[-1])["accepted"] == 10
    assert "line 5: malformed JSON" in err
    assert "line 7: properties.amount: must not be negative" in err

    csv_file = tmp_path / "events.csv"
    csv_file.write_text(
        "type,messageId,userId,event,timestamp,properties.amount,properties.quantity\n"
        f"track,c1,user0,purchase,{T0.isoformat()},12.5,2\n"
        f"track,c2,user1,page_view,{T0.isoformat()},,\n"
    )
    code, out, err = await _cli(env, "events", "import", str(csv_file), "--json", "--no-signal")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["accepted"] == 2
    # Importing again stores nothing new.
    code, out, _ = await _cli(env, "events", "import", str(csv_file), "--json", "--no-signal")
    assert json.loads(out.strip().splitlines()[-1]) == {
        "accepted": 0,
        "duplicates": 2,
        "rejected": 0,
        "signalled": 0,
        "temporal": "skipped",
    }
    async with db.transaction() as session:
        assert await event_store.count_all_events(session) == 12
    features = await get_features_for(db, "user0")
    assert features["monetary_total"] == 0.0 + 3.0 + 6.0 + 9.0 + 12.5


async def get_features_for(db: Database, user: str) -> dict[str, Any]:
    """The stored features of a raw user id."""
    async with db.transaction() as session:
        found = await get_features(session, [PSEUDONYMISER.customer_key(user)])
    return dict(found[PSEUDONYMISER.customer_key(user)])
