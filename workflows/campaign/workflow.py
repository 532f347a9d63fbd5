"""CampaignWorkflow: one customer's run through one campaign spec, as a state machine.

    entered ─► scoring ─► (branch) ─► [awaiting_approval] ─► acting ─► waiting ─► … ─► completed
       │ scoring or CRM failure, spec invalid          │ consent missing      │ cohort exit
       └──────────────► fallback          consent_blocked ◄┘          exited ◄┘
    rejected: an operator said no, or the approval expired with ``on_timeout: reject``.

The workflow only decides: ``interpreter.run_steps`` walks the spec and calls back one
handler per step type here. Every side effect (loading the spec, scoring, consent-gated CRM
writes, audit rows, the safe default segment, the customer's local time) is an activity
called through ``calls.ActivityCalls``; waits are durable timers raced against what may cut
them short. What a run knows is one ``RunState``, handed as it is to a continuation.
Behaviour changes go behind the patches in ``contract.PATCHES`` (docs/architecture.md).

Two generations share this code. ``CampaignWorkflow`` is the first: what it does depends on
the patches each run recorded, so its open runs replay. ``CampaignWorkflowV2``, which new
entries start, is the lean one ("What a campaign costs" in docs/architecture.md): every patch
taken without a marker, the spec pinned in the input, scoring as a local activity, search
attributes upserted once where the campaign comes to rest, and the finish recorded with the
last CRM write when nothing follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ClassVar, NoReturn

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.campaign import details, interpreter, metrics
    from workflows.campaign.activity_io import (
        CrmOutcome,
        CrmWriteResult,
        Decision,
        ScoreInput,
        ScoreResult,
    )
    from workflows.campaign.approval import ApprovalStep
    from workflows.campaign.calls import SCORING, ActivityCalls, Finished, crm_options
    from workflows.campaign.contract import (
        CAMPAIGN_WORKFLOW,
        CAMPAIGN_WORKFLOW_V2,
        CONTROL_SKIPS_APPROVAL,
        DEADLINE_ATTRIBUTES,
        DECISIONS_RIDE_ALONG,
        EARLY_SIGNALS,
        EVENTS_DURING_HANDOVER,
        SA,
        VARIANT_AUDIT,
        WITHDRAW_ON_END,
        ActivityName,
        AuditKind,
        CampaignState,
        DecideRefusal,
        HandlerName,
    )
    from workflows.campaign.definition import CampaignSpecDef, StepDef
    from workflows.campaign.interpreter import Ending, Next
    from workflows.campaign.messages import (
        CampaignResult,
        CampaignStatus,
        CohortExited,
        ConsentChanged,
        CustomerEvent,
        DecideRequest,
        DecideResult,
        PauseChanged,
    )
    from workflows.campaign.state import RECENT, CampaignInput, RunState

# Continue as new once a run's history passes this many events. Temporal warns at 10,240 and
# ends a run at 51,200; a worker that lost its cache replays the whole history before the next
# step, so staying near 2,000 keeps a replay short while a typical campaign (30-80 events)
# and long drips of a hundred steps or thousands of customer events finish in a few runs.
DEFAULT_HISTORY_LIMIT = 2_000


class _ContinueAsNew(Exception):
    """The history bound is reached: ``state.step_id`` (and ``deadline``) say where to resume."""


# A CRM write whose deadline is shorter than this (seconds) does not carry the finish: one
# that lands in the last moment before it might still time out in the campaign's eyes. The
# default (a day) leaves that only for a write retried a whole day that lands in the
# milliseconds before its deadline.
_FOLD_MIN_DEADLINE = 3_600


@workflow.defn(name=CAMPAIGN_WORKFLOW)
class CampaignWorkflow:
    """Interprets a campaign spec for one customer entry (the first generation)."""

    LEAN: ClassVar[bool] = False

    @workflow.init
    def __init__(self, inp: CampaignInput) -> None:
        self.input = inp
        self.state = inp.carried or RunState(entered_at=workflow.now().isoformat())
        self.calls = ActivityCalls(inp, self.state, lean=self.LEAN)
        self.approvals = ApprovalStep(self.calls, self.state)
        self._spec: CampaignSpecDef | None = None
        self._early: list[CohortExited | ConsentChanged | PauseChanged] = []
        self._asking = False  # waiting for an operator's answer right now
        self._handing_over = False

    @property
    def spec(self) -> CampaignSpecDef:
        """The spec this run follows; steps and their checks run only once it is loaded."""
        assert self._spec is not None, "the spec is loaded before any step runs"
        return self._spec

    # ------------------------------------------------------------------ the state machine

    @workflow.run
    async def run(self, inp: CampaignInput) -> CampaignResult:
        """Load the spec, then run its steps until a terminal state (or continue as new)."""
        if inp.carried is None:
            metrics.started(inp.campaign_id)
        self.calls.ride_along = self.calls.patched(DECISIONS_RIDE_ALONG)
        loaded = await self.calls.load_spec()
        if isinstance(loaded, CampaignSpecDef):
            self._spec, segment = loaded, loaded.safe_default_segment
            ending = await self._run_spec()
        else:
            segment, ending = loaded
            self.state.variant = "unassigned"  # no arm was drawn: in neither arm's counts
        if ending.state == CampaignState.FALLBACK:
            self.state.fallback_reason = ending.reason.split(":", 1)[0]
            self._transition(CampaignState.FALLBACK, ending.reason, safe_segment=segment)
            await self.calls.fallback(self._visit_of(self.state.step_id), ending.reason, segment)
        undo = self._spec.on_consent_revoked if self._spec is not None else []
        if ending.state == CampaignState.CONSENT_BLOCKED and undo:
            await self.calls.compensate(undo)
        state = self.state
        pending = state.pending_approval
        if pending is not None and self.calls.patched(WITHDRAW_ON_END):
            # A continued run that stopped before its approval step resumed.
            state.pending_approval = None
            why = {"why": ending.reason}
            await self.calls.audit(pending.step_id, AuditKind.APPROVAL_WITHDRAWN, why, pending)
        await self._record_finish(ending)
        self._transition(ending.state, ending.reason, safe_segment=segment)
        await workflow.wait_condition(workflow.all_handlers_finished)
        fallen = segment if ending.state == CampaignState.FALLBACK else ""
        metrics.finished(inp.campaign_id, ending.state.value, state.fallback_reason)
        return CampaignResult(ending.state, ending.reason, list(state.steps_run), fallen)

    async def _record_finish(self, ending: Ending) -> None:
        """The conversion, if any, and the finish on record, unless the last CRM write put
        them there (a conversion heard after it is recorded now)."""
        state, recorded = self.state, self.state.finish_recorded
        if state.converted_at and not (recorded and state.converted_on_record):
            payload = interpreter.conversion_payload(state)
            await self.calls.audit("goal", AuditKind.CONVERTED, payload)
        if recorded:
            await self.calls.record_unrecorded()
            return
        payload = interpreter.finish_payload(state, ending)
        await self.calls.audit("finish", AuditKind.FINISHED, payload, now=True)

    async def _run_spec(self) -> Ending:
        """Enter (or resume), then let the interpreter walk the spec through the handlers."""
        resume_at = self.state.step_id if self.input.carried is not None else ""
        if not resume_at:
            await self._enter()
        self._apply_early_signals(resumed=bool(resume_at))
        for early in self.state.early_events:
            interpreter.apply_event(self.state, self.spec, early, workflow.now())
        self.state.early_events.clear()
        try:
            return await interpreter.run_steps(
                self.spec, self, self.state.steps_run, resume_at=resume_at
            )
        except asyncio.CancelledError:
            return Ending(CampaignState.EXITED, "cancelled by an operator")
        except Finished as done:
            return done.ending
        except _ContinueAsNew:
            await self._hand_over()

    async def _enter(self) -> None:
        """A fresh entry: draw the holdout arm (unless it waits for a score) and record it."""
        spec, state = self.spec, self.state
        state.variant = interpreter.entry_variant(spec, self.input.customer_key)
        self._transition(CampaignState.ENTERED, "loaded spec", upsert_variant=True)
        if not spec.holdout_score and self.calls.patched(VARIANT_AUDIT):
            payload = {"variant": state.variant, "holdout_percent": spec.holdout_percent}
            await self.calls.audit("entry", AuditKind.VARIANT_ASSIGNED, payload)

    async def begin(self, step_id: str, resumed: bool) -> Ending | None:
        """Before each step: stop if the customer must leave; hand over at the history bound.
        A campaign whose finish is on record already goes straight to its exit."""
        if self.state.finish_recorded:
            self.state.step_id = step_id
            return None
        stop = interpreter.interruption(self.state, self.spec)
        if stop is not None:
            return stop
        self.state.step_id = step_id
        if not resumed and self._continue_due():
            self.state.steps_run.append(step_id)  # counted here: the continuation resumes it
            raise _ContinueAsNew
        return None

    # ------------------------------------------------------------------ step handlers

    async def score(self, step: StepDef) -> Next:
        """Score the customer; a stratified holdout draws its arm from the first score."""
        state, spec = self.state, self.spec
        self._transition(CampaignState.SCORING, f"scoring with {', '.join(step.models)}")
        result = await self.calls.carry(
            ActivityName.SCORE_CUSTOMER,
            lambda carried: ScoreInput(
                workflow_id=workflow.info().workflow_id,
                step_id=self._visit(step),
                campaign_id=self.input.campaign_id,
                customer_keys=[self.input.customer_key],
                models=list(step.models),
                decisions=carried,
            ),
            ScoreResult,
            SCORING,
            f"{step.id}: score {', '.join(step.models)}",
            stop=self._interruption,
        )
        customer = result.customers[0]
        state.scores, state.features = dict(customer.scores), dict(customer.features)
        state.model_versions = dict(result.model_versions)
        versions = ",".join(sorted(state.model_versions.values()))
        # The lean generation shows them at the next rest (``_transition``).
        updates: list[SearchAttributeUpdate[Any]] = [SA.MODEL_VERSION.value_set(versions)]
        if state.variant == "unassigned":
            key = self.input.customer_key
            state.variant, band = interpreter.stratified_variant(spec, key, state.scores)
            updates.append(SA.VARIANT.value_set(state.variant))
            stratum = f"{spec.holdout_score} {band}"
            payload = {"variant": state.variant, "holdout_percent": spec.holdout_percent}
            await self.calls.audit(
                "entry", AuditKind.VARIANT_ASSIGNED, {**payload, "stratum": stratum}
            )
        if not self.LEAN:
            workflow.upsert_search_attributes(updates)
        return None

    async def branch(self, step: StepDef) -> Next:
        """Take the first rule that holds for the scores and features, else the default."""
        choice = interpreter.choose_branch(step, self.state.scores, self.state.features)
        details.remember(self.state, workflow.now(), details.branch_line(step.id, choice))
        payload = {"taken": choice.next, "matched": choice.matched, "values": choice.values}
        await self.calls.audit(self._visit(step), AuditKind.BRANCH, payload)
        return choice.next

    async def approval(self, step: StepDef) -> Next:
        """Ask an operator and wait for the answer, the approval's expiry or an interrupt."""
        state = self.state
        # A control run continued from before the patch may carry a pending request: that
        # one is answered or expires as it was asked.
        if (
            state.variant == "control"
            and state.pending_approval is None
            and self.calls.patched(CONTROL_SKIPS_APPROVAL)
        ):
            await self.calls.audit(step.id, AuditKind.HOLDOUT_SKIPPED, {"action": "approval"})
            return None
        resumed = self._take_deadline()
        # Asking from here: the request's record lands (and an operator may answer it) before
        # the run hears that it did; an answer in that moment is taken, not refused.
        self._asking = True
        try:
            if resumed is not None and state.pending_approval is not None:
                timeout = resumed - workflow.now()  # asked and audited by an earlier run
            else:
                timeout = await self.approvals.ask(step, self.spec.approval)
            self._transition(CampaignState.AWAITING_APPROVAL, "waiting for an operator")
            await self.approvals.wait(
                step,
                self.spec.approval,
                timeout,
                lambda: state.decision is not None or self._interrupted() or self._continue_due(),
            )
        except TimeoutError:
            return await self.approvals.expired(step, self.spec.approval)
        finally:
            self._asking = False
        pending = state.pending_approval
        assert pending is not None
        if state.decision is None and not self._interrupted():
            state.deadline = pending.expires_at  # it stays pending in the continuation
            raise _ContinueAsNew
        state.pending_approval = None
        if state.decision is None:
            why = {"why": "campaign interrupted"}
            await self.calls.audit(step.id, AuditKind.APPROVAL_WITHDRAWN, why, pending)
            raise Finished(self._stop())
        return await self.approvals.decided(step, self.spec.approval, state.decision, pending)

    async def crm(self, step: StepDef) -> Next:
        """Wait out quiet hours and a pause, then write through the consent and cap gate."""
        spec = self.spec
        if self.state.variant == "control":
            payload = {"action": step.action}
            await self.calls.audit(self._visit(step), AuditKind.HOLDOUT_SKIPPED, payload)
            return None
        opens = self._take_deadline()
        if spec.quiet_start:
            quiet = (spec.quiet_start, spec.quiet_end)
            tz = spec.default_timezone
            opens = opens or await self.calls.local_time(step, tz, quiet=quiet)
            if opens > workflow.now():
                await self._hold(step, opens, "quiet hours")
        while True:
            await self._wait_while_paused()
            self._transition(CampaignState.ACTING, f"CRM {step.action}")
            last = self._finish_with(step)
            result = await self.calls.carry(
                ActivityName.CRM_WRITE,
                partial(
                    interpreter.crm_write_input,
                    spec,
                    step,
                    self.state,
                    self.input,
                    workflow.info().workflow_id,
                    if_written=last,
                ),
                CrmWriteResult,
                crm_options(spec),
                f"{step.id}: {step.action} {step.sequence_id or step.list_id}".strip(),
                stop=self._interruption,
                settle_cancel=bool(last),
            )
            if result.outcome == CrmOutcome.CONSENT_BLOCKED:
                return Ending(CampaignState.CONSENT_BLOCKED, result.detail or "no consent")
            if result.outcome == CrmOutcome.PAUSED:
                self.state.paused = True
                continue
            if result.outcome == CrmOutcome.WAIT_WINDOW:  # e.g. the CRM's daily limit
                # At least a minute: a CRM whose clock disagrees with ours is not hammered.
                soonest = workflow.now() + timedelta(minutes=1)
                retry_at = max(interpreter.instant(result.retry_at) or soonest, soonest)
                await self._hold(step, retry_at, "the CRM's rate window")
                continue
            if result.outcome == CrmOutcome.CAPPED:
                details.remember(self.state, workflow.now(), f"{step.id}: {result.detail}")
                return step.on_capped
            if result.if_written_recorded:
                self.state.finish_recorded = True
                self.state.converted_on_record = len(last) > 1
            return None

    def _finish_with(self, step: StepDef) -> list[Decision]:
        """What a lean campaign's CRM write records if written, when nothing acts after it:
        the finish (and a conversion already heard), so no activity follows the write.

        Not when a revocation must undo the campaign's writes (``on_consent_revoked``) or
        the write's deadline (``crm.give_up_after``) is short: either may end the campaign
        otherwise after the CRM took it."""
        spec, state = self.spec, self.state
        deadline = spec.crm_give_up_after_seconds
        if not self.LEAN or spec.on_consent_revoked or 0 < deadline < _FOLD_MIN_DEADLINE:
            return []
        ending = interpreter.ending_after(spec, step, state.steps_run)
        if ending is None or state.pending_approval is not None:
            return []
        return interpreter.finish_decisions(state, ending)

    async def wait(self, step: StepDef) -> Next:
        """Wait a duration, until a local time of day, or for an event (with a timeout)."""
        if step.event:
            return await self._wait_for_event(step)
        until = self._take_deadline()
        if until is None and step.until:
            until = await self.calls.local_time(step, self.spec.default_timezone, until=step.until)
        await self._hold(step, until or workflow.now() + timedelta(seconds=step.seconds), "wait")
        return None

    async def exit(self, step: StepDef) -> Next:
        """End where the exit step says."""
        return interpreter.exit_ending(step)

    async def _wait_for_event(self, step: StepDef) -> Next:
        state = self.state
        until = self._take_deadline()
        # A wait listens from its start; one resumed by a continuation also hears what arrived
        # during the hand-over (EVENTS_DURING_HANDOVER).
        heard = until is not None and step.event in state.events_awaited
        if not (heard and self.calls.patched(EVENTS_DURING_HANDOVER)):
            state.events_awaited.clear()
        until = until or workflow.now() + timedelta(seconds=step.seconds)
        state.waiting_for = step.event
        try:
            arrived = await self._hold(
                step, until, f"event {step.event}", lambda: step.event in state.events_awaited
            )
        finally:
            state.waiting_for = ""
        outcome = "event" if arrived else "timeout"
        details.remember(state, workflow.now(), f"{step.id}: {step.event} {outcome}")
        payload = {"event": step.event, "outcome": outcome}
        await self.calls.audit(self._visit(step), AuditKind.EVENT_WAIT, payload)
        return step.on_event if arrived else step.on_timeout

    async def _hold(
        self, step: StepDef, until: datetime, what: str, arrived: Callable[[], bool] | None = None
    ) -> bool:
        """A durable wait until ``until``; True when ``arrived`` ended it first.

        Interrupts (cohort exit, exit events, consent revocation) end it at once; reaching
        the history bound hands the rest of the wait to a continuation.
        """
        await self.calls.record_unrecorded()
        remaining = until - workflow.now()
        self.state.waiting_until = details.clock(until)
        self._transition(CampaignState.WAITING, f"{what} until {details.clock(until)}")

        def ends() -> bool:
            heard = arrived is not None and arrived()
            return self._interrupted() or heard or self._continue_due()

        try:
            if remaining <= timedelta(0):
                return False
            summary = f"{step.id}: {what}"
            await workflow.wait_condition(ends, timeout=remaining, timeout_summary=summary)
        except TimeoutError:
            return False
        finally:
            self.state.waiting_until = ""
        if self._interrupted():
            raise Finished(self._stop())
        if arrived is not None and arrived():
            return True
        self.state.deadline = until.isoformat()
        raise _ContinueAsNew

    # ------------------------------------------------------------------ messages

    @workflow.update(name=HandlerName.DECIDE)
    def decide(self, request: DecideRequest) -> DecideResult:
        """An operator approves or rejects the pending approval."""
        return interpreter.take_decision(self.state, self.spec, request)

    @decide.validator
    def _validate_decide(self, request: DecideRequest) -> None:
        """Refuse, before anything enters history, a decision this approval cannot take:
        its type is a ``DecideRefusal``, its first detail the request field at fault."""
        earlier = interpreter.earlier_decision(self.state, self._spec, request)
        if earlier is not None:
            # Taken once already: refused, so nothing enters history twice, with the result.
            raise ApplicationError(
                f"approval {request.approval_id}: {request.operator} {earlier.decision} it already",
                earlier.decision,
                earlier.remaining,
                type=DecideRefusal.REPEATED,
                non_retryable=True,
            )
        refusal = interpreter.decide_refusal(
            self.state, self._spec, request, asking=self._asking, handing_over=self._handing_over
        )
        if refusal is not None:
            kind, message, field = refusal
            raise ApplicationError(message, field or "approval_id", type=kind, non_retryable=True)

    @workflow.signal(name=HandlerName.COHORT_EXITED)
    def cohort_exited(self, signal: CohortExited) -> None:
        """The customer left the entry cohort; the campaign exits if its spec says so."""
        self._take(signal)

    @workflow.signal(name=HandlerName.CUSTOMER_EVENT)
    def customer_event(self, signal: CustomerEvent) -> None:
        """An event of this customer: it may end a wait, the campaign, or meet the goal."""
        if signal.event not in self.state.events_awaited:
            self.state.events_awaited.append(signal.event)
        if self._spec is None:
            self.state.early_events.append(signal)
        else:
            interpreter.apply_event(self.state, self._spec, signal, workflow.now())

    @workflow.signal(name=HandlerName.CONSENT_CHANGED)
    def consent_changed(self, signal: ConsentChanged) -> None:
        """A consent record changed; revoking a channel the campaign uses stops it."""
        self._take(signal)

    @workflow.signal(name=HandlerName.PAUSE_CHANGED)
    def pause_changed(self, signal: PauseChanged) -> None:
        """An operator paused or resumed outbound actions."""
        self._take(signal)

    def _take(self, signal: CohortExited | ConsentChanged | PauseChanged) -> None:
        """Record what a signal says; one that arrives before the spec is loaded waits for it
        (``_apply_early_signals``)."""
        if self._spec is None:
            self._early.append(signal)
        else:
            interpreter.apply_signal(self.state, signal)

    def _apply_early_signals(self, *, resumed: bool) -> None:
        """Signals heard before the spec loaded, now that it has (EARLY_SIGNALS). Before the
        patch only a fresh run's pause survived: a continuation's carried state overwrote
        it, and a cohort exit was dropped."""
        early, self._early = self._early, []
        if early and self.calls.patched(EARLY_SIGNALS):
            for signal in early:
                self._take(signal)
            return
        for signal in early:
            if isinstance(signal, PauseChanged) and not resumed:
                self.state.paused = signal.paused

    @workflow.query(name=HandlerName.STATUS)
    def status(self) -> CampaignStatus:
        """Where the campaign is, what it waits for and what it decided last."""
        return details.status(self.state, self.input)

    # ------------------------------------------------------------------ helpers

    def _transition(
        self,
        new: CampaignState,
        detail: str,
        *,
        upsert_variant: bool = False,
        safe_segment: str = "",
    ) -> None:
        """Enter a state: search attributes when one an SRE queries changes, details always."""
        state = self.state
        changed = new != state.current or upsert_variant
        # Operators filter on AwaitingApproval: it must not outlive the wait for them.
        answered = state.current == CampaignState.AWAITING_APPROVAL and changed
        state.current = new
        now = workflow.now()
        state.transitions.append(f"{details.clock(now)} {new} {detail}")
        del state.transitions[: -2 * RECENT]
        if not self.LEAN:
            self._show_on_change(new, changed, upsert_variant)
        elif new.terminal or state.paused or answered or interpreter.rests(state, new, now):
            self._show_at_rest(new)
        text = details.current_details(state, detail, safe_segment=safe_segment)
        workflow.set_current_details(text)

    def _show_on_change(self, new: CampaignState, changed: bool, upsert_variant: bool) -> None:
        """The first generation's upsert: at every change of state, and of a deadline."""
        state = self.state
        deadlines = self._deadline_updates(new)
        if changed or deadlines:
            updates: list[SearchAttributeUpdate[Any]] = [
                SA.CAMPAIGN_STATE.value_set(new.value),
                SA.AWAITING_APPROVAL.value_set(new == CampaignState.AWAITING_APPROVAL),
                *deadlines,
            ]
            if upsert_variant:
                updates.append(SA.VARIANT.value_set(state.variant))
            if state.fallback_reason:
                updates.append(SA.FALLBACK_REASON.value_set(state.fallback_reason))
            workflow.upsert_search_attributes(updates)

    def _show_at_rest(self, new: CampaignState) -> None:
        """One upsert of every search attribute that differs from what the campaign resting
        in ``new`` should show (none when all agree)."""
        updates = _differing(interpreter.visible_attributes(self.state, new))
        if updates:
            workflow.upsert_search_attributes(updates)

    def _deadline_updates(self, new: CampaignState) -> list[SearchAttributeUpdate[Any]]:
        """ApprovalDeadline and WaitUntil changes (DEADLINE_ATTRIBUTES): set while the
        campaign waits for an operator or a time, unset once it no longer does."""
        changes = _differing(interpreter.deadlines(self.state, new))
        if not changes or not self.calls.patched(DEADLINE_ATTRIBUTES):
            return []
        return changes

    async def _wait_while_paused(self) -> None:
        if self.state.paused:
            await self.calls.record_unrecorded()
            self._transition(self.state.current, "paused by an operator")
            await workflow.wait_condition(lambda: not self.state.paused or self._interrupted())
            if self._interrupted():
                raise Finished(self._stop())

    def _interruption(self) -> Ending | None:
        return interpreter.interruption(self.state, self.spec)

    def _interrupted(self) -> bool:
        return self._interruption() is not None

    def _stop(self) -> Ending:
        stop = self._interruption()
        assert stop is not None
        return stop

    def _visit(self, step: StepDef) -> str:
        return interpreter.visit_id(step.id, self.state.steps_run)

    def _visit_of(self, step_id: str) -> str:
        """The record name of the step a fallback came from; ``fallback`` before any step."""
        return interpreter.visit_id(step_id, self.state.steps_run) if step_id else "fallback"

    def _continue_due(self) -> bool:
        """Whether this run's history has reached its bound (or the server suggests it)."""
        info = workflow.info()
        limit = self.input.history_limit or DEFAULT_HISTORY_LIMIT
        return info.get_current_history_length() >= limit or info.is_continue_as_new_suggested()

    def _take_deadline(self) -> datetime | None:
        """The carried deadline of the resumed wait, once; later steps compute their own."""
        deadline, self.state.deadline = self.state.deadline, ""
        return interpreter.instant(deadline) if deadline else None

    async def _hand_over(self) -> NoReturn:
        """Record what was decided, let handlers finish, and continue as new with the state."""
        self._handing_over = True
        await self.calls.record_unrecorded()
        await workflow.wait_condition(workflow.all_handlers_finished)
        self.state.runs += 1
        workflow.continue_as_new(
            replace(self.input, carried=self.state),
            search_attributes=workflow.info().typed_search_attributes,
        )


def _differing(wanted: Mapping[SearchAttributeKey[Any], Any]) -> list[SearchAttributeUpdate[Any]]:
    """The updates that bring the run's search attributes to ``wanted`` (None: unset)."""
    current = workflow.info().typed_search_attributes
    return [
        key.value_set(value) if value is not None else key.value_unset()
        for key, value in wanted.items()
        if current.get(key) != value
    ]


@workflow.defn(name=CAMPAIGN_WORKFLOW_V2)
class CampaignWorkflowV2(CampaignWorkflow):
    """The lean generation, which new entries start (see the module's docstring)."""

    LEAN = True

    @workflow.run
    async def run(self, inp: CampaignInput) -> CampaignResult:
        """As the first generation's run, at the lean generation's cost."""
        return await super().run(inp)
