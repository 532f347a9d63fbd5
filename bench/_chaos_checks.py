"""What a chaos run promises, checked from the outside after it: every campaign's end, the
CRM's own store, and the audit trail against the workflows' histories."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError

from cohortflow.storage.db import Database
from cohortflow.storage.tables import AuditRow
from workflows.campaign.contract import ActivityName, AuditKind, CampaignState, HandlerName
from workflows.campaign.messages import CampaignResult
from workflows.campaign.workflow import CampaignWorkflow

RESULT_WAIT_SECONDS = 900.0  # a kill costs an in-flight call up to its 30 s timeout, in turn


@dataclass(frozen=True)
class Outcome:
    """How a campaign must end, from its spec and data alone."""

    state: CampaignState
    decisions: int  # approval decisions its history must show

    @classmethod
    def of(cls, sensitive: bool, rejected: bool) -> Outcome:
        """A sensitive campaign waits for one decision and ends rejected when it is a
        rejection; every other campaign completes."""
        if not sensitive:
            return cls(CampaignState.COMPLETED, 0)
        return cls(CampaignState.REJECTED if rejected else CampaignState.COMPLETED, 1)


@dataclass
class Shown:
    """What one history shows that the audit trail must hold once each."""

    decisions: int = 0  # decide updates completed successfully
    crm_writes: int = 0  # crm_write activities completed
    scored: int = 0  # score_customer activities (or local activities) completed

    def expected_rows(self, finished: bool) -> Counter[str]:
        """The audit rows, by kind, these imply (``finished``: the campaign ended by its
        spec, which writes one ``finished`` row)."""
        return Counter(
            {
                AuditKind.APPROVAL_DECIDED.value: self.decisions,
                AuditKind.CRM_WRITTEN.value: self.crm_writes,
                AuditKind.SCORED.value: self.scored,
                AuditKind.FINISHED.value: int(finished),
            }
        )


async def check(
    client: Client, db: Database, crm_url: str, expected: dict[str, Outcome]
) -> dict[str, Any]:
    """Wait for every campaign in ``expected`` to end, then the figures: how many ended as
    expected, unexpected fallbacks, CRM duplicates and missing effects, audit rows missing
    or extra against the histories."""
    results = await ended(client, list(expected))
    shown = {wf: await history_shows(client, wf) for wf in expected}
    rows = await audit_rows(db, list(expected))
    missing = extra = 0
    for wf, outcome in expected.items():
        finished = results[wf] is not None and results[wf].state == outcome.state  # type: ignore[union-attr]
        want = shown[wf].expected_rows(finished)
        have = Counter({kind: n for (w, kind), n in rows.items() if w == wf and kind in want})
        missing += sum((want - have).values())
        extra += sum((have - want).values())
    states = Counter(r.state.value if r else "not ended" for r in results.values())
    completed = sum(r is not None and r.state == CampaignState.COMPLETED for r in results.values())
    effects = crm_effects(crm_url)
    return {
        "campaigns": len(expected),
        "terminal": sum(
            r is not None and r.state == expected[wf].state for wf, r in results.items()
        ),
        "states": dict(states),
        "unexpected_fallbacks": states.get(CampaignState.FALLBACK.value, 0),
        "decisions_in_histories": sum(s.decisions for s in shown.values()),
        "expected_decisions": sum(o.decisions for o in expected.values()),
        "duplicates": effects["duplicates"],
        "enrolments": effects["enrolments"],
        "missing_effects": max(completed - effects["enrolled_contacts"], 0),
        "missing_audit": missing,
        "extra_audit": extra,
    }


async def ended(client: Client, workflow_ids: list[str]) -> dict[str, CampaignResult | None]:
    """Each campaign's result once it ends (None if it has not within the wait)."""
    gate = asyncio.Semaphore(32)  # a result is a long poll; the dev server allows so many
    deadline = time.monotonic() + RESULT_WAIT_SECONDS

    async def one(wf: str) -> CampaignResult | None:
        handle = client.get_workflow_handle_for(CampaignWorkflow.run, wf)
        while time.monotonic() < deadline:
            try:
                async with gate:
                    return await asyncio.wait_for(handle.result(), 30)
            except (TimeoutError, RPCError):
                await asyncio.sleep(0.5)
        return None

    found = await asyncio.gather(*(one(wf) for wf in workflow_ids))
    return dict(zip(workflow_ids, found, strict=True))


async def history_shows(client: Client, workflow_id: str) -> Shown:
    """The decisions, CRM writes and scorings one campaign's history shows completed."""
    scheduled: dict[int, str] = {}
    decide_updates: set[str] = set()
    shown = Shown()
    handle = client.get_workflow_handle(workflow_id)
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = scheduled[event.activity_task_completed_event_attributes.scheduled_event_id]
            shown.crm_writes += name == ActivityName.CRM_WRITE
            shown.scored += name == ActivityName.SCORE_CUSTOMER
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            shown.scored += local_activity(event) == ActivityName.SCORE_CUSTOMER
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name == HandlerName.DECIDE:
                decide_updates.add(request.meta.update_id)
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            attrs = event.workflow_execution_update_completed_event_attributes
            succeeded = attrs.outcome.WhichOneof("value") == "success"
            shown.decisions += succeeded and attrs.meta.update_id in decide_updates
    return shown


def local_activity(event: HistoryEvent) -> str:
    """The activity type a local activity's marker records ("" for other markers). Its
    ``data`` detail is the SDK core's own JSON, never sealed by our codec."""
    marker = event.marker_recorded_event_attributes
    if marker.marker_name != "core_local_activity" or "data" not in marker.details:
        return ""
    return str(json.loads(marker.details["data"].payloads[0].data).get("activity_type", ""))


async def audit_rows(db: Database, workflow_ids: list[str]) -> Counter[tuple[str, str]]:
    """Audit rows per (workflow, kind) of these campaigns."""
    async with db.transaction() as session:
        found = await session.execute(
            select(AuditRow.workflow_id, AuditRow.kind, func.count())
            .where(AuditRow.workflow_id.in_(workflow_ids))
            .group_by(AuditRow.workflow_id, AuditRow.kind)
        )
        return Counter({(str(w), str(k)): int(n) for w, k, n in found.all()})


def crm_effects(crm_url: str) -> dict[str, int]:
    """Enrolments and list changes as the CRM's own store counts them (strict HubSpot mode:
    every enrolment applied is a row, so one made twice shows)."""
    effects = httpx.get(f"{crm_url}/_sandbox/effects", timeout=30).json()
    enrolments = effects["enrollments"]
    return {
        "duplicates": int(effects["duplicate_enrollments"]) + int(effects["duplicate_list_adds"]),
        "enrolments": sum(int(e["count"]) for e in enrolments),
        "enrolled_contacts": len({e["contact_id"] for e in enrolments}),
    }
