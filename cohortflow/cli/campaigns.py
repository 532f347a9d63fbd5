"""Campaign commands: pause, resume or cancel a campaign's running workflows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cohortflow.cli.common import DataDir, Operator, Reason, out, run, settings_for, with_controls
from cohortflow.controls import CampaignAction

campaign_app = typer.Typer(help="Campaigns: pause, resume, cancel.", no_args_is_help=True)


def _campaign(
    campaign_id: str, action: CampaignAction, operator: str, reason: str, data_dir: Path | None
) -> None:
    settings = settings_for(data_dir=data_dir)
    outcome = run(
        lambda: with_controls(
            settings,
            lambda c: c.change_campaign(campaign_id, action, operator=operator, reason=reason),
        )
    )
    out.print(f"{outcome.campaign_id} {outcome.status}; {outcome.workflows} running workflow(s)")


CampaignArg = Annotated[str, typer.Argument(help="The campaign id.")]


@campaign_app.command("pause")
def campaign_pause(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Hold every outbound action of the campaign's running workflows."""
    _campaign(campaign_id, "pause", operator, reason, data_dir)


@campaign_app.command("resume")
def campaign_resume(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Let paused campaigns act again."""
    _campaign(campaign_id, "resume", operator, reason, data_dir)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: CampaignArg, operator: Operator, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Cancel the campaign: running workflows exit, no new outbound action is made."""
    _campaign(campaign_id, "cancel", operator, reason, data_dir)
