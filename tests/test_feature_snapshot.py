"""The columnar feature snapshot: a full evaluation reads it and the customers changed since
from the operational copy, and gives the members the row path gives (on SQLite and
PostgreSQL); features stored before migration 0016 are evaluated through it."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from cohortflow.cohorts import evaluator
from cohortflow.cohorts.evaluator import membership
from cohortflow.cohorts.rules import parse_cohort
from cohortflow.events.ingest import Ingestor
from cohortflow.storage import customers, feature_snapshot
from cohortflow.storage.db import Database, migrate
from cohortflow.storage.erasure import erase_customer
from cohortflow.storage.tables import FeatureChange, FeatureSnapshotRow
from tests.test_events import PSEUDONYMISER, T0, track

RULES: list[dict[str, Any]] = [
    {
        "all": [
            {"feature": "recency_days", "op": ">=", "value": 20},
            {"feature": "monetary_total", "op": ">=", "value": 30},
            {"not": {"feature": "events_30d", "op": ">", "value": 2}},
        ]
    },
    {
        "any": [
            {"feature": "purchases_90d", "op": ">=", "value": 2},
            {"feature": "count:email_open", "op": ">=", "value": 2},
            {"feature": "days_since:page_view", "op": "<", "value": 15},
        ]
    },
    {"not": {"feature": "mean_interpurchase_days", "op": "<", "value": 10}},
    {"feature": "count:never_sent", "op": ">=", "value": 0},
    {
        "all": [
            {"event": "purchase", "within": "P20D"},
            {"feature": "frequency", "op": ">=", "value": 0},
        ]
    },
]


def key(user: str) -> str:
    return PSEUDONYMISER.customer_key(user)


async def _ingest(db: Database, events: list[dict[str, Any]]) -> None:
    outcome = await Ingestor(db, PSEUDONYMISER).ingest(events)
    assert outcome.count("rejected") == 0


def _random_events(users: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    found: list[dict[str, Any]] = []
    for u in range(users):
        for n in range(rng.randint(1, 6)):
            event = rng.choice(["purchase", "page_view", "email_open"])
            at = T0 + timedelta(days=rng.randint(0, 120), hours=rng.randint(0, 23))
            found.append(
                track(f"{prefix}-{u}-{n}", f"u{u}", event=event, at=at, amount=rng.randint(5, 60))
            )
    return found


async def _snapshot_id(db: Database) -> str | None:
    async with db.transaction() as session:
        row = await session.get(FeatureSnapshotRow, 1)
        return None if row is None else row.snapshot_id


async def _same_as_rows(db: Database, directory: Path, days: int) -> list[set[str]]:
    """Each rule's members read through the snapshot, checked against the row path."""
    async with db.transaction() as session:
        everyone = [k for (k,) in await session.execute(text("SELECT customer_key FROM customers"))]
    found = []
    for rule in RULES:
        definition = parse_cohort({"cohort_id": "c", "name": "c", "rule": rule})
        at = T0 + timedelta(days=days)
        full = await membership(db, definition, at, snapshots=directory)
        rows = await membership(db, definition, at, keys=everyone)
        assert full == rows, rule
        found.append(full)
    return found


async def test_full_evaluations_read_the_snapshot_and_the_changes_since(
    db: Database, tmp_path: Path
) -> None:
    await _ingest(db, _random_events(60, seed=1, prefix="a"))
    first = await _same_as_rows(db, tmp_path, 130)
    assert all(first[:3]) and not all(m == first[0] for m in first)  # the rules discriminate
    taken = await _snapshot_id(db)
    assert taken is not None and (tmp_path / f"{taken}.parquet").exists()
    # Windows move between evaluation days: the snapshot's recent days re-window them.
    assert await _same_as_rows(db, tmp_path, 150) != first

    # After the snapshot: one customer buys (enters the first rule), one is erased, one new.
    lapsed = sorted(first[0])[0]
    user = next(f"u{u}" for u in range(60) if key(f"u{u}") == lapsed)
    erased = sorted(first[1])[0]
    await _ingest(
        db,
        [
            track("late-1", user, at=T0 + timedelta(days=125), amount=50),
            track("late-2", "newcomer", event="email_open", at=T0 + timedelta(days=125)),
            track("late-3", "newcomer", event="email_open", at=T0 + timedelta(days=126)),
        ],
    )
    async with db.transaction() as session:
        await erase_customer(session, erased)
    after = await _same_as_rows(db, tmp_path, 130)
    assert await _snapshot_id(db) == taken  # read as snapshot plus changes, not retaken
    assert lapsed not in after[0]
    assert erased not in set().union(*after)
    assert key("newcomer") in after[1]


async def test_many_changes_retake_the_snapshot_and_clear_the_log(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluator, "RETAKE_AFTER", 5)
    await _ingest(db, _random_events(20, seed=2, prefix="a"))
    await _same_as_rows(db, tmp_path, 130)
    taken = await _snapshot_id(db)
    await _ingest(db, _random_events(3, seed=3, prefix="b"))  # three changed: overlaid
    await _same_as_rows(db, tmp_path, 130)
    assert await _snapshot_id(db) == taken
    await _ingest(db, _random_events(10, seed=4, prefix="c"))  # ten: more than five
    await _same_as_rows(db, tmp_path, 130)
    assert await _snapshot_id(db) != taken
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(FeatureChange)) == 0
    files = await asyncio.to_thread(lambda: list(tmp_path.glob("*.parquet")))
    assert len(files) == 2  # the newest and the one before


async def test_features_stored_before_0016_are_evaluated_through_a_snapshot(
    database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url, "0015")
    db = Database(database_url)
    try:
        as_of = T0 + timedelta(days=10)
        async with db.transaction() as session:
            await session.execute(
                text(
                    "INSERT INTO customer_features (customer_key, features, as_of, updated_at)"
                    " VALUES (:k, :f, :a, :a)"
                ),
                [
                    {"k": "old-a", "f": '{"recency_days": 5, "count:email_open": 4}', "a": as_of},
                    {"k": "old-b", "f": '{"recency_days": 1, "count:email_open": 1}', "a": as_of},
                    {"k": "old-c", "f": '{"recency_days": null}', "a": as_of},
                ],
            )
        await migrate(database_url)
        rule = {
            "all": [
                {"feature": "recency_days", "op": ">=", "value": 7},
                {"feature": "count:email_open", "op": ">=", "value": 2},
            ]
        }
        definition = parse_cohort({"cohort_id": "c", "name": "c", "rule": rule})
        at = T0 + timedelta(days=12)  # recency_days aged by two days: 7 and 3
        assert await membership(db, definition, at, snapshots=tmp_path) == {"old-a"}
        async with db.transaction() as session:
            snapshot = await feature_snapshot.registered(session, tmp_path)
            got = await customers.get_features(session, ["old-a"], at)
        assert snapshot is not None and snapshot.customers == 3
        assert got["old-a"]["recency_days"] == 7
    finally:
        await db.dispose()
