"""The spec's interpreter features on the time-skipping server, with real activities:
waits for events and local times, exit events, the conversion goal, holdout, the frequency
cap (also under concurrency, on SQLite and PostgreSQL) and quiet hours."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.campaign.crm import CrmActivities
from activities.campaign.fallback import FallbackActivities
from activities.campaign.gate import reservation_ttl
from cohortflow.crm.client import CrmClient
from cohortflow.schedule import next_local_time
from cohortflow.spec import CampaignSpec
from cohortflow.storage import audit, customers, outbound, reservations
from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow, OutboundReservation
from tests.harness import (
    Harness,
    Sandbox,
    consenting_customer,
    crm_env,
    crm_path,
    save_history_if_asked,
    serve_sandbox,
    wait_for_state,
)
from workflows.campaign.activity_io import CrmOutcome, CrmWriteInput, FallbackInput
from workflows.campaign.contract import SA, AuditKind, CampaignState, idempotency_key
from workflows.campaign.interpreter import holdout_variant, score_band
from workflows.campaign.messages import CampaignResult, CustomerEvent
from workflows.campaign.workflow import CampaignWorkflow


def document(steps: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return {
        "campaign_id": f"f{uuid.uuid4().hex[:10]}",
        "name": "Feature test",
        "owner": "crm-team",
        "entry_cohort": "test_cohort",
        "safe_default_segment": "nurture_default",
        "steps": steps,
        **settings,
    }


EVENT_DRIP = [
    # The sandbox CRM only enrols or lists a contact it knows: create it first.
    {"id": "label", "type": "crm", "action": "set_properties", "properties": {"k": "hello"}},
    {
        "id": "hold",
        "type": "wait",
        "event": "purchase",
        "timeout": "P3D",
        "on_event": "thanks",
        "on_timeout": "nudge",
    },
    {"id": "nudge", "type": "crm", "action": "add_to_list", "list_id": "nudge", "next": "done"},
    {"id": "thanks", "type": "crm", "action": "set_properties", "properties": {"k": "thanks"}},
    {"id": "done", "type": "exit"},
]


def purchase(at: datetime) -> CustomerEvent:
    return CustomerEvent(event="purchase", occurred_at=at.isoformat(), message_id=uuid.uuid4().hex)


async def server_now(h: Harness) -> datetime:
    """The time-skipping server's clock, which runs ahead of the wall clock after skips."""
    assert h.env is not None
    return await h.env.get_current_time()


async def audit_rows(h: Harness, workflow_id: str, kind: str) -> list[dict[str, Any]]:
    async with h.db.transaction() as session:
        payloads = await session.scalars(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == workflow_id, AuditRow.kind == kind
            )
        )
        return [json.loads(p) for p in payloads]


async def bought_while_waiting(
    harness: Harness, spec: CampaignSpec, version: int
) -> tuple[WorkflowHandle[Any, CampaignResult], CampaignResult]:
    """Launch the campaign for a new customer, who buys once it waits; its handle and end."""
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        await handle.signal(CampaignWorkflow.customer_event, purchase(await server_now(harness)))
        return handle, await harness.result(handle)


async def workflow_span(handle: WorkflowHandle[Any, CampaignResult]) -> timedelta:
    events = [e async for e in handle.fetch_history_events()]
    return events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()


async def started_at(handle: WorkflowHandle[Any, CampaignResult]) -> datetime:
    async for event in handle.fetch_history_events():
        return event.event_time.ToDatetime().replace(tzinfo=UTC)
    raise AssertionError("no history")


async def set_timezone(h: Harness, key: str, zone: str) -> None:
    async with h.db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(key, f"src-{key}", f"{key}@example.com", zone)]
        )


async def test_an_awaited_event_takes_the_on_event_branch(harness: Harness) -> None:
    spec, version = await harness.apply(document(EVENT_DRIP))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.WAITING)
        assert status.waiting_for_event == "purchase"
        await handle.signal(CampaignWorkflow.customer_event, purchase(await server_now(harness)))
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["label", "hold", "thanks", "done"]
    assert await audit_rows(harness, handle.id, "event_wait") == [
        {"event": "purchase", "outcome": "event"}
    ]
    assert await workflow_span(handle) < timedelta(hours=1)
    await save_history_if_asked(handle, "event_wait_thanked")


async def test_without_the_event_the_wait_times_out_into_on_timeout(harness: Harness) -> None:
    spec, version = await harness.apply(document(EVENT_DRIP))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        # An event the wait does not name changes nothing.
        await handle.signal(
            CampaignWorkflow.customer_event, CustomerEvent("page_view", "not a time")
        )
        result = await harness.result(handle)
    assert result.steps_run == ["label", "hold", "nudge", "done"]
    assert await workflow_span(handle) >= timedelta(days=3)
    async with CrmClient(harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None and contact.properties["k"] == "hello"


async def test_an_exit_event_ends_a_long_wait_at_once_and_the_conversion_is_recorded(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(
        document(
            [{"id": "hold", "type": "wait", "duration": "P30D"}, {"id": "done", "type": "exit"}],
            exit_on_events=["purchase"],
            conversion={"event": "purchase", "window": "P14D"},
        )
    )
    handle, result = await bought_while_waiting(harness, spec, version)
    assert (result.state, result.reason) == (CampaignState.EXITED, "event purchase")
    assert await workflow_span(handle) < timedelta(hours=1)
    converted = await audit_rows(harness, handle.id, "converted")
    assert len(converted) == 1 and converted[0]["variant"] == "treatment"


async def test_the_last_write_records_the_conversion_and_the_finish_it_leads_to(
    harness: Harness,
) -> None:
    # Nothing acts after the label: its write carries the conversion heard during the wait
    # and the finish, in its own transaction, and no local activity records them after it.
    spec, version = await harness.apply(
        document(
            [
                {"id": "hold", "type": "wait", "duration": "PT1H"},
                {
                    "id": "label",
                    "type": "crm",
                    "action": "set_properties",
                    "properties": {"k": "v"},
                },
                {"id": "done", "type": "exit"},
            ],
            conversion={"event": "purchase", "window": "P14D"},
        )
    )
    handle, result = await bought_while_waiting(harness, spec, version)
    assert (result.state, result.reason) == (CampaignState.COMPLETED, "reached exit step done")
    async with harness.db.transaction() as session:
        rows = await session.execute(
            select(AuditRow.step_id, AuditRow.kind)
            .where(AuditRow.workflow_id == handle.id)
            .order_by(AuditRow.seq)
        )
        chain = [(step, kind) for step, kind in rows]
    assert chain[-3:] == [("label", "crm_written"), ("goal", "converted"), ("finish", "finished")]
    finished = await audit_rows(harness, handle.id, "finished")
    assert finished == [
        {"state": "completed", "reason": "reached exit step done", "variant": "treatment"}
    ]
    types = [e.event_type async for e in handle.fetch_history_events()]
    written = len(types) - types[::-1].index(EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert EventType.EVENT_TYPE_MARKER_RECORDED not in types[written:]
    await save_history_if_asked(handle, "last_write_converted_finished")


async def test_a_purchase_outside_the_conversion_window_is_not_a_conversion(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(
        document(
            [{"id": "hold", "type": "wait", "duration": "P1D"}, {"id": "done", "type": "exit"}],
            conversion={"event": "purchase", "window": "P14D"},
        )
    )
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        await handle.signal(
            CampaignWorkflow.customer_event,
            purchase(await server_now(harness) - timedelta(days=30)),
        )
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    assert await audit_rows(harness, handle.id, "converted") == []


async def test_a_wait_until_a_local_time_uses_the_customers_time_zone(harness: Harness) -> None:
    spec, version = await harness.apply(
        document(
            [{"id": "morning", "type": "wait", "until": "09:00"}, {"id": "done", "type": "exit"}]
        )
    )
    key = await harness.customer()
    await set_timezone(harness, key, "Asia/Tokyo")
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.WAITING)
        start = await started_at(handle)
        result = await harness.result(handle)
    expected = next_local_time(start, ZoneInfo("Asia/Tokyo"), "09:00")
    assert datetime.fromisoformat(status.waiting_until) == expected.replace(microsecond=0)
    assert result.state == CampaignState.COMPLETED
    span = await workflow_span(handle)
    assert abs((start + span) - expected) < timedelta(seconds=5)


async def test_an_outbound_step_due_in_quiet_hours_waits_for_the_window_to_open(
    harness: Harness,
) -> None:
    now = (await server_now(harness)).astimezone(ZoneInfo("Europe/Berlin"))
    start, end = now - timedelta(hours=1), now + timedelta(hours=2)
    spec, version = await harness.apply(
        document(
            [{"id": "label", "type": "crm", "action": "set_properties", "properties": {"q": "1"}}],
            quiet_hours={"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")},
        )
    )
    key = await harness.customer()
    await set_timezone(harness, key, "Europe/Berlin")
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.WAITING)
        assert status.transitions[-1].endswith(f"quiet hours until {status.waiting_until}"), (
            status.transitions
        )
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    events = [e async for e in handle.fetch_history_events()]
    crm = next(
        e
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "crm_write"
    )
    opened = end.replace(second=0, microsecond=0)
    assert crm.event_time.ToDatetime().replace(tzinfo=UTC) >= opened


async def test_the_frequency_cap_counts_every_campaign_and_follows_on_capped(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(
        document(
            [
                {
                    "id": "label",
                    "type": "crm",
                    "action": "set_properties",
                    "properties": {"capped": "no"},
                    "on_capped": "skipped",
                },
                {"id": "done", "type": "exit"},
                {"id": "skipped", "type": "exit", "outcome": "exited"},
            ],
            frequency_cap={"max_actions": 2, "per": "P7D"},
        )
    )
    key = await harness.customer()
    async with harness.db.transaction() as session:
        for other in ("a", "b"):  # two outbound actions of another campaign this week
            await audit.append_audit(
                session,
                audit.AuditEvent(
                    f"campaign:other:{key}:{other}", "x", "crm_written", "other", key, {}
                ),
            )
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.steps_run == ["label", "skipped"]
    assert result.state == CampaignState.EXITED
    capped = await audit_rows(harness, handle.id, "frequency_capped")
    assert capped == [
        {
            "action": "set_properties",
            "recent_actions": 2,
            "max_actions": 2,
            "window_seconds": 604800.0,
        }
    ]
    async with CrmClient(harness.sandbox.url) as crm:
        assert await crm.get_contact(key) is None


async def test_under_the_cap_the_action_is_written(harness: Harness) -> None:
    spec, version = await harness.apply(
        document(
            [{"id": "label", "type": "crm", "action": "set_properties", "properties": {"c": "1"}}],
            frequency_cap={"max_actions": 1, "per": "P7D"},
        )
    )
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.steps_run == ["label"]
    assert len(await audit_rows(harness, handle.id, "crm_written")) == 1


# ---------------------------------------------------------------- the cap under concurrency
# crm_write called directly, many at once, on SQLite and PostgreSQL, against the sandbox CRM.

WEEK_SECONDS = 7 * 24 * 3600.0


@pytest.fixture(scope="module")
def slow_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The sandbox CRM answering after 100 ms, as a real CRM might: every concurrent gate
    is decided while the first writes are still in flight, so a racy cap fails every time."""
    with serve_sandbox(
        tmp_path_factory.mktemp("slow-crm") / "crm.db", rate_limit=10_000, latency_ms=100
    ) as crm:
        yield crm


@contextlib.asynccontextmanager
async def activities_on(db: Database, crm_url: str, tmp_path: Path) -> AsyncIterator[CrmActivities]:
    """The real activities on ``db`` and a sandbox CRM (crm_write needs no model)."""
    batcher = crm_path(db, crm_url)
    try:
        yield CrmActivities(db, batcher)
    finally:
        await batcher.aclose()


@pytest.fixture
async def crm_activities(
    db: Database, sandbox: Sandbox, tmp_path: Path
) -> AsyncIterator[CrmActivities]:
    """The real activities on ``db`` and the session's sandbox CRM."""
    async with activities_on(db, sandbox.url, tmp_path) as activities:
        yield activities


def write_input(key: str, campaign: str, cap: int) -> CrmWriteInput:
    return CrmWriteInput(
        workflow_id=f"campaign:{campaign}:{key}:1",
        step_id="label",
        campaign_id=campaign,
        customer_key=key,
        action="set_properties",
        channel="email",
        purpose="marketing",
        properties={"sent_by": campaign},
        cap_max_actions=cap,
        cap_window_seconds=WEEK_SECONDS,
    )


async def kinds_for(db: Database, key: str) -> Counter[str]:
    async with db.transaction() as session:
        return Counter(row.kind for row in await audit.audit_for_customer(session, key))


async def in_flight(db: Database, key: str) -> list[tuple[str, str]]:
    """The (workflow, step) of the customer's live reservations."""
    async with db.transaction() as session:
        live = await reservations.live_reservations(session, key)
    return [(r.workflow_id, r.step_id) for r in live]


async def counted(db: Database, key: str) -> int:
    """The customer's outbound actions this week, as the cap counts them."""
    since = datetime.now(UTC) - timedelta(seconds=WEEK_SECONDS)
    async with db.transaction() as session:
        return await outbound.outbound_since(
            session, key, since, written_kind=AuditKind.CRM_WRITTEN, exclude=None
        )


async def fail_once(
    sandbox: Sandbox, activities: CrmActivities, inp: CrmWriteInput, status: int
) -> ApplicationError:
    """Run ``crm_write`` for ``inp`` while the CRM answers ``status``; the error it raised."""
    sandbox.inject(status)
    try:
        with pytest.raises(ApplicationError) as raised:
            await crm_env().run(activities.crm_write, inp)
    finally:
        sandbox.clear()
    return raised.value


async def crm_requests(sandbox: Sandbox, inputs: list[CrmWriteInput]) -> int:
    """How many requests the sandbox CRM received for these actions."""
    counts = await asyncio.gather(
        *(
            asyncio.to_thread(sandbox.attempts, idempotency_key(i.workflow_id, i.step_id))
            for i in inputs
        )
    )
    return sum(counts)


async def test_concurrent_campaigns_never_pass_the_cap_together(
    db: Database, slow_sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox = slow_sandbox
    key = await consenting_customer(db)
    inputs = [write_input(key, f"race{i}", cap=3) for i in range(8)]
    env = crm_env()
    async with activities_on(db, sandbox.url, tmp_path) as crm_activities:
        results = await asyncio.gather(*(env.run(crm_activities.crm_write, i) for i in inputs))
    assert Counter(r.outcome for r in results) == {CrmOutcome.WRITTEN: 3, CrmOutcome.CAPPED: 5}
    assert await crm_requests(sandbox, inputs) == 3
    kinds = await kinds_for(db, key)
    assert (kinds["crm_written"], kinds["frequency_capped"]) == (3, 5)

    # A retry of a written action is the same action: never capped, and counted once.
    written = next(i for i, r in zip(inputs, results, strict=True) if r.outcome == "written")
    async with activities_on(db, sandbox.url, tmp_path) as crm_activities:
        again = await crm_env(attempt=2).run(crm_activities.crm_write, written)
        late = await env.run(crm_activities.crm_write, write_input(key, "late", cap=3))
    assert again.outcome == CrmOutcome.WRITTEN
    assert (await kinds_for(db, key))["crm_written"] == 3
    assert late.outcome == CrmOutcome.CAPPED
    assert late.detail.startswith("3 outbound actions")
    assert await in_flight(db, key) == []


async def test_an_action_in_flight_holds_its_slot_until_it_is_written(
    db: Database, sandbox: Sandbox, crm_activities: CrmActivities
) -> None:
    key = await consenting_customer(db)
    first, second = (write_input(key, f"slot{i}", cap=1) for i in range(2))
    error = await fail_once(sandbox, crm_activities, first, 503)
    assert error.type == "CrmUnavailable"
    assert not error.non_retryable
    # The failed attempt may have reached the CRM and its retry will write: it keeps the slot.
    assert await in_flight(db, key) == [(first.workflow_id, "label")]
    assert await counted(db, key) == 1
    capped = await crm_env().run(crm_activities.crm_write, second)
    assert capped.outcome == CrmOutcome.CAPPED
    # The retry finds its own reservation: not capped, and counted once once written.
    retried = await crm_env(attempt=2).run(crm_activities.crm_write, first)
    assert retried.outcome == CrmOutcome.WRITTEN
    assert await in_flight(db, key) == []
    assert await counted(db, key) == 1
    assert await crm_requests(sandbox, [first, second]) == 2  # the 503 and the retry
    kinds = await kinds_for(db, key)
    assert (kinds["crm_written"], kinds["frequency_capped"]) == (1, 1)


async def test_an_uncapped_campaigns_write_in_flight_counts_for_a_capped_one(
    db: Database, sandbox: Sandbox, crm_activities: CrmActivities
) -> None:
    key = await consenting_customer(db)
    uncapped, capped = write_input(key, "free", cap=0), write_input(key, "capped", cap=1)
    await fail_once(sandbox, crm_activities, uncapped, 503)
    result = await crm_env().run(crm_activities.crm_write, capped)
    assert result.outcome == CrmOutcome.CAPPED
    # An uncapped campaign is never capped itself.
    assert (await crm_env(attempt=2).run(crm_activities.crm_write, uncapped)).outcome == "written"


async def test_a_refused_action_gives_its_slot_back(
    db: Database, sandbox: Sandbox, crm_activities: CrmActivities
) -> None:
    key = await consenting_customer(db)
    first, second = (write_input(key, f"refused{i}", cap=1) for i in range(2))
    error = await fail_once(sandbox, crm_activities, first, 400)
    assert (error.type, error.non_retryable) == ("CrmRejected", True)
    assert await in_flight(db, key) == []
    written = await crm_env().run(crm_activities.crm_write, second)
    assert written.outcome == CrmOutcome.WRITTEN


async def test_the_fallback_gives_the_failed_actions_slot_back(
    db: Database, sandbox: Sandbox, crm_activities: CrmActivities
) -> None:
    key = await consenting_customer(db)
    first, second = (write_input(key, f"gaveup{i}", cap=1) for i in range(2))
    await fail_once(sandbox, crm_activities, first, 503)
    # The spec's deadline for the action passed: the workflow puts the customer in the safe
    # default segment.
    batcher = crm_path(db, sandbox.url)
    try:
        await crm_env().run(
            FallbackActivities(db, batcher).resolve_fallback,
            FallbackInput(
                first.workflow_id, "label", first.campaign_id, key, "nurture", "crm_failed"
            ),
        )
    finally:
        await batcher.aclose()
    assert await in_flight(db, key) == []
    assert (await crm_env().run(crm_activities.crm_write, second)).outcome == "written"


async def test_an_expired_reservation_stops_counting_and_its_retry_is_checked_again(
    db: Database, sandbox: Sandbox, crm_activities: CrmActivities
) -> None:
    key = await consenting_customer(db)
    first, second = (write_input(key, f"expired{i}", cap=1) for i in range(2))
    await fail_once(sandbox, crm_activities, first, 503)
    async with db.transaction() as session:  # its workflow vanished long ago
        await session.execute(
            update(OutboundReservation)
            .where(OutboundReservation.customer_key == key)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert await counted(db, key) == 0
    assert (await crm_env().run(crm_activities.crm_write, second)).outcome == "written"
    late = await crm_env(attempt=2).run(crm_activities.crm_write, first)
    assert late.outcome == CrmOutcome.CAPPED
    # The lapsed reservation was removed on the way, not merely ignored as expired.
    async with db.transaction() as session:
        left = await session.scalars(
            select(OutboundReservation.step_id).where(OutboundReservation.customer_key == key)
        )
        assert list(left) == []


def test_a_reservation_lasts_one_attempt_and_the_wait_for_the_next() -> None:
    assert reservation_ttl(crm_env().info) == timedelta(minutes=13)
    unknown = dataclasses.replace(
        ActivityEnvironment().info, start_to_close_timeout=None, schedule_to_close_timeout=None
    )
    assert reservation_ttl(unknown) == timedelta(seconds=60 + 100 + 60)


def control_key(campaign_id: str, percent: float) -> str:
    while True:
        key = f"c_{uuid.uuid4().hex[:24]}"
        if holdout_variant(campaign_id, key, percent) == "control":
            return key


async def run_for_a_control_customer(
    harness: Harness, spec: CampaignSpec, version: int
) -> tuple[str, WorkflowHandle[Any, CampaignResult], CampaignResult]:
    """Store a customer the 20% holdout puts in control and run the campaign to its end."""
    key = control_key(spec.campaign_id, 20)
    async with harness.db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(key, f"src-{key}", f"{key}@example.com")]
        )
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        return key, handle, await harness.result(handle)


async def test_a_control_customer_gets_no_outbound_action_but_runs_to_the_end(
    harness: Harness,
) -> None:
    doc = document(
        [
            {"id": "label", "type": "crm", "action": "set_properties", "properties": {"h": "1"}},
            {"id": "hold", "type": "wait", "duration": "P2D"},
            {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "s"},
        ],
        holdout_percent=20,
    )
    spec, version = await harness.apply(doc)
    key, handle, result = await run_for_a_control_customer(harness, spec, version)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["label", "hold", "enrol"]
    assert await audit_rows(harness, handle.id, "variant_assigned") == [
        {"variant": "control", "holdout_percent": 20.0}
    ]
    assert len(await audit_rows(harness, handle.id, "holdout_skipped")) == 2
    assert await audit_rows(harness, handle.id, "crm_written") == []
    description = await harness.describe(handle)
    assert description.typed_search_attributes.get(SA.VARIANT) == "control"
    async with CrmClient(harness.sandbox.url) as crm:
        assert await crm.get_contact(key) is None


async def test_a_control_customer_is_never_put_before_an_operator(harness: Harness) -> None:
    spec, version = await harness.apply(
        document(
            [
                {"id": "approve", "type": "approval", "reason": "offer"},
                {
                    "id": "label",
                    "type": "crm",
                    "action": "set_properties",
                    "properties": {"h": "1"},
                },
            ],
            holdout_percent=20,
            sensitive=True,
        )
    )
    _, handle, result = await run_for_a_control_customer(harness, spec, version)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["approve", "label"]
    assert await audit_rows(harness, handle.id, "approval_requested") == []
    assert await audit_rows(harness, handle.id, "holdout_skipped") == [
        {"action": "approval"},
        {"action": "set_properties"},
    ]
    states = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    assert not any(b"awaiting_approval" in a.indexed_fields["CampaignState"].data for a in states)
    await save_history_if_asked(handle, "control_skips_approval")


async def test_a_stratified_arm_is_drawn_in_the_customers_score_band(harness: Harness) -> None:
    spec, version = await harness.apply(
        document(
            [
                {"id": "score", "type": "score", "models": ["churn"]},
                {"id": "done", "type": "exit"},
            ],
            holdout_percent=50,
            holdout_stratify={"score": "churn", "bands": [0.5]},
        )
    )
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await harness.result(handle)
        status = await handle.query(CampaignWorkflow.status)
    band = score_band(status.scores["churn"], [0.5])
    expected = holdout_variant(spec.campaign_id, key, 50, band)
    assigned = await audit_rows(harness, handle.id, "variant_assigned")
    assert assigned == [{"variant": expected, "holdout_percent": 50.0, "stratum": f"churn {band}"}]
    description = await harness.describe(handle)
    assert description.typed_search_attributes.get(SA.VARIANT) == expected


async def test_a_crm_step_a_loop_comes_back_to_writes_each_time(harness: Harness) -> None:
    spec, version = await harness.apply(
        document(
            [
                {
                    "id": "label",
                    "type": "crm",
                    "action": "set_properties",
                    "properties": {"a": "1"},
                },
                {
                    "id": "hold",
                    "type": "wait",
                    "event": "purchase",
                    "timeout": "P1D",
                    "on_event": "done",
                    "on_timeout": "nudge",
                },
                {
                    "id": "nudge",
                    "type": "crm",
                    "action": "add_to_list",
                    "list_id": "nudges",
                    "next": "hold",
                },
                {"id": "done", "type": "exit"},
            ]
        )
    )
    key = await harness.customer()
    assert harness.env is not None
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        for _ in range(2):  # two unanswered days: two nudges
            await wait_for_state(handle, CampaignState.WAITING)
            await harness.env.sleep(timedelta(days=1, minutes=1))
        await wait_for_state(handle, CampaignState.WAITING)
        await handle.signal(CampaignWorkflow.customer_event, purchase(await server_now(harness)))
        result = await harness.result(handle)
    assert result.steps_run == ["label", "hold", "nudge", "hold", "nudge", "hold", "done"]
    # Each visit has its own idempotency key and audit rows: the CRM saw two writes.
    for visit in ("nudge", "nudge#2"):
        assert harness.sandbox.attempts(f"{handle.id}:{visit}") == 1, visit
    async with harness.db.transaction() as session:
        written = await session.scalars(
            select(AuditRow.step_id).where(
                AuditRow.workflow_id == handle.id, AuditRow.kind == "crm_written"
            )
        )
        assert sorted(written) == ["label", "nudge", "nudge#2"]
    assert [r["outcome"] for r in await audit_rows(harness, handle.id, "event_wait")] == [
        "timeout",
        "timeout",
        "event",
    ]
    await save_history_if_asked(handle, "loop_nudged_twice")
