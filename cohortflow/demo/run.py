"""The demo job on a running stack: two shipped specs, real launches, real events, a summary.

1. the win-back (``examples/winback_sensitive.yaml``): CDNOW customers scored by a churn
   model; the high-value ones wait for an operator, a stratified tenth is held out;
2. the drip (``examples/onboarding_drip.yaml``): new customers signed up through the HTTP
   API wait for their first purchase; a seeded share buys, through the API again, and is
   thanked, the rest keep waiting (three days, then a nudge at 10:00 their time).

Each campaign's customers enter through its cohort, applied (with its schedule) and
evaluated by the product, and are launched by ``LaunchCampaignsWorkflow``: the demo picks
no one itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from temporalio.client import Client

from cohortflow.auth.tokens import TokenService
from cohortflow.cohorts.service import CohortService
from cohortflow.demo.drip import first_purchases, prepare_drip, purchases_heard
from cohortflow.demo.launching import Entered, Launch, enter_cohort
from cohortflow.demo.options import DemoOptions
from cohortflow.demo.settle import CampaignCounts, wait_until_settled
from cohortflow.demo.winback import prepare_winback
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from workflows.campaign.contract import CampaignState


@dataclass
class CampaignOutcome:
    """One campaign's part of the summary."""

    campaign_id: str
    version: int
    cohort_id: str
    cohort_members: int  # who the product's evaluator put in the entry cohort
    entered: int  # campaigns in Temporal visibility
    launched_new: int
    already_launched: int
    states: dict[str, int]
    variants: dict[str, int]
    parked_at: dict[str, int]


@dataclass
class DemoSummary:
    """The demo's outcome, counted from Temporal visibility."""

    campaigns: list[CampaignOutcome]
    model_version: str
    wall_seconds: float
    campaigns_per_second: float
    temporal_address: str
    namespace: str
    temporal_ui: str
    sample_size: int
    signups: int
    purchases: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object: per campaign its counts, then where to look."""
        document = asdict(self)
        document["campaigns"] = {c.campaign_id: asdict(c) for c in self.campaigns}
        document["wall_seconds"] = round(self.wall_seconds, 2)
        return document


async def run_demo_job(
    settings: Settings,
    client: Client,
    urls: tuple[str, str],
    options: DemoOptions,
    err: Console,
) -> DemoSummary:
    """Prepare both campaigns, launch them, let the drip's signups buy, count the outcome.

    ``urls`` are the stack's HTTP API and Temporal UI.
    """
    started = time.monotonic()
    api_url, ui_url = urls

    def note(line: str) -> None:
        err.print(f"· {line}", soft_wrap=True)

    db = Database(settings.resolved_database_url)
    try:
        # The demo signs customers up and answers their consent as an admin integration would:
        # with a token of its own, good for the hour the demo needs.
        issued = await TokenService(db).create(
            "demo", ["ingest", "admin"], lifetime=timedelta(hours=1), by="demo"
        )
        headers = {"Authorization": f"Bearer {issued.secret}"}
        async with httpx.AsyncClient(base_url=api_url, timeout=60, headers=headers) as api:
            winback = await prepare_winback(settings, db, options, note)
            drip = await prepare_drip(settings, db, api, options, note)
            launches: list[Launch] = [winback, drip]
            service = CohortService(db, settings, client)
            launch_started = time.monotonic()
            entered: dict[str, Entered] = {}
            with Progress(
                TextColumn("launching {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
            ) as bar:
                for launch in launches:
                    task = bar.add_task(launch.campaign_id, total=None)

                    def advance(done: int, total: int, task: TaskID = task) -> None:
                        bar.update(task, completed=done, total=total)

                    entered[launch.campaign_id] = await enter_cohort(
                        service, client, launch, advance
                    )
            for launch in launches:
                outcome = entered[launch.campaign_id]
                note(
                    f"cohort {launch.spec.entry_cohort}: {outcome.members} members; "
                    f"{outcome.after - outcome.before} {launch.campaign_id} campaigns launched now"
                    + (f", {outcome.before} by earlier runs" if outcome.before else "")
                )
            expected = {c: e.after for c, e in entered.items()}
            await _settle(client, expected, options, err, "campaigns running")
            launched_seconds = time.monotonic() - launch_started
            purchases = await first_purchases(api, options, note)
            # The signals may still be on their way (the API's relay delivers what its fast
            # path did not): settle only once every buyer's campaign has heard its purchase.
            await purchases_heard(client, drip, settings, options)
            counts = await _settle(client, expected, options, err, "purchases arriving")
    finally:
        await db.dispose()
    new = sum(e.after - e.before for e in entered.values())
    return DemoSummary(
        campaigns=[
            _outcome(launch, entered[launch.campaign_id], c)
            for launch, c in zip(launches, counts, strict=True)
        ],
        model_version=winback.model_version,
        wall_seconds=time.monotonic() - started,
        campaigns_per_second=round(new / launched_seconds, 2),
        temporal_address=settings.resolved_temporal_address,
        namespace=settings.temporal_namespace,
        temporal_ui=ui_url,
        sample_size=winback.sample_size,
        signups=options.signups,
        purchases=purchases,
    )


async def _settle(
    client: Client, expected: dict[str, int], options: DemoOptions, err: Console, what: str
) -> list[CampaignCounts]:
    with Progress(
        TextColumn(what), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task("", total=None)
        return await wait_until_settled(
            client,
            expected,
            options.settle_timeout_seconds,
            options.parked_after_seconds,
            lambda text: bar.update(task, description=text),
        )


def _outcome(launch: Launch, entered: Entered, counts: CampaignCounts) -> CampaignOutcome:
    return CampaignOutcome(
        campaign_id=launch.campaign_id,
        version=launch.version,
        cohort_id=launch.spec.entry_cohort,
        cohort_members=entered.members,
        entered=counts.total,
        launched_new=entered.after - entered.before,
        already_launched=entered.before,
        states=counts.states,
        variants=counts.variants,
        parked_at=counts.parked_at,
    )


def print_summary(summary: DemoSummary, out: Console) -> None:
    """The human summary: a table per campaign, then what to do next and where to look."""
    from rich.table import Table

    for campaign in summary.campaigns:
        table = Table(title=f"Campaign {campaign.campaign_id} v{campaign.version}")
        table.add_column("state")
        table.add_column("campaigns", justify="right")
        for state, count in campaign.states.items():
            if count or state != CampaignState.FAILED.value:
                table.add_row(state, str(count))
        table.add_row("entered", str(campaign.entered), style="bold")
        out.print(table)
        arms = ", ".join(f"{k} {v}" for k, v in campaign.variants.items())
        parked = ", ".join(f"{v} at {k}" for k, v in campaign.parked_at.items())
        out.print(f"holdout arms: {arms}" + (f"; waiting: {parked}" if parked else ""))
    out.print(
        f"{sum(c.launched_new for c in summary.campaigns)} campaigns launched now, "
        f"{sum(c.already_launched for c in summary.campaigns)} by earlier runs; "
        f"{summary.purchases.get('purchases', 0)} signups bought; "
        f"{summary.wall_seconds:.1f}s wall time, {summary.campaigns_per_second} campaigns/s."
    )
    if any(c.states.get(CampaignState.AWAITING_APPROVAL.value) for c in summary.campaigns):
        out.print(
            "Approve from the CLI:\n"
            "  cohortflow approvals list\n"
            "  COHORTFLOW_LOCAL_IDENTITY=alice \\\n"
            "    cohortflow approve APPROVAL_ID --reason 'offer is fine'\n"
            "or in the browser: cohortflow token create --name alice --role approver, then "
            "sign in with it at the API's /inbox page"
        )
    out.print(
        "Reports: cohortflow campaign report winback_sensitive | "
        "cohortflow campaign report onboarding_drip"
    )
    out.print(
        f"Temporal UI: {summary.temporal_ui}/namespaces/{summary.namespace}/workflows?query="
        "CampaignId%3D%22winback_sensitive%22  (columns: CampaignState, AwaitingApproval, "
        "Variant, FallbackReason; each workflow shows what it is doing and waiting for)"
    )
