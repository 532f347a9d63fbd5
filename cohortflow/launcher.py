"""Starts campaign workflows: one per (campaign, customer, entry), idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec, StepSpec
from cohortflow.storage import campaigns
from cohortflow.storage.db import Database
from workflows.campaign import CampaignWorkflow
from workflows.messages import (
    SA,
    CampaignInput,
    CampaignState,
    campaign_workflow_id,
)

# Re-entry rule ``once``: a customer's first entry into a campaign is its only one.
FIRST_ENTRY = "1"


@dataclass(frozen=True)
class Entry:
    """A customer entering a campaign's cohort."""

    customer_key: str
    cohort_id: str
    entry_id: str = FIRST_ENTRY


class Launcher:
    """Launches campaign entries; a repeated launch of the same entry is a no-op."""

    def __init__(self, client: Client, db: Database, settings: Settings) -> None:
        self._client = client
        self._db = db
        self._settings = settings

    async def launch(self, spec: CampaignSpec, version: int, entry: Entry) -> bool:
        """Start the entry's workflow unless it already ran; True when this call recorded it."""
        workflow_id = campaign_workflow_id(spec.campaign_id, entry.customer_key, entry.entry_id)
        async with self._db.transaction() as session:
            new = await campaigns.record_entry(
                session,
                workflow_id=workflow_id,
                campaign_id=spec.campaign_id,
                customer_key=entry.customer_key,
                entry_id=entry.entry_id,
                cohort_id=entry.cohort_id,
                version=version,
            )
        # Start even when the entry was recorded before: a crash between the two must not
        # lose the campaign. The server dedupes on the workflow id.
        try:
            await self._client.start_workflow(
                CampaignWorkflow.run,
                CampaignInput(
                    campaign_id=spec.campaign_id,
                    version=version,
                    customer_key=entry.customer_key,
                    entry_id=entry.entry_id,
                    cohort_id=entry.cohort_id,
                    crm_task_queue=self._settings.crm_task_queue,
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
    lines += [f"1. `{s.id}` {s.type}{_step_note(s)}" for s in spec.steps]
    return "\n".join(lines)


def _step_note(step: StepSpec) -> str:
    if step.action:
        return f": {step.action}"
    if step.duration:
        return f": {step.duration}"
    return ""
