"""The spec's interpreter features on the time-skipping server, with real activities:
waits for events and local times, exit events, the conversion goal, holdout, the frequency
cap and quiet hours."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from cohortflow.crm.client import CrmClient
from cohortflow.schedule import next_local_time
from cohortflow.storage import audit, customers
from cohortflow.storage.tables import AuditRow
from tests.harness import Harness, wait_for_state
from workflows.campaign import holdout_variant, score_band
from workflows.messages import SA, CampaignResult, CampaignState, CustomerEvent


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
        await handle.signal("customer_event", purchase(await server_now(harness)))
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["label", "hold", "thanks", "done"]
    assert await audit_rows(harness, handle.id, "event_wait") == [
        {"event": "purchase", "outcome": "event"}
    ]
    assert await workflow_span(handle) < timedelta(hours=1)


async def test_without_the_event_the_wait_times_out_into_on_timeout(harness: Harness) -> None:
    spec, version = await harness.apply(document(EVENT_DRIP))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        # An event the wait does not name changes nothing.
        await handle.signal("customer_event", CustomerEvent("page_view", "not a time"))
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
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        await handle.signal("customer_event", purchase(await server_now(harness)))
        result = await harness.result(handle)
    assert (result.state, result.reason) == (CampaignState.EXITED, "event purchase")
    assert await workflow_span(handle) < timedelta(hours=1)
    converted = await audit_rows(harness, handle.id, "converted")
    assert len(converted) == 1 and converted[0]["variant"] == "treatment"


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
            "customer_event", purchase(await server_now(harness) - timedelta(days=30))
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


def control_key(campaign_id: str, percent: float) -> str:
    while True:
        key = f"c_{uuid.uuid4().hex[:24]}"
        if holdout_variant(campaign_id, key, percent) == "control":
            return key


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
    key = control_key(spec.campaign_id, 20)
    async with harness.db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(key, f"src-{key}", f"{key}@example.com")]
        )
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["label", "hold", "enrol"]
    assert await audit_rows(harness, handle.id, "variant_assigned") == [
        {"variant": "control", "holdout_percent": 20.0}
    ]
    assert len(await audit_rows(harness, handle.id, "holdout_skipped")) == 2
    assert await audit_rows(harness, handle.id, "crm_written") == []
    description = await handle.describe()
    assert description.typed_search_attributes.get(SA.VARIANT) == "control"
    async with CrmClient(harness.sandbox.url) as crm:
        assert await crm.get_contact(key) is None


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
        status = await handle.query("status")
    band = score_band(status["scores"]["churn"], [0.5])
    expected = holdout_variant(spec.campaign_id, key, 50, band)
    assigned = await audit_rows(harness, handle.id, "variant_assigned")
    assert assigned == [{"variant": expected, "holdout_percent": 50.0, "stratum": f"churn {band}"}]
    description = await handle.describe()
    assert description.typed_search_attributes.get(SA.VARIANT) == expected
