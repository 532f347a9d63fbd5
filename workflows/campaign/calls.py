"""How a campaign calls its activities: one envelope for every step, and the decisions that
ride along with the calls.

Retry policies tell infrastructure from business. A lost worker, a timeout, a server restart
or a CRM that is only down is retried without an attempt cap, from a short start-to-close
timeout; only a non-retryable business error (a model that cannot score, a CRM that rejects
this record) or a deadline the spec sets ends in the safe default segment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.campaign.activity_io import (
        AuditInput,
        AuditResult,
        CompensateInput,
        CompensateResult,
        Decision,
        EscalationInput,
        EscalationResult,
        FallbackInput,
        FallbackResult,
        LoadSpecInput,
        LocalTimeInput,
        LocalTimeResult,
    )
    from workflows.campaign.contract import (
        INTERRUPTIBLE_ACTIVITIES,
        ActivityName,
        AuditKind,
        CampaignState,
        FallbackReason,
        Patch,
    )
    from workflows.campaign.definition import CampaignSpecDef, StepDef, from_plain
    from workflows.campaign.interpreter import Ending
    from workflows.campaign.messages import PendingApproval
    from workflows.campaign.state import CampaignInput, RunState

LOCAL_TIMEOUT = timedelta(seconds=30)


@dataclass(frozen=True)
class ActivityOptions:
    """How one kind of activity is called, and the fallback its business failure leads to."""

    start_to_close: timedelta
    retry: RetryPolicy
    fails_to: FallbackReason | None = None
    on_crm_queue: bool = False
    schedule_to_close: timedelta | None = None  # a deadline the spec sets
    heartbeat: timedelta | None = None  # for calls that may wait long (their batch, the CRM)
    local: bool = False  # a short call the lean generation makes as a local activity


def _retry(*non_retryable: str) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=2),
        non_retryable_error_types=list(non_retryable),
    )


# A worker lost mid-attempt is noticed within the start-to-close timeout (or, for CRM calls,
# which may queue for their batch and the CRM's ceiling, the heartbeat timeout) and retried.
# Scoring reads a few rows and runs a model in milliseconds, on the workflow's own worker:
# a local activity in the lean generation.
SCORING = ActivityOptions(
    timedelta(seconds=30), _retry("ScoringError"), FallbackReason.SCORING_FAILED, local=True
)
CRM = ActivityOptions(
    timedelta(minutes=10),
    _retry("CrmRejected"),
    FallbackReason.CRM_FAILED,
    on_crm_queue=True,
    heartbeat=timedelta(seconds=30),
)
# Putting a customer in the safe segment or undoing effects has nothing further to fall to.
FALLBACK = replace(CRM, retry=_retry(), fails_to=None)
# An escalation gives up on its webhook by itself after a few attempts; only the database
# is retried for as long as it takes.
ESCALATION = ActivityOptions(timedelta(seconds=30), _retry())
# A record is the database only: retried for as long as it takes.
RECORD = ActivityOptions(timedelta(seconds=30), _retry())


def crm_options(spec: CampaignSpecDef) -> ActivityOptions:
    """CRM calls, with the spec's deadline for an outbound action if it sets one."""
    if spec.crm_give_up_after_seconds <= 0:
        return CRM
    return replace(CRM, schedule_to_close=timedelta(seconds=spec.crm_give_up_after_seconds))


class Finished(Exception):
    """Ends the run from inside a step: a business failure, or an interrupt."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


class _Acknowledging(Protocol):
    decisions_recorded: int


_R = TypeVar("_R", bound=_Acknowledging)


class ActivityCalls:
    """Every activity call of one campaign run, sharing its input and state."""

    def __init__(self, inp: CampaignInput, state: RunState, *, lean: bool = False) -> None:
        self._input = inp
        self._state = state
        self._lean = lean
        self.ride_along = lean  # DECISIONS_RIDE_ALONG: set once the run knows the patch

    def patched(self, patch: Patch) -> bool:
        """Whether this run takes ``patch``'s behaviour: the lean generation always does and
        records no marker; the first generation asks ``workflow.patched``."""
        return self._lean or workflow.patched(patch.id)

    async def load_spec(self) -> CampaignSpecDef | tuple[str, Ending]:
        """The spec version, or the safe segment and the end of a campaign whose stored spec
        no longer validates (``SpecInvalid`` carries the segment its document names). A spec
        pinned in the input (the lean generation's launches) costs no activity."""
        inp = self._input
        if inp.spec is not None:
            return from_plain(inp.spec)
        try:
            spec: CampaignSpecDef = await workflow.execute_local_activity(
                ActivityName.LOAD_SPEC,
                LoadSpecInput(inp.campaign_id, inp.version),
                result_type=CampaignSpecDef,
                start_to_close_timeout=LOCAL_TIMEOUT,
                summary=f"load {inp.campaign_id} v{inp.version}",
            )
        except (ActivityError, ApplicationError) as err:
            # A local activity's failure may arrive as the activity's own error, unwrapped.
            cause = err.cause if isinstance(err, ActivityError) else err
            if not (isinstance(cause, ApplicationError) and cause.type == "SpecInvalid"):
                raise
            segment = str(cause.details[0]) if cause.details else ""
            reason = f"{FallbackReason.SPEC_INVALID}: {cause.message}"
            return segment, Ending(CampaignState.FALLBACK, reason)
        return spec

    async def carry(
        self,
        activity: ActivityName,
        build: Callable[[list[Decision]], Any],
        result_type: type[_R],
        options: ActivityOptions,
        summary: str,
        stop: Callable[[], Ending | None] | None = None,
        *,
        settle_cancel: bool = False,
    ) -> _R:
        """The one activity-call envelope: carry the decisions not yet on record, drop those
        the activity acknowledges, and turn a business failure into the end it leads to.

        ``stop`` says when the campaign must end while the call is still being retried (an
        exit, a revocation): the call is then cancelled (INTERRUPTIBLE_ACTIVITIES);
        ``settle_cancel``: and its end awaited, so a call that completed anyway is known.
        """
        carried = list(self._state.unrecorded)
        cancel = (
            workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
            if settle_cancel
            else workflow.ActivityCancellationType.TRY_CANCEL
        )
        handle = self._start(activity, build(carried), result_type, options, summary, cancel)
        if stop is not None:
            await workflow.wait_condition(lambda: handle.done() or stop() is not None)
            ending = None if handle.done() else stop()
            if ending is not None and self.patched(INTERRUPTIBLE_ACTIVITIES):
                handle.cancel()
                with contextlib.suppress(ActivityError, asyncio.CancelledError):
                    done: _R = await handle
                    if self._lean:
                        # It finished before the cancel reached it: what it did stands
                        # (and the campaign's finish, if it carried it); otherwise the next
                        # step's check ends the campaign.
                        del self._state.unrecorded[: min(len(carried), done.decisions_recorded)]
                        return done
                raise Finished(ending)
        try:
            result: _R = await handle
        except (ActivityError, ApplicationError) as err:
            # A local activity's failure may arrive as the activity's own error, unwrapped.
            if options.fails_to is None:
                raise
            ending = Ending(CampaignState.FALLBACK, f"{options.fails_to}: {_cause(err)}")
            raise Finished(ending) from err
        # A worker from before decisions rode along acknowledges none: they ride on.
        del self._state.unrecorded[: min(len(carried), result.decisions_recorded)]
        return result

    def _start(
        self,
        activity: ActivityName,
        arg: Any,
        result_type: type[_R],
        options: ActivityOptions,
        summary: str,
        cancel: workflow.ActivityCancellationType,
    ) -> workflow.ActivityHandle[_R]:
        """Schedule one call: a local activity where ``options.local`` and the run is lean
        (a marker in history instead of an activity's three events and a workflow task)."""
        if self._lean and options.local:
            return workflow.start_local_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=options.start_to_close,
                schedule_to_close_timeout=options.schedule_to_close,
                retry_policy=options.retry,
                cancellation_type=cancel,
                summary=summary,
            )
        return workflow.start_activity(
            activity,
            arg,
            result_type=result_type,
            task_queue=self._input.crm_task_queue if options.on_crm_queue else None,
            start_to_close_timeout=options.start_to_close,
            schedule_to_close_timeout=options.schedule_to_close,
            heartbeat_timeout=options.heartbeat,
            retry_policy=options.retry,
            cancellation_type=cancel,
            summary=summary,
        )

    async def fallback(self, step_id: str, reason: str, segment: str) -> None:
        """Put the customer in the safe default segment; what was decided goes on record
        even when that fails (and the workflow with it)."""
        inp = self._input
        try:
            await self.carry(
                ActivityName.RESOLVE_FALLBACK,
                lambda carried: FallbackInput(
                    workflow_id=workflow.info().workflow_id,
                    step_id=step_id,
                    campaign_id=inp.campaign_id,
                    customer_key=inp.customer_key,
                    segment=segment,
                    reason=reason,
                    decisions=carried,
                ),
                FallbackResult,
                FALLBACK,
                f"safe default segment {segment}",
            )
        except ActivityError as err:
            await self.record_unrecorded()
            raise ApplicationError(f"could not record the fallback: {_cause(err)}") from err

    async def compensate(self, undo: list[str]) -> None:
        """Undo what this campaign did in the CRM, as the spec's ``on_consent_revoked`` says."""
        inp = self._input
        await self.carry(
            ActivityName.CRM_COMPENSATE,
            lambda carried: CompensateInput(
                workflow_id=workflow.info().workflow_id,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                undo=list(undo),
                decisions=carried,
            ),
            CompensateResult,
            FALLBACK,
            f"undo after consent revoked: {', '.join(undo)}",
        )

    async def escalate(self, pending: PendingApproval) -> None:
        """Send ``pending``'s escalation notice and put it on record."""
        inp = self._input
        await self.carry(
            ActivityName.ESCALATE_APPROVAL,
            lambda carried: EscalationInput(
                workflow_id=workflow.info().workflow_id,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                approval=pending,
                decisions=carried,
            ),
            EscalationResult,
            ESCALATION,
            f"{pending.step_id}: escalate {pending.approval_id}",
        )

    async def audit(
        self,
        step_id: str,
        kind: AuditKind,
        payload: dict[str, Any],
        approval: PendingApproval | None = None,
        *,
        now: bool = False,
        after_task: bool = False,
    ) -> None:
        """Record a decision: with the next activity (DECISIONS_RIDE_ALONG) unless it changes
        an approval or ``now`` asks for it at once, with every one not yet recorded.
        ``after_task``: by an activity, which runs only once this workflow task is saved,
        not a local one inside it (for what an update brought, which a lost task loses)."""
        unrecorded = self._state.unrecorded
        if self.ride_along and approval is None and not now:
            unrecorded.append(Decision(step_id, kind.value, payload))
            return
        carried = list(unrecorded)
        decision = Decision(step_id, kind.value, payload)
        await self._record(decision, carried, approval, after_task=after_task)
        del unrecorded[: len(carried)]

    async def record_unrecorded(self) -> None:
        """Before the campaign blocks (a wait, a pause, a hand-over), record what it decided."""
        unrecorded = self._state.unrecorded
        if unrecorded:
            # The last decision is the record and the others ride with it. Nothing leaves the
            # list before the local activity has answered: a cancel may come in between.
            *earlier, last = unrecorded
            await self._record(last, earlier, None)
            del unrecorded[: len(earlier) + 1]

    async def _record(
        self,
        decision: Decision,
        earlier: list[Decision],
        approval: PendingApproval | None,
        *,
        after_task: bool = False,
    ) -> None:
        inp = AuditInput(
            workflow_id=workflow.info().workflow_id,
            step_id=decision.step_id,
            kind=decision.kind,
            campaign_id=self._input.campaign_id,
            customer_key=self._input.customer_key,
            payload=decision.payload,
            approval=approval,
            decisions=earlier,
        )
        summary = f"audit {decision.step_id} {decision.kind}"
        if after_task:
            await workflow.execute_activity(
                ActivityName.RECORD_AUDIT,
                inp,
                result_type=AuditResult,
                start_to_close_timeout=RECORD.start_to_close,
                retry_policy=RECORD.retry,
                summary=summary,
            )
            return
        await workflow.execute_local_activity(
            ActivityName.RECORD_AUDIT,
            inp,
            result_type=AuditResult,
            start_to_close_timeout=LOCAL_TIMEOUT,
            summary=summary,
        )

    async def local_time(
        self,
        step: StepDef,
        default_timezone: str,
        *,
        until: str = "",
        quiet: tuple[str, str] = ("", ""),
    ) -> datetime:
        """When a local-time rule (``until`` HH:MM, or the end of ``quiet`` hours) lets the
        campaign go on, in the customer's zone, which the state then remembers."""
        result: LocalTimeResult = await workflow.execute_local_activity(
            ActivityName.PLAN_LOCAL_TIME,
            LocalTimeInput(
                customer_key=self._input.customer_key,
                now=workflow.now().isoformat(),
                default_timezone=default_timezone,
                until=until,
                quiet_start=quiet[0],
                quiet_end=quiet[1],
            ),
            result_type=LocalTimeResult,
            start_to_close_timeout=LOCAL_TIMEOUT,
            summary=f"{step.id}: local time " + (until or "after quiet hours"),
        )
        self._state.timezone = result.timezone
        self._state.utc_offset_seconds = result.utc_offset_seconds
        return datetime.fromisoformat(result.at)


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure, for reasons and search attributes."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)[:200]
