"""LaunchCampaignsWorkflow: launches a campaign for every entry of a cohort evaluation.

A resumable bulk launch: its activity pages through the cohort's entries after a cursor,
heartbeating the cursor so a retried attempt resumes where the last one stopped, and the
workflow continues as new every few pages so its history stays small however many
entries there are. Starting each campaign goes through the idempotent launcher, so a
restart anywhere launches nothing twice. Progress is in the Temporal UI's current details
and in the ``progress`` query.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

LAUNCH_WORKFLOW = "LaunchCampaignsWorkflow"
LAUNCH_ACTIVITY = "launch_entries"


@dataclass
class LaunchInput:
    """Launch ``campaign_id`` (spec ``version``) for entries of ``cohort_id`` up to a seq."""

    campaign_id: str
    version: int
    cohort_id: str
    up_to_seq: int
    total: int
    after_seq: int = 0
    launched: int = 0
    refused: int = 0
    page_size: int = 500
    pages_per_run: int = 20
    # How soon a dead worker's page is retried elsewhere (resuming from its heartbeat).
    heartbeat_seconds: float = 60.0


@dataclass
class LaunchPage:
    """One activity call: up to ``limit`` entries after ``after_seq``."""

    campaign_id: str
    version: int
    cohort_id: str
    after_seq: int
    up_to_seq: int
    limit: int


@dataclass
class LaunchPageResult:
    """Where the page ended, the launch's totals so far; ``done`` when no entry is left."""

    cursor: int
    launched: int
    refused: int
    done: bool


@dataclass
class LaunchProgress:
    """What the bulk launch has done so far."""

    campaign_id: str
    cohort_id: str
    total: int
    processed: int
    launched: int
    refused: int
    cursor: int
    done: bool


@workflow.defn(name=LAUNCH_WORKFLOW)
class LaunchCampaignsWorkflow:
    """Pages through a cohort's entries, launching one campaign per allowed entry."""

    def __init__(self) -> None:
        self._progress: LaunchProgress | None = None

    @workflow.run
    async def run(self, params: LaunchInput) -> LaunchProgress:
        """Launch every entry in ``(after_seq, up_to_seq]``, continuing as new as it goes."""
        state = params
        self._report(state, done=False)
        for _ in range(state.pages_per_run):
            page = await workflow.execute_activity(
                LAUNCH_ACTIVITY,
                LaunchPage(
                    state.campaign_id,
                    state.version,
                    state.cohort_id,
                    state.after_seq,
                    state.up_to_seq,
                    state.page_size,
                ),
                result_type=LaunchPageResult,
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=state.heartbeat_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
                ),
            )
            state = replace(
                state,
                after_seq=page.cursor,
                launched=page.launched,
                refused=page.refused,
            )
            self._report(state, done=page.done)
            if page.done:
                assert self._progress is not None
                return self._progress
        workflow.continue_as_new(state)

    def _report(self, state: LaunchInput, *, done: bool) -> None:
        processed = state.launched + state.refused
        self._progress = LaunchProgress(
            state.campaign_id,
            state.cohort_id,
            state.total,
            processed,
            state.launched,
            state.refused,
            state.after_seq,
            done,
        )
        workflow.set_current_details(
            f"**{'done' if done else 'launching'}**: {processed} of {state.total} entries of "
            f"`{state.cohort_id}` into `{state.campaign_id}` v{state.version}: "
            f"{state.launched} launched, {state.refused} refused by the re-entry rule; "
            f"cursor {state.after_seq} of {state.up_to_seq}."
        )

    @workflow.query
    def progress(self) -> LaunchProgress | None:
        """What has been launched so far (None before the first report)."""
        return self._progress


def launch_workflow_id(campaign_id: str, cohort_id: str, up_to_seq: int) -> str:
    """One bulk launch per campaign, cohort and last entry: starting it twice is a no-op."""
    return f"launch:{campaign_id}:{cohort_id}:{up_to_seq}"
