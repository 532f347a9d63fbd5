"""Every saved history of a released CampaignWorkflow version still replays on today's code.

A change to the workflow's logic that would break these must go behind ``workflow.patched``
(or a new workflow type); then the old histories keep replaying and new ones are saved here.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from workflows.campaign import CampaignWorkflow
from workflows.messages import CampaignInput, CampaignResult

HISTORIES = sorted((Path(__file__).parent / "histories").glob("campaign_v*.json"))


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_histories_of_every_released_outcome_are_kept() -> None:
    names = {p.stem for p in HISTORIES}
    assert {
        "campaign_v1_approved_completed",
        "campaign_v1_approval_expired",
        "campaign_v1_consent_blocked",
        "campaign_v1_cohort_exited",
        "campaign_v1_crm_rejected_fallback",
    } <= names


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_saved_history_replays_on_current_code(path: Path) -> None:
    await Replayer(workflows=[CampaignWorkflow]).replay_workflow(load(path))


@workflow.defn(name="CampaignWorkflow")
class UnpatchedChange(CampaignWorkflow):
    """A logic change shipped without ``workflow.patched``: an extra timer up front."""

    @workflow.run
    async def run(self, inp: CampaignInput) -> CampaignResult:
        await workflow.sleep(timedelta(seconds=1))
        return await super().run(inp)


async def test_an_unpatched_change_is_caught_by_replay() -> None:
    with pytest.raises(NondeterminismError):
        await Replayer(workflows=[UnpatchedChange]).replay_workflow(load(HISTORIES[0]))
