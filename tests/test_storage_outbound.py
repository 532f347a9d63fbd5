"""What the frequency cap and quiet hours read from the store, on both databases: outbound
actions written and in flight, retries of a written action, and the customer's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cohortflow.storage import outbound, reservations
from cohortflow.storage.audit import AuditEvent, append_audit
from cohortflow.storage.customers import CustomerRecord, timezone_name, upsert_customers
from cohortflow.storage.db import Database
from workflows.campaign.contract import AuditKind

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEY = "c_1"
WRITTEN = AuditKind.CRM_WRITTEN


async def append(
    db: Database, workflow: str, step: str, kind: str, at: datetime, key: str = KEY
) -> None:
    async with db.transaction() as session:
        await append_audit(
            session,
            AuditEvent(
                workflow_id=workflow,
                step_id=step,
                kind=kind,
                campaign_id="camp",
                customer_key=key,
                payload={},
            ),
            now=at,
        )


async def reserve(db: Database, workflow: str, step: str, expires_at: datetime) -> None:
    async with db.transaction() as session:
        await reservations.reserve(
            session,
            workflow_id=workflow,
            step_id=step,
            campaign_id="camp",
            customer_key=KEY,
            expires_at=expires_at,
            now=T0,
        )


async def count(
    db: Database, since: datetime, exclude: tuple[str, str] | None = None, now: datetime = T0
) -> int:
    async with db.transaction() as session:
        return await outbound.outbound_since(
            session, KEY, since, written_kind=WRITTEN, exclude=exclude, now=now
        )


async def test_outbound_since_counts_written_rows_of_the_kind_since_the_cut_off(
    db: Database,
) -> None:
    await append(db, "wf-old", "label", WRITTEN, T0 - timedelta(days=8))
    await append(db, "wf-a", "label", WRITTEN, T0 - timedelta(days=2))
    await append(db, "wf-b", "enrol", WRITTEN, T0 - timedelta(hours=1))
    await append(db, "wf-b", "score", AuditKind.SCORED, T0 - timedelta(hours=1))
    await append(db, "wf-c", "label", WRITTEN, T0 - timedelta(hours=1), key="c_other")
    assert await count(db, T0 - timedelta(days=7)) == 2
    assert await count(db, T0 - timedelta(days=9)) == 3
    assert await count(db, T0 - timedelta(days=7), exclude=("wf-b", "enrol")) == 1


async def test_outbound_since_adds_live_reservations_and_counts_an_action_once(
    db: Database,
) -> None:
    since = T0 - timedelta(days=7)
    await reserve(db, "wf-a", "label", T0 + timedelta(minutes=5))
    await reserve(db, "wf-b", "label", T0 + timedelta(minutes=5))
    assert await count(db, since) == 2
    assert await count(db, since, exclude=("wf-a", "label")) == 1
    # Expired at `now`: no longer in flight.
    assert await count(db, since, now=T0 + timedelta(minutes=6)) == 0
    # Written while its reservation is still there: the row counts it, the reservation not.
    await append(db, "wf-a", "label", WRITTEN, T0)
    assert await count(db, since) == 2


async def test_already_written_is_true_only_for_that_steps_written_row(db: Database) -> None:
    await append(db, "wf-a", "label", WRITTEN, T0)
    await append(db, "wf-a", "score", AuditKind.SCORED, T0)
    async with db.transaction() as session:
        assert await outbound.already_written(session, "wf-a", "label", written_kind=WRITTEN)
        assert not await outbound.already_written(session, "wf-a", "score", written_kind=WRITTEN)
        assert not await outbound.already_written(session, "wf-b", "label", written_kind=WRITTEN)


async def test_timezone_name_prefers_attributes_then_the_column(db: Database) -> None:
    records = [
        CustomerRecord("c_attr", "a", None, "Europe/Paris", {"timezone": "Asia/Tokyo"}),
        CustomerRecord("c_col", "b", None, "Europe/Paris"),
        CustomerRecord("c_none", "c", None),
    ]
    async with db.transaction() as session:
        await upsert_customers(session, records, now=T0)
        names = [await timezone_name(session, r.customer_key) for r in records]
        unknown = await timezone_name(session, "c_unknown")
    assert names == ["Asia/Tokyo", "Europe/Paris", ""]
    assert unknown == ""
