"""Each cohort's Temporal Schedule: a full evaluation every ``evaluate_every``.

The schedule is made (or brought in line with the definition) when the cohort is applied,
and again for every cohort when a worker starts, so one applied while Temporal was away
gets its schedule too. It keeps a pause an operator set: applying a new version changes the
interval, not whether it runs. Overlapping runs are skipped: a slow evaluation is never
run twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from cohortflow.cohorts.rules import CohortDefinition
from cohortflow.settings import Settings
from cohortflow.spec import parse_duration
from workflows.campaign.contract import SA
from workflows.cohort_evaluation import CohortEvaluationInput, CohortEvaluationWorkflow

PREFIX = "cohort-evaluation:"


def schedule_id(cohort_id: str) -> str:
    """The schedule's id, also the id of the workflows it starts."""
    return f"{PREFIX}{cohort_id}"


def _schedule(definition: CohortDefinition, settings: Settings, paused: bool) -> Schedule:
    cohort_id = definition.cohort_id
    return Schedule(
        action=ScheduleActionStartWorkflow(
            CohortEvaluationWorkflow.run,
            CohortEvaluationInput(cohort_id),
            id=schedule_id(cohort_id),
            task_queue=settings.task_queue,
            typed_search_attributes=TypedSearchAttributes(
                [SearchAttributePair(SA.COHORT_ID, cohort_id)]
            ),
            static_summary=f"evaluate cohort {cohort_id}",
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=parse_duration(definition.evaluate_every))]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(
            paused=paused, note=f"{definition.name}: every {definition.evaluate_every}"
        ),
    )


async def ensure(client: Client, settings: Settings, definition: CohortDefinition) -> bool:
    """Make the cohort's schedule, evaluating at once; or update an existing one's interval
    and action, keeping its pause. True when it was made."""
    try:
        await client.create_schedule(
            schedule_id(definition.cohort_id),
            _schedule(definition, settings, paused=False),
            trigger_immediately=True,
        )
        return True
    except ScheduleAlreadyRunningError:
        pass

    def keep_pause(current: ScheduleUpdateInput) -> ScheduleUpdate:
        paused = current.description.schedule.state.paused
        updated = _schedule(definition, settings, paused)
        updated.state = current.description.schedule.state
        return ScheduleUpdate(schedule=updated)

    await client.get_schedule_handle(schedule_id(definition.cohort_id)).update(keep_pause)
    return False


@dataclass(frozen=True)
class ScheduleStatus:
    """What an operator asks of a cohort's schedule."""

    schedule_id: str
    paused: bool
    note: str
    every: timedelta | None
    next_run: datetime | None
    runs: int


async def status(client: Client, cohort_id: str) -> ScheduleStatus:
    """The schedule as Temporal has it (RPCError NOT_FOUND when it has none)."""
    described = await client.get_schedule_handle(schedule_id(cohort_id)).describe()
    spec = described.schedule.spec
    upcoming = described.info.next_action_times
    return ScheduleStatus(
        schedule_id=described.id,
        paused=described.schedule.state.paused,
        note=described.schedule.state.note or "",
        every=spec.intervals[0].every if spec.intervals else None,
        next_run=upcoming[0] if upcoming else None,
        runs=described.info.num_actions,
    )


async def set_paused(client: Client, cohort_id: str, paused: bool, note: str) -> None:
    """Pause or resume the cohort's evaluations, with why (shown in the Temporal UI)."""
    handle = client.get_schedule_handle(schedule_id(cohort_id))
    if paused:
        await handle.pause(note=note)
    else:
        await handle.unpause(note=note)
