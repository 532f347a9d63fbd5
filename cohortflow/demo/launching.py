"""Store a demo campaign's spec version and its entry cohort; the product's evaluator picks
who enters and ``LaunchCampaignsWorkflow`` launches them, as it would for any cohort."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client

from cohortflow.campaigns.versions import applied
from cohortflow.cohorts.service import CohortService
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns, cohorts
from cohortflow.storage.db import Database
from workflows.launch import LaunchCampaignsWorkflow, LaunchProgress


@dataclass
class Launch:
    """A campaign spec version and the definition of the cohort its customers enter from."""

    spec: CampaignSpec
    version: int
    cohort: dict[str, Any] = field(default_factory=dict)

    @property
    def campaign_id(self) -> str:
        """The campaign the cohort's entries start."""
        return self.spec.campaign_id


@dataclass(frozen=True)
class Entered:
    """What entering the cohort gave: its members, and the campaign's entries before and
    after (the difference is what this run launched)."""

    members: int
    before: int
    after: int


async def save_version(db: Database, spec: CampaignSpec) -> int:
    """The spec's version in the store: a new one only when the spec changed."""
    async with db.transaction() as session:
        version, _ = await applied(session, spec, "demo")
    return version


async def entries(db: Database, campaign_id: str) -> int:
    """How many entries the campaign has had."""
    async with db.transaction() as session:
        return await campaigns.count_entries(session, campaign_id)


async def enter_cohort(
    service: CohortService,
    client: Client,
    launch: Launch,
    advance: Callable[[int, int], None],
) -> Entered:
    """Apply the cohort (which makes its schedule), evaluate it, and follow its launches to
    the end; ``advance(done, total)`` reports progress."""
    before = await entries(service.db, launch.campaign_id)
    definition, _, _ = await service.apply(launch.cohort, "demo")
    report = await service.evaluate(definition.cohort_id)
    for started in report.launches:
        if started.campaign_id != launch.campaign_id:
            continue
        handle = client.get_workflow_handle_for(LaunchCampaignsWorkflow.run, started.workflow_id)
        while True:
            state: LaunchProgress | None = await handle.query(LaunchCampaignsWorkflow.progress)
            if state is not None:
                advance(state.processed, state.total)
                if state.done:
                    break
            await asyncio.sleep(0.3)
    async with service.db.transaction() as session:
        members = len(await cohorts.member_keys(session, definition.cohort_id))
    return Entered(members, before, await entries(service.db, launch.campaign_id))
