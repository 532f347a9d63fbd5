"""Retention: events older than the period are purged while the features stay what the
whole log would give (a property over random logs, then on SQLite and PostgreSQL through the
store, a new event and the worker's schedule), and the audit chain is untouched."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from cohortflow.events.features import FeatureEvent, compute_features
from cohortflow.events.purger import run_purges
from cohortflow.events.rollup import Rollup, fold
from cohortflow.storage import audit
from cohortflow.storage.db import Database
from cohortflow.storage.events import EventRecord, insert_events
from cohortflow.storage.feature_store import update_features
from cohortflow.storage.retention import day_cutoff, purge_page
from cohortflow.storage.tables import CustomerFeatures, Event, EventRollup
from tests.test_cli import assert_refused, cli_env, cohortflow

DAY0 = date(2025, 1, 1)
NAMES = ("purchase", "page_view", "signup")


def event(day: int, name: str, amount: float = 0.0, hour: int = 12) -> FeatureEvent:
    at = datetime.combine(DAY0 + timedelta(days=day), time(hour), tzinfo=UTC)
    properties: dict[str, Any] = {"amount": amount, "quantity": 1 + int(amount) % 3}
    return FeatureEvent("track", name, at, properties if name == "purchase" else {})


logs = st.lists(
    st.builds(
        event,
        st.integers(0, 500),
        st.sampled_from(NAMES),
        st.floats(1, 500, allow_nan=False).map(lambda x: round(x, 2)),
        st.integers(0, 23),
    ),
    min_size=1,
    max_size=60,
)


def same(a: dict[str, float | None], b: dict[str, float | None]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if x is None or y is None:
            assert x is None and y is None, name
        elif math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), name
        else:
            assert x == pytest.approx(y, rel=1e-9, abs=1e-9), name


@settings(max_examples=300, deadline=None)
@given(logs, st.integers(0, 500), st.integers(1, 3))
def test_features_from_a_rollup_equal_those_of_the_whole_log(
    log: list[FeatureEvent], cut: int, purges: int
) -> None:
    last = max(e.occurred_at.date() for e in log)
    # The windows (90 days at most) lie inside what is kept: the minimum retention's promise.
    cutoff = min(DAY0 + timedelta(days=cut), last - timedelta(days=90))
    whole = compute_features(log)
    # Purged in ``purges`` passes at ever later day cutoffs, as an hourly schedule would.
    rollup: Rollup | None = None
    kept = log
    for step in range(purges, 0, -1):
        bound = cutoff - timedelta(days=30 * (step - 1))
        old = [e for e in kept if e.occurred_at.date() < bound]
        kept = [e for e in kept if e.occurred_at.date() >= bound]
        rollup = fold(rollup, old) if old else rollup
    assert rollup is not None or kept == log
    if not kept:
        return  # every event purged: the stored features stand until the next event
    after = compute_features(kept, rollup)
    same(after.features, whole.features)
    assert (after.as_of, after.recent) == (whole.as_of, whole.recent)
    assert Rollup.from_json((rollup or Rollup()).to_json()) == (rollup or Rollup())


T0 = datetime(2026, 12, 1, tzinfo=UTC)


def record(key: str, i: int, days_ago: int, name: str = "purchase") -> EventRecord:
    at = T0 - timedelta(days=days_ago, hours=i % 5)
    props = {"amount": 10.0 + i, "quantity": 1} if name == "purchase" else {}
    return EventRecord(f"{key}-{i}", key, "track", name, at, props)


async def features_of(db: Database, key: str) -> dict[str, float | None]:
    """The features as stored (true on their own day, not aged to today)."""
    async with db.read_transaction() as session:
        row = await session.get(CustomerFeatures, key)
    assert row is not None
    return dict(row.features)


async def test_a_purge_keeps_the_features_the_whole_log_gives(db: Database) -> None:
    keys = ["c_ret1", "c_ret2"]
    history = [
        record(k, i, days_ago, name)
        for k in keys
        for i, (days_ago, name) in enumerate(
            [(400, "purchase"), (300, "page_view"), (200, "purchase"), (150, "purchase"),
             (60, "page_view"), (20, "purchase"), (3, "purchase")]
        )
    ]  # fmt: skip
    async with db.transaction() as session:
        await insert_events(session, history)
        await update_features(session, keys)
        await audit.append_audit(session, audit.AuditEvent("w", "s", "scored", "c", keys[0], {}))
    cutoff = day_cutoff(T0, 120)
    async with db.transaction() as session:
        purged = await purge_page(session, cutoff)
    assert purged == 2 * 4  # the four events before the cutoff, of each customer
    async with db.read_transaction() as session:
        left = await session.scalar(select(func.count()).select_from(Event))
        rollups = await session.scalar(select(func.count()).select_from(EventRollup))
        assert (left, rollups) == (2 * 3, 2)
        assert await purge_page(session, cutoff) == 0

    # A new event recomputes from what is left and the rollup: as if nothing had gone.
    new = EventRecord("c_ret1-new", "c_ret1", "track", "purchase", T0, {"amount": 5.0})
    async with db.transaction() as session:
        await insert_events(session, [new])
        await update_features(session, ["c_ret1"])
    expected = compute_features(
        [
            FeatureEvent(e.type, e.event, e.occurred_at, e.properties)
            for e in [*history, new]
            if e.customer_key == "c_ret1"
        ]
    )
    same(await features_of(db, "c_ret1"), expected.features)
    async with db.read_transaction() as session:
        assert (await audit.verify_chain(session)).ok


async def test_the_worker_schedule_purges_and_the_command_refuses_a_short_period(
    db: Database,
) -> None:
    async with db.transaction() as session:
        await insert_events(session, [record("c_sched", i, 300 + i) for i in range(3)])
    stop = asyncio.Event()
    purging = asyncio.create_task(run_purges(db, 120, stop, interval=0.05))
    for _ in range(200):
        async with db.read_transaction() as session:
            if not await session.scalar(select(func.count()).select_from(Event)):
                break
        await asyncio.sleep(0.05)
    stop.set()
    await purging
    async with db.read_transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Event)) == 0
        assert await session.scalar(select(func.count()).select_from(EventRollup)) == 1
    short = cohortflow("events", "purge", "--older-than-days", "30", env=cli_env())
    assert_refused(short, "older_than_days: 30 is under 120")
