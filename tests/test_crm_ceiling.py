"""The CRM request ceiling and the ledger, on SQLite and PostgreSQL: however many processes
send, no window ever holds more requests than the CRM allows, and a key is confirmed once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI

from activities.campaign.ceiling import SAFETY_MARGIN, CeilingConfig, RequestCeiling
from cohortflow.crm._http import WireStamp, pooled_client
from cohortflow.storage import crm_ledger
from cohortflow.storage.db import Database
from tests.harness import serve_app

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
WINDOW = timedelta(seconds=10)


async def test_a_full_window_says_how_long_until_its_oldest_request_leaves(db: Database) -> None:
    waits = []
    for offset in (0, 1, 2, 3):
        async with db.transaction() as session:
            taken = await crm_ledger.take_request_slot(
                session, "hubspot:x", 3, WINDOW, now=T0 + timedelta(seconds=offset)
            )
            waits.append(taken.wait)
            assert (taken.id is None) == (offset == 3)
    assert waits[:3] == [timedelta(0)] * 3
    assert waits[3] == timedelta(seconds=7)  # the first left at T0 + 10 s
    async with db.transaction() as session:
        later = await crm_ledger.take_request_slot(
            session, "hubspot:x", 3, WINDOW, now=T0 + timedelta(seconds=10)
        )
        other = await crm_ledger.take_request_slot(session, "hubspot:y", 3, WINDOW, now=T0)
        counted = await crm_ledger.requests_in_window(
            session, "hubspot:x", WINDOW, now=T0 + timedelta(seconds=10)
        )
    assert later.id is not None and other.id is not None  # ceilings are apart
    assert counted == 3  # the one sent at T0 left the window


async def test_concurrent_senders_never_put_more_than_the_limit_in_any_window(
    database_url: str, db: Database
) -> None:
    limit, window = 5, timedelta(seconds=1)
    config = CeilingConfig("sandbox:ceiling-test", limit, window)
    # Four "processes": each its own engine and connection pool on the same database.
    databases = [Database(database_url) for _ in range(4)]
    sent: list[float] = []

    async def sender(database: Database) -> None:
        ceiling = RequestCeiling(database, config)
        for _ in range(4):
            async with ceiling.slot():
                sent.append(time.monotonic())

    try:
        started = time.monotonic()
        await asyncio.gather(*(sender(d) for d in databases))
        elapsed = time.monotonic() - started
    finally:
        for database in databases:
            await database.dispose()
    sent.sort()
    span = (window + SAFETY_MARGIN).total_seconds()
    for i, at in enumerate(sent):
        in_window = [t for t in sent[i:] if t < at + span - 0.05]  # tolerance for clock reads
        assert len(in_window) <= limit, f"{len(in_window)} requests within one window"
    # 16 requests at 5 a window need at least three more windows after the first.
    assert elapsed >= 3 * window.total_seconds()


async def test_without_a_wire_stamp_a_request_counts_from_its_answer(db: Database) -> None:
    # A transport that cannot say when the request reached the wire: the CRM counted it at
    # some moment before the answer, so the next request may go only a window after it.
    ceiling = RequestCeiling(db, CeilingConfig("hubspot:slow", 1, timedelta(seconds=1)))
    async with ceiling.slot():
        await asyncio.sleep(0.6)  # a request stuck in a busy event loop or on the wire
    answered = time.monotonic()
    async with ceiling.slot():
        next_sent = time.monotonic()
    assert next_sent - answered >= 1.0


def slow_crm(delay: float) -> FastAPI:
    """A CRM that notes when each request arrived and answers ``delay`` seconds later."""
    app = FastAPI(title="slow CRM")
    app.state.arrivals = []

    @app.post("/write")
    async def write() -> dict[str, bool]:
        app.state.arrivals.append(time.monotonic())
        await asyncio.sleep(delay)
        return {"ok": True}

    return app


async def test_a_request_counts_from_when_it_reached_the_wire(db: Database) -> None:
    # One request a second. The first is held 0.4 s after taking its slot (a busy event loop,
    # a pooled connection in use) and answered 0.5 s after arriving: the next may go a window
    # after the first arrived, neither earlier (the CRM would refuse it) nor a window after
    # the answer (the slot would hold the request's latency too).
    window = timedelta(seconds=1)
    ceiling = RequestCeiling(db, CeilingConfig("sandbox:wire", 1, window))
    app = slow_crm(0.5)

    @contextlib.asynccontextmanager
    async def held_gate() -> AsyncIterator[WireStamp]:
        async with ceiling.slot() as stamp:
            await asyncio.sleep(0.4)
            yield stamp

    with serve_app(app) as url:
        async with (
            pooled_client(url, None, 10.0, held_gate) as first,
            pooled_client(url, None, 10.0, ceiling.slot) as second,
        ):
            (await first.post("/write")).raise_for_status()
            answered = time.monotonic()
            (await second.post("/write")).raise_for_status()

    arrived, next_arrived = app.state.arrivals
    span = (window + SAFETY_MARGIN).total_seconds()
    assert next_arrived - arrived >= span - 0.02  # never inside the CRM's window
    assert next_arrived - answered < span - 0.3  # the answer's latency did not hold it


async def test_a_confirmed_effect_is_recorded_once_and_listed_by_workflow(db: Database) -> None:
    effect = crm_ledger.Effect(
        "wf-1:enrol", "wf-1", "enrol", "c_1", "enroll_sequence", "winback", [], "901", "answered"
    )
    async with db.transaction() as session:
        assert await crm_ledger.record(session, effect, now=T0)
        assert not await crm_ledger.record(session, effect, now=T0 + timedelta(seconds=1))
        await crm_ledger.record(
            session,
            crm_ledger.Effect(
                "wf-2:label",
                "wf-2",
                "label",
                "c_2",
                "set_properties",
                "",
                ["a"],
                "902",
                "read_back",
            ),
            now=T0,
        )
    async with db.transaction() as session:
        found = await crm_ledger.confirmed(session, "wf-1:enrol")
        listed = await crm_ledger.effects_of(session, "wf-1")
        missing = await crm_ledger.confirmed(session, "wf-1:label")
    assert found is not None and (found.crm_id, found.how) == ("901", "answered")
    assert [e.idempotency_key for e in listed] == ["wf-1:enrol"]
    assert missing is None
