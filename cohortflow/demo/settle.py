"""When the demo's campaigns have settled, counted from Temporal visibility.

A campaign is settled when it has ended, waits for an operator, or is parked in a wait that
ends beyond the demo's horizon (a purchase that may come in three days, quiet hours until
08:00 its time). Visibility says which state each campaign is in; the ``status`` query of
the waiting ones says what they wait for and until when.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from temporalio.client import Client

from cohortflow.campaigns import visibility
from workflows.campaign.contract import SA, SUMMARY_STATES, CampaignState
from workflows.campaign.messages import CampaignStatus
from workflows.campaign.workflow import CampaignWorkflow

Progress = Callable[[str], None]
# A running campaign in neither state is moving (a terminal state while it still writes its
# last records counts as moving too).
RESTING_STATES = (CampaignState.WAITING.value, CampaignState.AWAITING_APPROVAL.value)
VARIANTS = ("treatment", "control")


@dataclass
class CampaignCounts:
    """One campaign's workflows by state, by holdout arm, and the parked ones by step."""

    campaign_id: str
    states: dict[str, int]
    total: int
    moving: int = 0  # running, and neither waiting nor awaiting approval
    variants: dict[str, int] = field(default_factory=dict)
    parked_at: dict[str, int] = field(default_factory=dict)


async def count_campaign(client: Client, campaign_id: str) -> CampaignCounts:
    """Per-state and per-arm counts of one campaign, from visibility."""
    base = visibility.equals(SA.CAMPAIGN_ID, campaign_id)

    async def count(*conditions: str) -> int:
        return (await client.count_workflows(visibility.all_of(base, *conditions))).count

    # One query, not a difference of several: a campaign changing state between two counts
    # would otherwise be counted twice or not at all.
    moving = await count(visibility.running(visibility.none_of(SA.CAMPAIGN_STATE, RESTING_STATES)))
    total = await count()
    states = {s.value: await count(visibility.equals(SA.CAMPAIGN_STATE, s)) for s in SUMMARY_STATES}
    variants = {v: await count(visibility.equals(SA.VARIANT, v)) for v in VARIANTS}
    return CampaignCounts(campaign_id, states, total, moving, variants)


async def parked_steps(client: Client, campaign_id: str, horizon: timedelta) -> Counter[str] | None:
    """The waiting campaigns by step and what they wait for, when every one of them waits
    beyond ``horizon``; None while some wait ends sooner (or a campaign moved on since
    visibility saw it)."""
    query = visibility.all_of(
        visibility.equals(SA.CAMPAIGN_ID, campaign_id),
        visibility.equals(SA.CAMPAIGN_STATE, CampaignState.WAITING),
    )
    beyond = datetime.now(UTC) + horizon
    steps: Counter[str] = Counter()
    async for listed in client.list_workflows(query):
        handle = client.get_workflow_handle_for(CampaignWorkflow.run, listed.id)
        status = await handle.query(CampaignWorkflow.status)
        if status.state != CampaignState.WAITING or not status.waiting_until:
            return None
        if datetime.fromisoformat(status.waiting_until) <= beyond:
            return None
        steps[f"{status.step_id} ({_waiting_for(status)})"] += 1
    return steps


def _waiting_for(status: CampaignStatus) -> str:
    if status.waiting_for_event:
        return f"event {status.waiting_for_event}"
    last = status.transitions[-1] if status.transitions else ""
    return "quiet hours" if "quiet hours" in last else "timer"


async def wait_until_settled(
    client: Client,
    expected: dict[str, int],
    limit_seconds: float,
    parked_after_seconds: float,
    on_poll: Progress,
) -> list[CampaignCounts]:
    """Poll until every expected campaign is visible and settled; its counts per campaign."""
    deadline = time.monotonic() + limit_seconds
    horizon = timedelta(seconds=parked_after_seconds)
    while True:
        counts = [await count_campaign(client, c) for c in expected]
        on_poll(", ".join(f"{c.campaign_id} {c.total - c.moving}/{c.total}" for c in counts))
        if all(c.moving == 0 and c.total >= expected[c.campaign_id] for c in counts):
            parked = [await parked_steps(client, c.campaign_id, horizon) for c in counts]
            if all(p is not None for p in parked):
                for campaign, steps in zip(counts, parked, strict=True):
                    campaign.parked_at = dict(sorted((steps or Counter()).items()))
                return counts
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"campaigns did not settle in {limit_seconds:.0f}s: "
                + ", ".join(f"{c.campaign_id} {c.moving} moving" for c in counts)
            )
        await asyncio.sleep(1.0)
