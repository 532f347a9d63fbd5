"""Starts campaign workflows: one per (campaign, customer, entry), idempotently."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from cohortflow.observability import tracer
from cohortflow.settings import Settings
from cohortflow.spec import (
    CampaignSpec,
    ReentrySpec,
    SpecError,
    StepSpec,
    parse_duration,
    parse_spec,
)
from cohortflow.storage import campaigns, launches
from cohortflow.storage._sql import utc
from cohortflow.storage.db import Database
from cohortflow.storage.group_commit import GroupCommit
from cohortflow.storage.tables import LaunchDecision
from workflows.campaign.contract import SA, CampaignState, campaign_workflow_id
from workflows.campaign.definition import plain
from workflows.campaign.state import CampaignInput
from workflows.campaign.workflow import CampaignWorkflowV2

# How long a launch waits for others to record its entry with: small beside the start.
_ENTRY_LINGER = timedelta(milliseconds=5)
# Re-entry rule ``once``: a customer's first entry into a campaign is its only one.
FIRST_ENTRY = "1"


@dataclass(frozen=True)
class Entry:
    """A customer entering a campaign's cohort."""

    customer_key: str
    cohort_id: str
    entry_id: str = FIRST_ENTRY


async def stored_definition(
    session: AsyncSession, campaign_id: str, version: int
) -> dict[str, Any] | None:
    """A stored version as the workflow runs it (``definition.plain``), to pin in its input;
    None when it is not stored or no longer validates (``load_spec`` then says why)."""
    stored = await campaigns.get_spec_version(session, campaign_id, version)
    if stored is None:
        return None
    document, applied_by = stored
    try:
        return plain(parse_spec(document).to_definition(version, applied_by))
    except SpecError:
        return None


class Launcher:
    """Launches campaign entries; a repeated launch of the same entry is a no-op."""

    def __init__(self, client: Client, db: Database, settings: Settings) -> None:
        self._client = client
        self._db = db
        self._settings = settings
        # Stored spec versions never change, so each is read once per launcher (a burst of
        # launches shares the first read instead of each reading it).
        self._pinned: dict[tuple[str, int], asyncio.Task[dict[str, Any] | None]] = {}
        # Concurrent launches record their entries in one transaction: one at a time, they
        # queued for SQLite's write lock and launched at 0.57 of bare start_workflow.
        self._entries = GroupCommit(db, campaigns.record_entries, linger=_ENTRY_LINGER)

    async def launch(self, spec: CampaignSpec, version: int, entry: Entry) -> bool:
        """Start the entry's workflow unless it already ran; True when this call recorded it.

        One span holds the launch's database write and the workflow's start, so the
        campaign's trace begins here."""
        with tracer.start_as_current_span(
            "launch campaign", attributes={"cohortflow.campaign_id": spec.campaign_id}
        ):
            return await self._launch(spec, version, entry)

    async def _launch(self, spec: CampaignSpec, version: int, entry: Entry) -> bool:
        workflow_id = campaign_workflow_id(spec.campaign_id, entry.customer_key, entry.entry_id)
        pinned = await self._definition(spec.campaign_id, version)
        new = await self._entries.submit(
            campaigns.EntryRecord(
                workflow_id=workflow_id,
                campaign_id=spec.campaign_id,
                customer_key=entry.customer_key,
                entry_id=entry.entry_id,
                cohort_id=entry.cohort_id,
                version=version,
            )
        )
        # Start even when the entry was recorded before: a crash between the two must not
        # lose the campaign. The server dedupes on the workflow id.
        try:
            await self._client.start_workflow(
                CampaignWorkflowV2.run,
                CampaignInput(
                    campaign_id=spec.campaign_id,
                    version=version,
                    customer_key=entry.customer_key,
                    entry_id=entry.entry_id,
                    cohort_id=entry.cohort_id,
                    crm_task_queue=self._settings.crm_task_queue,
                    spec=pinned,
                ),
                id=workflow_id,
                task_queue=self._settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(SA.CAMPAIGN_ID, spec.campaign_id),
                        SearchAttributePair(SA.COHORT_ID, entry.cohort_id),
                        SearchAttributePair(SA.CUSTOMER_KEY, entry.customer_key),
                        SearchAttributePair(SA.CAMPAIGN_STATE, CampaignState.ENTERED.value),
                        SearchAttributePair(SA.CAMPAIGN_VERSION, version),
                        SearchAttributePair(SA.AWAITING_APPROVAL, False),
                    ]
                ),
                static_summary=summary(spec, version, entry),
                static_details=details(spec, version),
            )
        except WorkflowAlreadyStartedError:
            return False
        return new

    async def _definition(self, campaign_id: str, version: int) -> dict[str, Any] | None:
        key = (campaign_id, version)
        reading = self._pinned.get(key)
        if reading is None or (reading.done() and reading.exception() is not None):
            reading = asyncio.ensure_future(self._read_definition(campaign_id, version))
            self._pinned[key] = reading
        # Shielded: one launch cancelled must not cancel the read the others await.
        return await asyncio.shield(reading)

    async def _read_definition(self, campaign_id: str, version: int) -> dict[str, Any] | None:
        async with self._db.read_transaction() as session:
            return await stored_definition(session, campaign_id, version)

    async def launch_transitions(
        self,
        spec: CampaignSpec,
        version: int,
        cohort_id: str,
        transitions: Sequence[tuple[int, str]],
        *,
        now: datetime | None = None,
        concurrency: int = 16,
    ) -> list[str | None]:
        """Launch the campaign for cohort entries ``(transition seq, customer key)`` as the
        re-entry rule allows; returns each entry's id, None where the rule refused it.

        The verdict (an entry id, or a refusal) is stored once per entry before anything
        starts, so a retry launches the same entry ids or nothing; each start then goes
        through :meth:`launch`, the one idempotent path.
        """
        at = utc(now)
        seqs = [seq for seq, _ in transitions]
        async with self._db.transaction() as session:
            decided = await launches.decisions_for(session, spec.campaign_id, seqs)
            previous = await launches.previous_entries(
                session, spec.campaign_id, [key for _, key in transitions]
            )
        new: list[launches.Decision] = []
        # Customers given an entry in this call: its campaign is about to start, so running.
        entered_now: set[str] = set()
        for seq, key in transitions:
            if seq in decided:
                continue
            earlier = previous[key]
            running = key in entered_now
            if earlier and not running and spec.reentry.rule == "after_exit":
                running = await self._running(spec.campaign_id, key, earlier[-1][0])
            refusal = reentry_refusal(spec.reentry, earlier, at, previous_running=running)
            entry_id = None
            if refusal is None:
                entry_id = str(1 + max((int(e) for e, _ in earlier if e.isdigit()), default=0))
                earlier.append((entry_id, at))
                entered_now.add(key)
            new.append(launches.Decision(seq, key, entry_id, refusal or "entered"))
        if new:
            async with self._db.transaction() as session:
                decided |= await launches.record_decisions(session, spec.campaign_id, new, now=at)
        pending = [d for d in decided.values() if d.entry_id is not None and d.launched_at is None]
        gate = asyncio.Semaphore(concurrency)

        async def start(decision: LaunchDecision) -> None:
            assert decision.entry_id is not None
            async with gate:
                await self.launch(
                    spec, version, Entry(decision.customer_key, cohort_id, decision.entry_id)
                )

        await asyncio.gather(*(start(d) for d in pending))
        if pending:
            async with self._db.transaction() as session:
                await launches.mark_launched(
                    session, spec.campaign_id, [d.transition_seq for d in pending], now=at
                )
        return [decided[seq].entry_id for seq in seqs]

    async def _running(self, campaign_id: str, customer_key: str, entry_id: str) -> bool:
        workflow_id = campaign_workflow_id(campaign_id, customer_key, entry_id)
        try:
            # The status alone: no payload or search attribute to decode.
            described = await self._client.workflow_service.describe_workflow_execution(
                DescribeWorkflowExecutionRequest(
                    namespace=self._client.namespace,
                    execution=WorkflowExecution(workflow_id=workflow_id),
                )
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        status = described.workflow_execution_info.status
        return status == WorkflowExecutionStatus.RUNNING.value


def reentry_refusal(
    rule: ReentrySpec,
    previous: Sequence[tuple[str, datetime]],
    now: datetime,
    *,
    previous_running: bool,
) -> str | None:
    """Why the re-entry rule refuses a new entry, or None when it allows one.

    ``previous``: the customer's earlier entries (entry id, when), oldest first.
    """
    if not previous:
        return None
    if rule.rule == "once":
        return "reentry once: the customer entered before"
    if rule.rule == "after_exit":
        return (
            "reentry after_exit: the previous campaign is still running"
            if previous_running
            else None
        )
    assert rule.cooldown is not None  # the spec requires it for this rule
    ready_at = previous[-1][1] + parse_duration(rule.cooldown)
    if now < ready_at:
        return f"reentry cooldown {rule.cooldown}: not before {ready_at.isoformat()}"
    return None


def summary(spec: CampaignSpec, version: int, entry: Entry) -> str:
    """One line for the Temporal UI's workflow list."""
    return f"{spec.name} v{version} · {entry.customer_key} · entered {entry.cohort_id}"


def details(spec: CampaignSpec, version: int) -> str:
    """The spec's steps in Markdown, shown on the workflow page of the Temporal UI."""
    lines = [
        f"### {spec.name} (`{spec.campaign_id}` v{version})",
        f"Owner: {spec.owner}. Safe default segment: `{spec.safe_default_segment}`.",
        f"Sensitive: {'yes, approval required' if spec.sensitive else 'no'}; "
        f"holdout {spec.holdout_percent:g}%.",
        "",
        "Steps:",
    ]
    lines += [f"{n}. `{s.id}` {s.type}{_step_note(s)}" for n, s in enumerate(spec.steps, 1)]
    return "\n".join(lines)


def _step_note(step: StepSpec) -> str:
    if step.action:
        return f": {step.action}"
    if step.duration:
        return f": {step.duration}"
    return ""
