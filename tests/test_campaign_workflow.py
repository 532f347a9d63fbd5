"""CampaignWorkflow on the time-skipping server with real activities, database, model and CRM."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from activities.campaign.crm import CrmActivities
from cohortflow.crm.client import CrmClient
from cohortflow.storage import approvals, consent
from cohortflow.storage.tables import AuditRow, CampaignSpecVersion, SegmentAssignment
from tests.harness import (
    Harness,
    save_history_if_asked,
    spec_document,
    wait_for_state,
    without_approval,
)
from workflows.campaign.activity_io import CrmWriteInput, CrmWriteResult
from workflows.campaign.contract import SA, CampaignState
from workflows.campaign.interpreter import approval_id_for
from workflows.campaign.messages import (
    CampaignResult,
    CohortExited,
    DecideRequest,
    PendingApproval,
)
from workflows.campaign.state import CampaignInput, RunState
from workflows.campaign.workflow import CampaignWorkflow


async def audit_count(h: Harness, workflow_id: str, kind: str) -> int:
    async with h.db.transaction() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(AuditRow)
                .where(AuditRow.workflow_id == workflow_id, AuditRow.kind == kind)
            )
            or 0
        )


async def label_once_through_a_fault(
    harness: Harness, status: int, retry_after: float = 1.0, count: int = 1, **fields: Any
) -> tuple[str, WorkflowHandle[Any, CampaignResult], CampaignResult]:
    """Score and label one customer while the CRM answers ``status`` to the first ``count``
    requests; ``fields`` are set on the spec."""
    document = without_approval(spec_document())
    document["steps"] = [s for s in document["steps"] if s["id"] in ("score", "label")]
    spec, version = await harness.apply({**document, **fields})
    key = await harness.customer()
    harness.sandbox.inject(status, count=count, retry_after=retry_after)
    try:
        async with harness.workers():
            handle = await harness.launch(spec, version, key)
            result = await harness.result(handle)
    finally:
        harness.sandbox.clear()
    return key, handle, result


async def test_unanswered_approval_expires_after_its_days_in_well_under_a_second(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(spec_document())
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert status.pending_approval is not None
        started = time.monotonic()
        result = await harness.result(handle)
        elapsed = time.monotonic() - started
    assert result.state == CampaignState.REJECTED
    assert "expired" in result.reason
    assert elapsed < 2.0, f"three skipped days took {elapsed:.2f}s of wall time"
    events = [e async for e in handle.fetch_history_events()]
    workflow_time = events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()
    assert workflow_time >= timedelta(days=3)
    async with harness.db.transaction() as session:
        row = await approvals.get_approval(session, status.pending_approval.approval_id)
    assert row is not None and row.status == "expired"
    assert await audit_count(harness, handle.id, "approval_expired") == 1


async def test_decide_refuses_the_requester_then_an_approval_completes_the_campaign(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(spec_document())
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert status.pending_approval is not None
        approval_id = status.pending_approval.approval_id
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                CampaignWorkflow.decide,
                DecideRequest(approval_id, True, "crm-team", "self-approval", ["approver"]),
            )
        assert "cannot approve" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update(
                CampaignWorkflow.decide, DecideRequest("apr_unknown", True, "al", "x", ["approver"])
            )
        await handle.execute_update(
            CampaignWorkflow.decide, DecideRequest(approval_id, True, "alice", "ok", ["approver"])
        )
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    assert result.steps_run == ["score", "route", "approve", "label", "pause", "enrol"]
    async with harness.db.transaction() as session:
        row = await approvals.get_approval(session, approval_id)
    assert row is not None and row.status == "approved" and row.decided_by == "alice"
    async with CrmClient(harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None
    assert contact.properties["cohort_label"] == "test_cohort"
    assert contact.sequences == ["winback"]
    await save_history_if_asked(handle, "approved_completed")


async def test_consent_revoked_in_the_store_during_a_wait_blocks_the_next_outbound_step(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(without_approval(spec_document()))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        # Only the store changes: no signal reaches the workflow.
        async with harness.db.transaction() as session:
            await consent.set_consent(session, key, "email", "marketing", False, "tests")
        result = await harness.result(handle)
    assert result.state == CampaignState.CONSENT_BLOCKED
    async with CrmClient(harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None and "cohort_label" in contact.properties
    assert contact.sequences == []
    assert await audit_count(harness, handle.id, "consent_blocked") == 1


async def test_cohort_exit_interrupts_a_wait_at_once(harness: Harness) -> None:
    spec, version = await harness.apply(without_approval(spec_document()))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        await wait_for_state(handle, CampaignState.WAITING)
        await handle.signal(CampaignWorkflow.cohort_exited, CohortExited(cohort_id="test_cohort"))
        result = await harness.result(handle)
    assert result.state == CampaignState.EXITED
    events = [e async for e in handle.fetch_history_events()]
    workflow_time = events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()
    assert workflow_time < timedelta(hours=1), "the one-hour wait ran to its end"


async def test_corrupted_model_file_sends_the_campaign_to_the_fallback(
    harness: Harness, tmp_path: Path
) -> None:
    corrupted = tmp_path / "models"
    shutil.copytree(harness.registry_root, corrupted)
    for model_file in corrupted.glob("churn/*/model.json"):
        model_file.write_text('{"learner": "garbage')
    harness.registry_root = corrupted
    spec, version = await harness.apply(without_approval(spec_document()))
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.state == CampaignState.FALLBACK
    assert result.reason.startswith("scoring_failed: ")
    description = await harness.describe(handle)
    assert description.typed_search_attributes.get(SA.FALLBACK_REASON) == "scoring_failed"
    assert description.typed_search_attributes.get(SA.CAMPAIGN_STATE) == "fallback"
    async with harness.db.transaction() as session:
        segment = await session.scalar(
            select(SegmentAssignment.segment).where(SegmentAssignment.workflow_id == handle.id)
        )
    assert segment == "nurture_default"
    assert await audit_count(harness, handle.id, "fallback") == 1


async def test_crm_429_then_200_writes_one_record_after_retry_after_in_workflow_time(
    harness: Harness,
) -> None:
    key, handle, result = await label_once_through_a_fault(harness, 429, retry_after=30)
    assert result.state == CampaignState.COMPLETED
    assert harness.sandbox.attempts(f"{handle.id}:label") == 2
    async with CrmClient(harness.sandbox.url) as crm:
        contact = await crm.get_contact(key)
    assert contact is not None and contact.properties["cohort_label"] == "test_cohort"
    events = [e async for e in handle.fetch_history_events()]
    crm_scheduled = next(
        e
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "crm_write"
    )
    started = next(
        e
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.scheduled_event_id == crm_scheduled.event_id
    )
    assert started.activity_task_started_event_attributes.attempt == 2
    gap = started.event_time.ToDatetime() - crm_scheduled.event_time.ToDatetime()
    assert gap >= timedelta(seconds=30), f"retried after {gap}, before Retry-After"
    assert await audit_count(harness, handle.id, "crm_written") == 1


async def test_an_activity_that_fails_after_its_audit_write_leaves_one_audit_row(
    harness: Harness,
) -> None:
    # crm_write appends its consent row, then the CRM answers 503: the activity fails and
    # Temporal runs it again, which appends the same (workflow, step, kind) once more.
    _, handle, result = await label_once_through_a_fault(harness, 503)
    assert result.state == CampaignState.COMPLETED
    assert harness.sandbox.attempts(f"{handle.id}:label") == 2
    assert await audit_count(harness, handle.id, "consent_allowed") == 1
    assert await audit_count(harness, handle.id, "crm_written") == 1


async def test_a_ten_minute_crm_outage_is_waited_for_not_turned_into_a_fallback(
    harness: Harness,
) -> None:
    # More failed attempts than any fixed budget the old policy had (8), over minutes.
    _, handle, result = await label_once_through_a_fault(harness, 503, count=12)
    assert result.state == CampaignState.COMPLETED
    assert harness.sandbox.attempts(f"{handle.id}:label") == 13
    events = [event async for event in handle.fetch_history_events()]
    first, last = events[0].event_time.ToDatetime(), events[-1].event_time.ToDatetime()
    assert last - first > timedelta(minutes=10), "the outage was not ten minutes long"


async def test_the_spec_crm_give_up_after_ends_a_crm_outage_in_the_safe_segment(
    harness: Harness,
) -> None:
    _, handle, result = await label_once_through_a_fault(
        harness, 503, count=1_000, crm={"give_up_after": "PT2M"}
    )
    assert result.state == CampaignState.FALLBACK
    assert result.reason.startswith("crm_failed: ") and result.segment == "nurture_default"
    assert 2 < harness.sandbox.attempts(f"{handle.id}:label") < 20


async def test_a_repeated_launch_of_the_same_entry_is_a_no_op(harness: Harness) -> None:
    spec, version = await harness.apply(without_approval(spec_document()))
    key = await harness.customer()
    async with harness.workers():
        first = await harness.launch(spec, version, key)
        await harness.result(first)
        second = await harness.launch(spec, version, key)
        assert (await harness.describe(second)).run_id == (await harness.describe(first)).run_id
    assert await audit_count(harness, first.id, "scored") == 1


async def test_the_bench_shaped_campaign_costs_what_its_effects_need_and_keeps_its_record(
    harness: Harness,
) -> None:
    # The bench's shape: score, branch, label, wait, enrol. The lean type's history holds what
    # a hand-written workflow with the same effects needs (scoring's local activity, two CRM
    # activities, the timer) plus one search-attribute upsert, at the end (a 1 s wait is over
    # before anyone could see it): no patch markers, no spec load, and the finish is
    # recorded with the enrolment.
    document = spec_document()
    document["steps"][1]["rules"][0]["all"][0]["value"] = 2.0  # nobody goes to approval
    document["steps"][4]["duration"] = "PT1S"
    spec, version = await harness.apply(document)
    key = await harness.customer()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    events = [e async for e in handle.fetch_history_events()]
    kinds = Counter(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events)
    assert kinds["MARKER_RECORDED"] == 1  # scoring; no patch, no spec, no finish record
    assert kinds["ACTIVITY_TASK_SCHEDULED"] == 2  # the two CRM writes
    assert kinds["TIMER_STARTED"] == 1
    assert kinds["UPSERT_WORKFLOW_SEARCH_ATTRIBUTES"] == 1
    assert len(events) == 24, kinds
    shown = (await harness.describe(handle)).typed_search_attributes
    assert shown.get(SA.CAMPAIGN_STATE) == "completed"
    assert shown.get(SA.VARIANT) == "treatment"
    assert (shown.get(SA.MODEL_VERSION) or "").startswith("churn-")
    assert await audit_chain(harness, handle.id) == [
        ("entry", "variant_assigned"),
        ("score", "scored"),
        ("route", "branch"),
        ("label", "consent_allowed"),
        ("label", "crm_written"),
        ("enrol", "consent_allowed"),
        ("enrol", "crm_written"),
        ("finish", "finished"),
    ]
    await save_history_if_asked(handle, "bench_shape_completed")


async def audit_chain(h: Harness, workflow_id: str) -> list[tuple[str, str]]:
    """(step, kind) of the campaign's audit rows, in chain order."""
    async with h.db.transaction() as session:
        rows = await session.execute(
            select(AuditRow.step_id, AuditRow.kind)
            .where(AuditRow.workflow_id == workflow_id)
            .order_by(AuditRow.seq)
        )
        return [(step, kind) for step, kind in rows]


async def test_decisions_are_on_record_before_a_wait_and_after_a_fallback(
    harness: Harness,
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [
        {"id": "score", "type": "score", "models": ["churn"]},
        {
            "id": "route",
            "type": "branch",
            "rules": [{"all": [{"score": "churn", "op": ">", "value": 2.0}], "next": "label"}],
            "default": "hold",
        },
        {"id": "hold", "type": "wait", "duration": "P1D"},
        {"id": "label", "type": "crm", "action": "set_properties", "properties": {"a": "1"}},
    ]
    spec, version = await harness.apply(document)
    key = await harness.customer()
    harness.sandbox.inject(400, count=1)  # the label after the wait is refused: fallback
    try:
        async with harness.workers():
            handle = await harness.launch(spec, version, key)
            await wait_for_state(handle, CampaignState.WAITING)
            # The branch was decided before the wait: on record while the campaign waits.
            assert await audit_chain(harness, handle.id) == [
                ("entry", "variant_assigned"),
                ("score", "scored"),
                ("route", "branch"),
            ]
            result = await harness.result(handle)
    finally:
        harness.sandbox.clear()
    assert result.state == CampaignState.FALLBACK
    chain = await audit_chain(harness, handle.id)
    assert chain[:3] == [("entry", "variant_assigned"), ("score", "scored"), ("route", "branch")]
    assert chain[-1] == ("finish", "finished")
    assert ("label", "fallback") in chain
    assert len(chain) == len(set(chain))  # nothing on record twice
    await save_history_if_asked(handle, "wait_then_crm_rejected_fallback")


class ActivitiesFromBeforeRideAlong(CrmActivities):
    """A CRM-queue worker not yet upgraded: it knows nothing of carried decisions (its
    converter drops the unknown field) and so answers that it recorded none."""

    @activity.defn(name="crm_write")
    async def crm_write(self, inp: CrmWriteInput) -> CrmWriteResult:
        result = await super().crm_write(dataclasses.replace(inp, decisions=[]))
        result.decisions_recorded = 0
        return result


async def test_decisions_a_worker_did_not_record_ride_on_to_the_next_record(
    harness: Harness,
) -> None:
    document = spec_document()
    document["steps"][1]["rules"][0]["all"][0]["value"] = 2.0  # nobody goes to approval
    spec, version = await harness.apply(document)
    key = await harness.customer()
    async with harness.workers(crm_type=ActivitiesFromBeforeRideAlong):
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert result.state == CampaignState.COMPLETED
    chain = await audit_chain(harness, handle.id)
    # The branch rode with the label's write, which dropped it; the workflow kept it and it
    # went on record before the wait instead.
    assert ("route", "branch") in chain
    assert chain.index(("route", "branch")) < chain.index(("enrol", "crm_written"))
    assert len(chain) == len(set(chain))


async def test_a_stored_spec_made_invalid_by_hand_sends_a_new_campaign_to_its_safe_segment(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(without_approval(spec_document()))
    broken = {**spec.model_dump(mode="json"), "steps": [{"id": "label", "type": "teleport"}]}
    async with harness.db.transaction() as session:
        await session.execute(
            update(CampaignSpecVersion)
            .where(CampaignSpecVersion.campaign_id == spec.campaign_id)
            .values(spec=broken)
        )
    key = await harness.customer()
    started = time.monotonic()
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        result = await harness.result(handle)
    assert time.monotonic() - started < 10, "a spec that cannot load is not retried"
    assert result.state == CampaignState.FALLBACK
    assert result.segment == "nurture_default"  # the segment the broken document still names
    assert result.reason.startswith(f"spec_invalid: campaign {spec.campaign_id} v{version}: ")
    assert "steps[0].type" in result.reason
    description = await harness.describe(handle)
    assert description.typed_search_attributes.get(SA.FALLBACK_REASON) == "spec_invalid"
    assert await audit_count(harness, handle.id, "fallback") == 1
    async with harness.db.transaction() as session:
        finished = await session.scalar(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == handle.id, AuditRow.kind == "finished"
            )
        )
    assert finished is not None and json.loads(finished)["variant"] == "unassigned"
    await save_history_if_asked(handle, "spec_invalid_fallback")


async def test_an_awaited_event_heard_during_a_hand_over_ends_the_resumed_wait(
    harness: Harness,
) -> None:
    document = without_approval(spec_document())
    document["steps"] = [
        {"id": "bought", "type": "wait", "event": "purchase", "timeout": "P3D", "on_event": "ty"},
        {"id": "ty", "type": "crm", "action": "set_properties", "properties": {"ty": "1"}},
    ]
    spec, version = await harness.apply(document)
    key = await harness.customer()
    assert harness.env is not None
    now = await harness.env.get_current_time()
    # What a run hands over when the purchase arrived after it decided to continue as new.
    carried = RunState(
        step_id="bought",
        entered_at=now.isoformat(),
        deadline=(now + timedelta(days=3)).isoformat(),
        steps_run=["bought"],
        events_awaited=["purchase"],
        current=CampaignState.WAITING,
        runs=2,
    )
    async with harness.workers():
        handle = await harness.start(spec, version, key, carried=carried)
        await wait_for_state(handle, CampaignState.COMPLETED)
        result = await handle.result()
    assert result.steps_run == ["bought", "ty"]
    events = [e async for e in handle.fetch_history_events()]
    assert not any(e.event_type == EventType.EVENT_TYPE_TIMER_FIRED for e in events)
    await save_history_if_asked(handle, "handover_event_heard")


async def test_a_cohort_exit_heard_before_the_spec_loads_still_ends_the_campaign(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(without_approval(spec_document()))
    key = await harness.customer()
    async with harness.workers():
        # Signal-with-start: the exit is in the first workflow task, before the spec loads.
        handle = await harness.client.start_workflow(
            CampaignWorkflow.run,
            CampaignInput(
                spec.campaign_id,
                version,
                key,
                "1",
                spec.entry_cohort,
                crm_task_queue=harness.settings.crm_task_queue,
            ),
            id=f"campaign:{spec.campaign_id}:{key}:1",
            task_queue=harness.settings.task_queue,
            start_signal=CampaignWorkflow.cohort_exited.__name__,
            start_signal_args=[CohortExited(cohort_id=spec.entry_cohort)],
        )
        await wait_for_state(handle, CampaignState.EXITED)
        result = await handle.result()
    assert (result.state, result.reason) == (CampaignState.EXITED, "left cohort test_cohort")
    assert result.steps_run == []
    await save_history_if_asked(handle, "early_cohort_exit")


async def test_a_carried_approval_that_never_resumes_is_withdrawn_and_refuses_decisions(
    harness: Harness,
) -> None:
    spec, version = await harness.apply(spec_document())
    key = await harness.customer()
    assert harness.env is not None
    now = await harness.env.get_current_time()
    workflow_id = f"campaign:{spec.campaign_id}:{key}:1"
    pending = PendingApproval(
        approval_id_for(workflow_id, "approve"),
        "approve",
        "test approval",
        now.isoformat(),
        (now + timedelta(days=3)).isoformat(),
    )
    async with harness.db.transaction() as session:
        await approvals.add_pending(
            session,
            approval_id=pending.approval_id,
            workflow_id=workflow_id,
            step_id="approve",
            campaign_id=spec.campaign_id,
            customer_key=key,
            reason=pending.reason,
            scores={},
            requested_at=now,
            expires_at=now + timedelta(days=3),
        )
    # Handed over mid-approval; the customer unsubscribed while the next run started.
    carried = RunState(
        step_id="approve",
        entered_at=now.isoformat(),
        deadline=pending.expires_at,
        pending_approval=pending,
        steps_run=["score", "route", "approve"],
        current=CampaignState.AWAITING_APPROVAL,
        exit_reason="event unsubscribe",
        runs=2,
    )
    # The decision is sent before any worker runs the campaign, so it is heard by the run's
    # first task however fast the run ends.
    handle = await harness.start(spec, version, key, carried=carried)
    decision = asyncio.create_task(
        handle.execute_update(
            CampaignWorkflow.decide,
            DecideRequest(pending.approval_id, True, "alice", "ok", ["approver"]),
        )
    )
    await asyncio.sleep(0.5)
    async with harness.workers():
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await decision
        result = await harness.result(handle)
    assert isinstance(refused.value.cause, ApplicationError)
    assert refused.value.cause.type == "DecideConflict"
    assert (result.state, result.reason) == (CampaignState.EXITED, "event unsubscribe")
    async with harness.db.transaction() as session:
        row = await approvals.get_approval(session, pending.approval_id)
    assert row is not None and row.status == "expired"
    assert await audit_count(harness, handle.id, "approval_withdrawn") == 1
    await save_history_if_asked(handle, "carried_approval_withdrawn")


async def test_an_exit_stops_a_crm_write_that_is_still_being_retried(
    dev_harness: Harness,
) -> None:
    # On the dev server: the time-skipping server retries an attempt that fails after its
    # cancel was asked for, where a real server does not, and a campaign that waits for the
    # cancel to settle (its last write) would then wait for ever there.
    harness = dev_harness
    document = without_approval(spec_document())
    document["steps"] = [s for s in document["steps"] if s["id"] in ("score", "label")]
    spec, version = await harness.apply(document)
    key = await harness.customer()
    harness.sandbox.inject(503, count=1_000)  # the CRM is down for as long as the test runs
    try:
        async with harness.workers():
            handle = await harness.launch(spec, version, key)
            label = f"{handle.id}:label"
            for _ in range(100):
                if harness.sandbox.attempts(label) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert harness.sandbox.attempts(label) >= 2, "the write was never retried"
            await handle.signal(CampaignWorkflow.cohort_exited, CohortExited("test_cohort"))
            await wait_for_state(handle, CampaignState.EXITED)
            result = await handle.result()
            tried = harness.sandbox.attempts(label)
            await asyncio.sleep(1.5)  # no retry comes after the exit
            assert harness.sandbox.attempts(label) == tried
    finally:
        harness.sandbox.clear()
    assert (result.state, result.reason) == (CampaignState.EXITED, "left cohort test_cohort")
    assert await audit_count(harness, handle.id, "crm_written") == 0
