"""Repositories over both databases: engine setup, campaigns, approvals, consent, customers,
features, segments and the signal outbox's order."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from cohortflow.storage.approvals import (
    ApprovalAlreadyDecided,
    ApprovalNotFound,
    add_pending,
    get_approval,
    list_approvals,
    mark_decided,
)
from cohortflow.storage.campaigns import (
    count_entries,
    get_campaign,
    get_spec,
    list_campaigns,
    list_entries,
    record_entry,
    save_spec_version,
    set_campaign_status,
)
from cohortflow.storage.consent import (
    ConsentEvidence,
    bulk_set_consent,
    has_consent,
    history,
    set_consent,
)
from cohortflow.storage.customers import (
    CustomerRecord,
    FeatureRow,
    get_customer,
    get_features,
    upsert_customers,
    upsert_features,
)
from cohortflow.storage.db import Database
from cohortflow.storage.segments import assign_segment
from cohortflow.storage.signal_outbox import OwedSignal, claim, owe
from cohortflow.storage.tables import SegmentAssignment
from tests.conftest import postgres_only, sqlite_only

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))
SPEC = {"name": "Win back", "steps": [{"id": "score", "type": "score"}], "sensitive": True}


# ---------------------------------------------------------------- engine and sessions


def sqlite_path(db: Database) -> str:
    path = make_url(db.url).database
    assert path is not None
    return path


def try_write_lock(path: str) -> bool:
    """Whether another connection can take SQLite's write lock right now, without waiting."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        other.close()


@sqlite_only
async def test_sqlite_connections_use_wal_and_wait_for_locks(db: Database) -> None:
    async with db.transaction() as session:
        pragmas = {
            name: (await session.execute(text(f"PRAGMA {name}"))).scalar_one()
            for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
        }
    assert pragmas == {
        "journal_mode": "wal",
        "busy_timeout": 30000,
        "synchronous": 1,
        "foreign_keys": 1,
    }


@sqlite_only
async def test_sqlite_transactions_take_the_write_lock_up_front(db: Database) -> None:
    path = sqlite_path(db)
    assert try_write_lock(path)
    async with db.transaction() as session:
        await session.execute(text("SELECT 1"))
        assert not try_write_lock(path)
    assert try_write_lock(path)


@sqlite_only
async def test_sqlite_read_transactions_leave_writers_alone(db: Database) -> None:
    async with db.read_transaction() as session:
        await session.execute(text("SELECT count(*) FROM audit_log"))
        assert try_write_lock(sqlite_path(db))


def no_busy_wait(db: Database) -> None:
    """Make ``db``'s new connections fail at once on SQLite's write lock, not wait for it."""

    @event.listens_for(db.engine.sync_engine, "connect")
    def _fail_fast(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")


async def holding_a_write(db: Database, release: asyncio.Event) -> asyncio.Task[None]:
    """A task holding a write transaction of ``db`` (so its turn) until ``release``."""
    holding = asyncio.Event()

    async def hold() -> None:
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    return holder


@sqlite_only
async def test_sqlite_writers_of_one_process_take_turns_before_the_lock(db: Database) -> None:
    # Without SQLite's busy handler to wait in, concurrent writers of one process would
    # fail with "database is locked"; they queue for their turn in the process instead,
    # in the order they asked.
    no_busy_wait(db)
    began: list[int] = []

    async def write(n: int) -> None:
        async with db.transaction() as session:
            began.append(n)
            await set_consent(session, f"c_{n}", "email", "marketing", True, "test")
            await asyncio.sleep(0.01)

    await asyncio.gather(*(write(n) for n in range(12)))
    assert began == list(range(12))
    async with db.read_transaction() as session:
        assert all([await has_consent(session, f"c_{n}", "email", "marketing") for n in range(12)])


@sqlite_only
async def test_sqlite_writers_of_two_processes_take_turns_on_the_turn_file(db: Database) -> None:
    # Two Databases on one file stand for two processes: their writers queue on the turn
    # file's flock, woken when it is let go, rather than in SQLite's busy handler (here
    # there is none: without the turn they would fail with "database is locked").
    other = Database(db.url)
    try:
        no_busy_wait(db)
        no_busy_wait(other)

        async def write(where: Database, n: int) -> None:
            async with where.transaction() as session:
                await set_consent(session, f"c_{n}", "email", "marketing", True, "test")
                await asyncio.sleep(0.01)

        await asyncio.gather(*(write(db if n % 2 else other, n) for n in range(12)))
    finally:
        await other.dispose()
    async with db.read_transaction() as session:
        assert all([await has_consent(session, f"c_{n}", "email", "marketing") for n in range(12)])


@sqlite_only
async def test_sqlite_wait_for_another_process_turn_gives_up_and_gives_it_back(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cohortflow.storage.db.SQLITE_BUSY_TIMEOUT_MS", 200)
    other = Database(db.url)
    release = asyncio.Event()
    try:
        holder = await holding_a_write(other, release)
        with pytest.raises(OperationalError, match="another process"):
            async with asyncio.timeout(5), db.transaction() as session:
                await session.execute(text("SELECT 1"))
        release.set()
        await holder
        # The thread left waiting took the turn when it was let go, and gave it back.
        async with asyncio.timeout(5), other.transaction() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        async with asyncio.timeout(5), db.transaction() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await other.dispose()


@sqlite_only
async def test_sqlite_nested_write_transaction_meets_sqlite_not_its_own_turn(db: Database) -> None:
    # A transaction opened inside one the task holds waits in SQLite as it always did (here
    # it fails at once), rather than hang on the process's turn, which the task holds.
    no_busy_wait(db)
    async with db.transaction() as outer:
        await set_consent(outer, "c_1", "email", "marketing", True, "test")
        with pytest.raises(OperationalError, match="locked"):
            async with asyncio.timeout(5), db.transaction() as inner:
                await inner.execute(text("SELECT 1"))


@sqlite_only
async def test_sqlite_wait_for_a_write_turn_gives_up_like_sqlite(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cohortflow.storage.db.SQLITE_BUSY_TIMEOUT_MS", 200)
    release = asyncio.Event()
    holder = await holding_a_write(db, release)
    with pytest.raises(OperationalError, match="locked"):
        async with asyncio.timeout(5), db.transaction() as session:
            await session.execute(text("SELECT 1"))
    release.set()
    await holder
    async with db.transaction() as session:  # the turn is free again
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


@postgres_only
async def test_postgres_read_transactions_are_read_only(db: Database) -> None:
    async with db.read_transaction() as session:
        assert (await session.execute(text("SHOW transaction_read_only"))).scalar_one() == "on"
    async with db.transaction() as session:
        assert (await session.execute(text("SHOW transaction_read_only"))).scalar_one() == "off"


async def test_transaction_commits_or_rolls_back(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await set_consent(session, "c_1", "email", "marketing", True, "test")
            raise RuntimeError("abort")
    async with db.transaction() as session:
        assert not await has_consent(session, "c_1", "email", "marketing")
        await set_consent(session, "c_1", "email", "marketing", True, "test")
    async with db.transaction() as session:
        assert await has_consent(session, "c_1", "email", "marketing")


# ---------------------------------------------------------------- campaigns


async def test_spec_versions_are_created_only_for_changes(db: Database) -> None:
    async with db.transaction() as session:
        assert await save_spec_version(session, "winback", SPEC, "alice", now=T0) == (1, True)
    async with db.transaction() as session:
        reordered = dict(reversed(list(SPEC.items())))
        assert await save_spec_version(session, "winback", reordered, "bob") == (1, False)
    changed = {**SPEC, "sensitive": False}
    async with db.transaction() as session:
        assert await save_spec_version(session, "winback", changed, "bob") == (2, True)
        assert await save_spec_version(session, "winback", SPEC, "bob") == (3, True)

    async with db.transaction() as session:
        campaign = await get_campaign(session, "winback")
        assert campaign is not None
        assert (campaign.status, campaign.latest_version) == ("active", 3)
        assert await get_spec(session, "winback", 1) == SPEC
        assert await get_spec(session, "winback", 2) == changed
        assert await get_spec(session, "winback", 4) is None
        assert await get_spec(session, "other", 1) is None


async def test_saved_spec_does_not_follow_later_changes_to_the_callers_dict(db: Database) -> None:
    spec = {"name": "x", "steps": []}
    async with db.transaction() as session:
        await save_spec_version(session, "c", spec, "alice")
        spec["name"] = "changed after saving"
    async with db.transaction() as session:
        assert await get_spec(session, "c", 1) == {"name": "x", "steps": []}


async def test_concurrent_spec_saves_queue_and_get_distinct_versions(db: Database) -> None:
    async with db.transaction() as session:
        await save_spec_version(session, "race", {"n": 0}, "alice")
    other = Database(db.url)

    async def save_elsewhere() -> tuple[int, bool]:
        async with other.transaction() as session:
            return await save_spec_version(session, "race", {"n": 2}, "bob")

    try:
        async with db.transaction() as session:
            assert await save_spec_version(session, "race", {"n": 1}, "alice") == (2, True)
            racer = asyncio.create_task(save_elsewhere())
            await asyncio.sleep(0.3)
            assert not racer.done(), "the second save must wait for the first transaction"
        assert await racer == (3, True)
    finally:
        await other.dispose()
    async with db.transaction() as session:
        campaign = await get_campaign(session, "race")
        assert campaign is not None and campaign.latest_version == 3
        assert await get_spec(session, "race", 3) == {"n": 2}


async def test_campaign_status_and_listing(db: Database) -> None:
    async with db.transaction() as session:
        await save_spec_version(session, "b-campaign", SPEC, "alice")
        await save_spec_version(session, "a-campaign", SPEC, "alice")
    async with db.transaction() as session:
        assert await set_campaign_status(session, "a-campaign", "paused") is True
        assert await set_campaign_status(session, "a-campaign", "paused") is False
        with pytest.raises(LookupError):
            await set_campaign_status(session, "missing", "paused")
        with pytest.raises(ValueError):
            await set_campaign_status(session, "a-campaign", "deleted")  # type: ignore[arg-type]
    async with db.transaction() as session:
        campaigns = await list_campaigns(session)
    assert [(c.campaign_id, c.status) for c in campaigns] == [
        ("a-campaign", "paused"),
        ("b-campaign", "active"),
    ]
    assert all(c.updated_at.tzinfo is not None for c in campaigns)


async def enter(db: Database, workflow_id: str, entry_id: str) -> bool:
    async with db.transaction() as session:
        return await record_entry(
            session,
            workflow_id=workflow_id,
            campaign_id="winback",
            customer_key="c_1",
            entry_id=entry_id,
            cohort_id="lapsed",
            version=1,
        )


async def test_record_entry_is_idempotent(db: Database) -> None:
    assert await enter(db, "campaign:winback:c_1:e1", "e1") is True
    assert await enter(db, "campaign:winback:c_1:e1", "e1") is False
    # The same (campaign, customer, entry) under another workflow id is the same entry.
    assert await enter(db, "campaign:winback:c_1:e1-again", "e1") is False
    assert await enter(db, "campaign:winback:c_1:e2", "e2") is True
    assert await asyncio.gather(
        *(enter(db, "campaign:winback:c_1:e3", "e3") for _ in range(4))
    ) in (
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    )
    async with db.transaction() as session:
        assert await count_entries(session, "winback") == 3
        assert await count_entries(session, "other") == 0


async def test_list_entries_gives_one_campaigns_entries_oldest_first(db: Database) -> None:
    async with db.transaction() as session:
        for workflow_id, campaign, hours in (("wf-b", "winback", 2), ("wf-a", "winback", 1)):
            await record_entry(
                session,
                workflow_id=workflow_id,
                campaign_id=campaign,
                customer_key=f"c_{workflow_id}",
                entry_id="1",
                cohort_id="lapsed",
                version=1,
                launched_at=(T0 + timedelta(hours=hours)).astimezone(PLUS_2),
            )
        await record_entry(
            session,
            workflow_id="wf-other",
            campaign_id="other",
            customer_key="c_1",
            entry_id="1",
            cohort_id="lapsed",
            version=1,
            launched_at=T0,
        )
    async with db.transaction() as session:
        entries = await list_entries(session, "winback")
        nothing = await list_entries(session, "nope")
    assert [(e.workflow_id, e.customer_key, e.launched_at) for e in entries] == [
        ("wf-a", "c_wf-a", T0 + timedelta(hours=1)),
        ("wf-b", "c_wf-b", T0 + timedelta(hours=2)),
    ]
    assert nothing == []


# ---------------------------------------------------------------- approvals


async def add_approval(
    db: Database, approval_id: str, campaign: str = "winback", minute: int = 0
) -> bool:
    async with db.transaction() as session:
        return await add_pending(
            session,
            approval_id=approval_id,
            workflow_id=f"campaign:{campaign}:c_1:e1",
            step_id="approve",
            campaign_id=campaign,
            customer_key="c_1",
            reason="high value",
            scores={"churn": 0.8},
            requested_at=(T0 + timedelta(minutes=minute)).astimezone(PLUS_2),
            expires_at=T0 + timedelta(days=3),
        )


async def test_approval_lifecycle(db: Database) -> None:
    assert await add_approval(db, "ap-1") is True
    assert await add_approval(db, "ap-1") is False
    assert await add_approval(db, "ap-2", campaign="other", minute=1) is True

    async with db.transaction() as session:
        pending = await list_approvals(session)
        assert [a.approval_id for a in pending] == ["ap-1", "ap-2"]
        assert [a.approval_id for a in await list_approvals(session, campaign_id="other")] == [
            "ap-2"
        ]
        approval = await get_approval(session, "ap-1")
        assert approval is not None
        assert approval.requested_at == T0
        assert approval.requested_at.tzinfo is not None
        assert approval.requested_at.utcoffset() == timedelta(0)
        assert approval.scores == {"churn": 0.8}

    decided_at = T0 + timedelta(hours=1)
    async with db.transaction() as session:
        decided = await mark_decided(
            session, "ap-1", status="approved", operator="bob", reason="ok", decided_at=decided_at
        )
        assert decided is True
    async with db.transaction() as session:
        again = await mark_decided(
            session, "ap-1", status="approved", operator="bob", reason="ok", decided_at=decided_at
        )
        assert again is False
        with pytest.raises(ApprovalAlreadyDecided) as refused:
            await mark_decided(
                session, "ap-1", status="rejected", operator="eve", reason="no", decided_at=T0
            )
        assert refused.value.status == "approved"
        with pytest.raises(ApprovalNotFound):
            await mark_decided(
                session, "nope", status="expired", operator=None, reason=None, decided_at=T0
            )

    async with db.transaction() as session:
        approval = await get_approval(session, "ap-1")
        assert approval is not None
        assert (approval.status, approval.decided_by, approval.decision_reason) == (
            "approved",
            "bob",
            "ok",
        )
        assert approval.decided_at == decided_at
        assert [a.approval_id for a in await list_approvals(session)] == ["ap-2"]
        assert [a.approval_id for a in await list_approvals(session, status="approved")] == ["ap-1"]
        assert len(await list_approvals(session, status=None)) == 2
        assert await get_approval(session, "nope") is None


# ---------------------------------------------------------------- consent


async def test_consent_is_opt_in_and_set_reports_changes(db: Database) -> None:
    async with db.transaction() as session:
        assert await has_consent(session, "c_1", "email", "marketing") is False
        # A first refusal is recorded, but consent was already absent: no change.
        assert await set_consent(session, "c_1", "email", "marketing", False, "import") is False
        assert await set_consent(session, "c_1", "email", "marketing", True, "form", now=T0) is True
        assert await set_consent(session, "c_1", "email", "marketing", True, "form") is False
        assert await has_consent(session, "c_1", "email", "marketing") is True
        assert await has_consent(session, "c_1", "sms", "marketing") is False
        assert await has_consent(session, "c_1", "email", "service") is False
    async with db.transaction() as session:
        assert await set_consent(session, "c_1", "email", "marketing", False, "unsubscribe") is True
        assert await has_consent(session, "c_1", "email", "marketing") is False


async def test_bulk_consent_counts_changes(db: Database) -> None:
    async with db.transaction() as session:
        await set_consent(session, "c_1", "email", "marketing", True, "form")
    rows = [
        ("c_1", "email", "marketing", True),  # unchanged
        ("c_2", "email", "marketing", True),  # granted
        ("c_3", "email", "marketing", False),  # first refusal: no change
        ("c_4", "sms", "marketing", False),
        ("c_4", "sms", "marketing", True),  # the last decision wins
    ]
    async with db.transaction() as session:
        assert await bulk_set_consent(session, rows, "import") == 2
    async with db.transaction() as session:
        assert [
            await has_consent(session, key, channel, "marketing")
            for key, channel in [
                ("c_1", "email"),
                ("c_2", "email"),
                ("c_3", "email"),
                ("c_4", "sms"),
            ]
        ] == [True, True, False, True]
        revoke = [("c_1", "email", "marketing", False), ("c_2", "email", "marketing", False)]
        assert await bulk_set_consent(session, revoke, "import") == 2
        evidence = ConsentEvidence(how="import", by="crm-sync", policy_version="v7")
        assert await bulk_set_consent(session, revoke, "import", evidence=evidence) == 0
        assert not await has_consent(session, "c_2", "email", "marketing")
        # Every decision is evidence, the repeated ones too, with whether it changed anything.
        trail = [
            (h.granted, h.changed, h.how, h.policy_version) for h in await history(session, "c_2")
        ]
        assert trail == [
            (True, True, "system", None),
            (False, True, "system", None),
            (False, False, "import", "v7"),
        ]


# ---------------------------------------------------------------- customers and features


async def test_customers_upsert_round_trip(db: Database) -> None:
    records = [
        CustomerRecord("c_1", "src-1", "one@example.com", "Europe/Paris", {"tier": "gold"}),
        CustomerRecord("c_2", "src-2", None),
    ]
    async with db.transaction() as session:
        assert await upsert_customers(session, records, now=T0) == 2
    async with db.transaction() as session:
        updated = CustomerRecord("c_1", "src-1", "new@example.com", "UTC", {"tier": "silver"})
        assert await upsert_customers(session, [updated], now=T0 + timedelta(days=1)) == 1
    async with db.transaction() as session:
        one = await get_customer(session, "c_1")
        two = await get_customer(session, "c_2")
        assert await get_customer(session, "c_3") is None
    assert one is not None and two is not None
    assert (one.email, one.timezone, one.attributes) == (
        "new@example.com",
        "UTC",
        {"tier": "silver"},
    )
    assert one.created_at == T0  # set on insert only
    assert (two.email, two.timezone, two.attributes) == (
        None,
        None,
        {},
    )  # unknown zone: the spec decides


async def test_customers_upsert_in_many_chunks(db: Database) -> None:
    records = [CustomerRecord(f"c_{i}", f"src-{i}", f"{i}@example.com") for i in range(6_000)]
    async with db.transaction() as session:
        assert await upsert_customers(session, records + records[:10]) == 6_000
    async with db.transaction() as session:
        last = await get_customer(session, "c_5999")
    assert last is not None and last.email == "5999@example.com"


async def test_features_upsert_round_trip_and_never_go_back_in_time(db: Database) -> None:
    rows: list[FeatureRow] = [
        ("c_1", {"recency": 3.0, "frequency": 2, "monetary": None}, T0),
        ("c_2", {"recency": float("nan")}, T0),
    ]
    async with db.transaction() as session:
        assert await upsert_features(session, rows) == 2
    async with db.transaction() as session:
        newer = ("c_1", {"recency": 1.0}, T0 + timedelta(days=1))
        older = ("c_2", {"recency": 9.0}, T0 - timedelta(days=1))
        assert await upsert_features(session, [newer, older]) == 1
    async with db.transaction() as session:
        features = await get_features(session, ["c_1", "c_2", "c_3", "c_1"])
    assert features == {"c_1": {"recency": 1.0}, "c_2": {"recency": None}}


# ---------------------------------------------------------------- segments


WORKFLOW = "campaign:winback:c_1:e1"


async def assign(db: Database, segment: str, reason: str, crm_synced: bool) -> bool:
    async with db.transaction() as session:
        return await assign_segment(
            session,
            workflow_id=WORKFLOW,
            step_id="fallback",
            campaign_id="winback",
            customer_key="c_1",
            segment=segment,
            reason=reason,
            crm_synced=crm_synced,
            assigned_at=T0,
        )


async def test_segment_assignment_is_idempotent_and_only_marks_synced(db: Database) -> None:
    assert await assign(db, "safe", "scoring failed", crm_synced=False) is True
    assert await assign(db, "other", "again", crm_synced=False) is False
    assert await assign(db, "other", "again", crm_synced=True) is True
    assert await assign(db, "other", "again", crm_synced=True) is False
    assert await assign(db, "other", "again", crm_synced=False) is False
    async with db.transaction() as session:
        row = await session.get(SegmentAssignment, (WORKFLOW, "fallback"))
    assert row is not None
    assert (row.segment, row.reason, row.crm_synced, row.assigned_at) == (
        "safe",
        "scoring failed",
        True,
        T0,
    )


# ---------------------------------------------------------------- signal outbox


def owed(message_id: str, customer_key: str) -> OwedSignal:
    return OwedSignal(message_id, customer_key, {"event": "purchase"})


async def test_a_customers_signals_are_claimed_in_the_order_they_were_owed(db: Database) -> None:
    hold = timedelta(seconds=30)
    async with db.transaction() as session:
        first = [owed("a1", "c_1"), owed("a2", "c_1")]
        assert await owe(session, first, now=T0, held=hold) == first  # this request's own
    async with db.transaction() as session:
        # Behind a1 and a2, b1 is left due for the relay: the request could overtake them.
        later = [owed("b1", "c_1"), owed("c1", "c_2")]
        mine = await owe(session, later, now=T0 + timedelta(seconds=1), held=hold)
        assert [s.message_id for s in mine] == ["c1"]
    async with db.transaction() as session:
        # b1 is due, but what was owed before it is still held: nothing of c_1 goes yet.
        assert await claim(session, now=T0 + timedelta(seconds=2), lease=hold, limit=10) == []
    after_hold = T0 + timedelta(seconds=30.5)  # c1's hold lasts another half second
    async with db.transaction() as session:
        taken = await claim(session, now=after_hold, lease=hold, limit=2)
        assert [s.message_id for s in taken] == ["a1", "a2"]
    async with db.transaction() as session:
        # b1 waits for a1 and a2, now leased by the claim before (delivering).
        assert await claim(session, now=after_hold, lease=hold, limit=10) == []
