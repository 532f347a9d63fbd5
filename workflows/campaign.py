"""CampaignWorkflow: one customer's run through one campaign spec, as a state machine.

    entered ─► scoring ─► (branch) ─► [awaiting_approval] ─► acting ─► waiting ─► … ─► completed
       │ scoring or CRM failure                        │ consent missing      │ cohort exit
       └──────────────► fallback          consent_blocked ◄┘          exited ◄┘
    rejected: an operator said no, or the approval expired with ``on_timeout: reject``.

The workflow only decides. Every side effect (loading the spec, scoring, consent-gated CRM
writes, audit rows, the safe default segment, reading the customer's time zone) is an
activity; waits are durable timers raced against the conditions that may cut them short.

Customer events (signal ``customer_event``) end a wait for an event, end the campaign when
the spec lists them in ``exit_on_events``, and mark the conversion goal. A run whose history
grows past its bound continues as new, carrying its state, pending approval and the
deadline of the wait it was in (``CarriedState``).

Patch ids (``workflow.patched``), so histories of earlier releases keep replaying:
``variant-audit``: the holdout arm is written to the audit trail at entry.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.messages import (
        CAMPAIGN_WORKFLOW,
        SA,
        AuditInput,
        AuditResult,
        CampaignInput,
        CampaignResult,
        CampaignSpecDef,
        CampaignState,
        CampaignStatus,
        CarriedState,
        CohortExited,
        Comparison,
        ConsentChanged,
        CrmOutcome,
        CrmWriteInput,
        CrmWriteResult,
        CustomerEvent,
        DecideRequest,
        DecideResult,
        Decision,
        FallbackInput,
        FallbackResult,
        LoadSpecInput,
        LocalTimeInput,
        LocalTimeResult,
        PauseChanged,
        PendingApproval,
        ScoreInput,
        ScoreResult,
        StepDef,
    )

# Activity names: the workflow refers to activities by name so it never imports their code.
LOAD_SPEC = "load_spec"
SCORE_CUSTOMER = "score_customer"
CRM_WRITE = "crm_write"
RECORD_AUDIT = "record_audit"
RESOLVE_FALLBACK = "resolve_fallback"
PLAN_LOCAL_TIME = "plan_local_time"
VARIANT_AUDIT_PATCH = "variant-audit"
# Control customers never get the action an approval guards, so operators are not asked.
CONTROL_SKIPS_APPROVAL_PATCH = "control-skips-approval"
# Decisions ride with the next activity (or one local activity before a wait) instead of a
# local activity each: fewer worker round trips and database transactions per campaign.
DECISIONS_RIDE_ALONG_PATCH = "decisions-ride-along"

LOCAL_TIMEOUT = timedelta(seconds=30)
SCORE_RETRY = RetryPolicy(maximum_attempts=3, non_retryable_error_types=["ScoringError"])
# Bounded, so a CRM that stays down leads to the safe default segment instead of waiting forever.
CRM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=8,
    non_retryable_error_types=["CrmRejected"],
)
FALLBACK_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1), maximum_attempts=20)
# Counted over every run of a campaign: a cycle the validator let through (or a spec stored
# before loops were checked) still ends, while a weekly drip loop has room for years.
MAX_STEPS = 1_000
# Continue as new once a run's history passes this many events. Temporal warns at 10,240 and
# ends a run at 51,200; a worker that lost its cache replays the whole history before the next
# step (DESIGN.md: about 3.5-7 ms of CPU per workflow task), so staying near 2,000 keeps a
# replay short while a typical campaign (30-80 events) and long drips of a hundred steps or
# thousands of customer events still finish in one or a few runs.
DEFAULT_HISTORY_LIMIT = 2_000


def approval_id_for(workflow_id: str, step_id: str) -> str:
    """A short, stable approval id operators can type."""
    return "apr_" + hashlib.sha256(f"{workflow_id}:{step_id}".encode()).hexdigest()[:12]


def holdout_variant(
    campaign_id: str, customer_key: str, holdout_percent: float, stratum: str = ""
) -> str:
    """Deterministic assignment: the same customer always lands in the same arm.

    With a ``stratum`` (a score band), the draw is made within the band, so each band holds
    the spec's share of controls and both arms see the same risk mix.
    """
    if holdout_percent <= 0:
        return "treatment"
    material = f"{campaign_id}:{customer_key}" + (f":{stratum}" if stratum else "")
    bucket = int(hashlib.sha256(material.encode()).hexdigest()[:8], 16)
    return "control" if bucket % 10_000 < holdout_percent * 100 else "treatment"


def score_band(score: float, cuts: list[float]) -> str:
    """The band of ``score`` among ascending cut points: ``b0`` below the first cut, ..."""
    return f"b{sum(1 for cut in cuts if score >= cut)}"


def compare(value: float, op: str, threshold: float) -> bool:
    """Apply a spec comparison operator."""
    return {
        "<": value < threshold,
        "<=": value <= threshold,
        ">": value > threshold,
        ">=": value >= threshold,
        "==": value == threshold,
        "!=": value != threshold,
    }[op]


class _ContinueAsNew(Exception):
    """Raised where the history bound is reached; the run hands over and continues as new."""

    def __init__(self, step_id: str, deadline: datetime | None) -> None:
        super().__init__(step_id)
        self.step_id = step_id
        self.deadline = deadline


class _Finished(Exception):
    """Raised inside step handlers to end the run in a terminal state."""

    def __init__(self, state: CampaignState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


@workflow.defn(name=CAMPAIGN_WORKFLOW)
class CampaignWorkflow:
    """Interprets a campaign spec for one customer entry."""

    def __init__(self) -> None:
        self._input: CampaignInput | None = None
        self._spec: CampaignSpecDef | None = None
        self._state = CampaignState.ENTERED
        self._step_id = ""
        self._scores: dict[str, float] = {}
        self._features: dict[str, float] = {}
        self._model_versions: dict[str, str] = {}
        self._variant = "treatment"
        self._paused = False
        self._pending: PendingApproval | None = None
        self._decision: DecideRequest | None = None
        self._exit_reason = ""
        self._revoked: set[tuple[str, str]] = set()
        self._fallback_reason = ""
        self._transitions: list[str] = []
        self._steps_run: list[str] = []
        self._entered_at: datetime | None = None
        self._converted_at = ""
        self._deadline: datetime | None = None  # of the wait a continuation resumes
        self._waiting_until = ""
        self._waiting_for = ""
        self._event_seq = 0
        self._last_event: dict[str, int] = {}  # event name -> sequence number of its last arrival
        self._wait_mark = 0  # sequence number when the current wait for an event began
        self._early_events: list[CustomerEvent] = []  # arrived before the spec was loaded
        self._handing_over = False
        self._runs = 1
        self._ride_along = False  # DECISIONS_RIDE_ALONG_PATCH
        self._unrecorded: list[Decision] = []  # decisions no activity has carried yet

    # ------------------------------------------------------------------ the state machine

    @workflow.run
    async def run(self, inp: CampaignInput) -> CampaignResult:
        """Load the spec, then run its steps until a terminal state (or continue as new)."""
        self._input = inp
        self._ride_along = workflow.patched(DECISIONS_RIDE_ALONG_PATCH)
        self._spec = await workflow.execute_local_activity(
            LOAD_SPEC,
            LoadSpecInput(inp.campaign_id, inp.version),
            result_type=CampaignSpecDef,
            start_to_close_timeout=LOCAL_TIMEOUT,
        )
        if inp.carried is not None:
            self._restore(inp.carried)
        else:
            await self._enter(self._spec)
        for early in self._early_events:
            self._apply_event(early)
        try:
            state, reason = await self._run_steps(inp.carried)
        except asyncio.CancelledError:
            state, reason = CampaignState.EXITED, "cancelled by an operator"
        except _Finished as done:
            state, reason = done.state, done.reason
        except _ContinueAsNew as handover:
            self._handing_over = True
            await self._record_unrecorded()
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                self._continuation(handover),
                search_attributes=workflow.info().typed_search_attributes,
            )
        if state == CampaignState.FALLBACK:
            await self._fallback(reason)
        if self._converted_at:
            await self._audit(
                "goal", "converted", {"variant": self._variant, "at": self._converted_at}
            )
        await self._audit(
            "finish",
            "finished",
            {"state": state.value, "reason": reason, "variant": self._variant},
            now=True,
        )
        self._transition(state, reason)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return CampaignResult(state=state, reason=reason, steps_run=list(self._steps_run))

    async def _enter(self, spec: CampaignSpecDef) -> None:
        """A fresh entry: draw the holdout arm (unless it waits for a score) and record it."""
        inp = self._require_input()
        self._entered_at = workflow.now()
        # A stratified draw needs the score band, known after the first (score) step.
        self._variant = (
            "unassigned"
            if spec.holdout_score
            else holdout_variant(inp.campaign_id, inp.customer_key, spec.holdout_percent)
        )
        self._transition(CampaignState.ENTERED, "loaded spec", upsert_variant=True)
        if not spec.holdout_score and workflow.patched(VARIANT_AUDIT_PATCH):
            await self._audit(
                "entry",
                "variant_assigned",
                {"variant": self._variant, "holdout_percent": spec.holdout_percent},
            )

    async def _run_steps(self, carried: CarriedState | None) -> tuple[CampaignState, str]:
        spec = self._require_spec()
        steps = {s.id: s for s in spec.steps}
        order = [s.id for s in spec.steps]
        handlers = {
            "score": self._score,
            "branch": self._branch,
            "approval": self._approval,
            "crm": self._crm,
            "wait": self._wait,
        }
        step_id: str | None = order[0] if carried is None else carried.step_id
        resuming = carried is not None
        while len(self._steps_run) < MAX_STEPS:
            if step_id is None:
                return CampaignState.COMPLETED, "all steps done"
            self._check_interrupts()
            if not resuming and self._continue_due():
                self._steps_run.append(step_id)  # counted here: the continuation resumes it
                raise _ContinueAsNew(step_id, None)
            step = steps[step_id]
            self._step_id = step.id
            if not resuming:  # a resumed step was counted by the run that started it
                self._steps_run.append(step.id)
            resuming = False
            if step.type == "exit":
                return CampaignState(step.outcome), f"reached exit step {step.id}"
            chosen = await handlers[step.type](step)
            if chosen is None:
                following = order.index(step.id) + 1
                chosen = step.next or (order[following] if following < len(order) else None)
            step_id = chosen
        return CampaignState.FAILED, f"spec ran more than {MAX_STEPS} steps"

    # ------------------------------------------------------------------ step handlers

    async def _score(self, step: StepDef) -> str | None:
        inp = self._require_input()
        spec = self._require_spec()
        self._transition(CampaignState.SCORING, f"scoring with {', '.join(step.models)}")
        carried = list(self._unrecorded)
        try:
            result = await workflow.execute_activity(
                SCORE_CUSTOMER,
                ScoreInput(
                    workflow_id=workflow.info().workflow_id,
                    step_id=self._visit_id(step.id),
                    campaign_id=inp.campaign_id,
                    customer_keys=[inp.customer_key],
                    models=list(step.models),
                    decisions=carried,
                ),
                result_type=ScoreResult,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=SCORE_RETRY,
            )
        except ActivityError as err:
            raise _Finished(CampaignState.FALLBACK, f"scoring_failed: {_cause(err)}") from err
        del self._unrecorded[: min(len(carried), result.decisions_recorded)]
        customer = result.customers[0]
        self._scores = dict(customer.scores)
        self._features = dict(customer.features)
        self._model_versions = dict(result.model_versions)
        updates: list[SearchAttributeUpdate[Any]] = [
            SA.MODEL_VERSION.value_set(",".join(sorted(self._model_versions.values())))
        ]
        if self._variant == "unassigned":
            band = score_band(self._scores.get(spec.holdout_score, 0.0), spec.holdout_bands)
            self._variant = holdout_variant(
                inp.campaign_id, inp.customer_key, spec.holdout_percent, band
            )
            updates.append(SA.VARIANT.value_set(self._variant))
            await self._audit(
                "entry",
                "variant_assigned",
                {
                    "variant": self._variant,
                    "holdout_percent": spec.holdout_percent,
                    "stratum": f"{spec.holdout_score} {band}",
                },
            )
        workflow.upsert_search_attributes(updates)
        return None

    async def _branch(self, step: StepDef) -> str | None:
        chosen = step.default
        matched = "default"
        for index, rule in enumerate(step.rules):
            if all(self._holds(c) for c in rule.all):
                chosen, matched = rule.next, f"rules[{index}]"
                break
        await self._audit(self._visit_id(step.id), "branch", {"taken": chosen, "matched": matched})
        return chosen

    async def _approval(self, step: StepDef) -> str | None:
        spec = self._require_spec()
        # A control run continued from before the patch may carry a pending request: that
        # one is answered or expires as it was asked.
        if (
            self._variant == "control"
            and self._pending is None
            and workflow.patched(CONTROL_SKIPS_APPROVAL_PATCH)
        ):
            await self._audit(step.id, "holdout_skipped", {"action": "approval"})
            return None
        resumed = self._take_deadline()
        if resumed is not None and self._pending is not None:
            # A continuation: the request was made and audited by an earlier run.
            timeout = resumed - workflow.now()
        else:
            now = workflow.now()
            timeout = timedelta(seconds=spec.approval.timeout_seconds)
            self._pending = PendingApproval(
                approval_id=approval_id_for(workflow.info().workflow_id, step.id),
                step_id=step.id,
                reason=step.reason or "sensitive campaign",
                requested_at=now.isoformat(),
                expires_at=(now + timeout).isoformat(),
            )
            self._decision = None
            await self._audit(
                step.id,
                "approval_requested",
                {"scores": self._scores, "expires_at": self._pending.expires_at},
                approval=self._pending,
            )
        self._transition(CampaignState.AWAITING_APPROVAL, "waiting for an operator")
        try:
            if timeout <= timedelta(0):
                raise TimeoutError
            await workflow.wait_condition(
                lambda: self._decision is not None or self._interrupted() or self._continue_due(),
                timeout=timeout,
            )
        except TimeoutError:
            pending, self._pending = self._pending, None
            await self._audit(
                step.id, "approval_expired", {"on_timeout": spec.approval.on_timeout}, pending
            )
            if spec.approval.on_timeout == "fallback":
                raise _Finished(CampaignState.FALLBACK, "approval_expired") from None
            raise _Finished(CampaignState.REJECTED, "approval expired unanswered") from None
        if self._decision is None and not self._interrupted():
            # The history bound: the approval stays pending in the continuation.
            raise _ContinueAsNew(step.id, datetime.fromisoformat(self._pending.expires_at))
        pending, self._pending = self._pending, None
        if self._decision is None:
            await self._audit(
                step.id, "approval_withdrawn", {"why": "campaign interrupted"}, pending
            )
            self._check_interrupts()
        decision = self._decision
        assert decision is not None
        await self._audit(
            step.id,
            "approval_decided",
            {
                "approve": decision.approve,
                "operator": decision.operator,
                "reason": decision.reason,
            },
            pending,
        )
        if not decision.approve:
            raise _Finished(CampaignState.REJECTED, f"rejected by {decision.operator}")
        return None

    async def _crm(self, step: StepDef) -> str | None:
        inp = self._require_input()
        spec = self._require_spec()
        if self._variant == "control":
            await self._audit(self._visit_id(step.id), "holdout_skipped", {"action": step.action})
            return None
        opens = self._take_deadline()
        if spec.quiet_start:
            opens = opens or await self._local_time(
                quiet_start=spec.quiet_start, quiet_end=spec.quiet_end
            )
            if opens > workflow.now():
                await self._hold(step, opens, f"quiet hours until {_clock(opens)}")
        while True:
            await self._wait_while_paused()
            self._transition(CampaignState.ACTING, f"CRM {step.action}")
            carried = list(self._unrecorded)
            try:
                result = await workflow.execute_activity(
                    CRM_WRITE,
                    CrmWriteInput(
                        workflow_id=workflow.info().workflow_id,
                        step_id=self._visit_id(step.id),
                        campaign_id=inp.campaign_id,
                        customer_key=inp.customer_key,
                        action=step.action,
                        channel=step.channel,
                        purpose=step.purpose,
                        properties=self._render(step.properties),
                        sequence_id=step.sequence_id,
                        list_id=step.list_id,
                        cap_max_actions=spec.cap_max_actions,
                        cap_window_seconds=spec.cap_window_seconds,
                        decisions=carried,
                    ),
                    result_type=CrmWriteResult,
                    task_queue=self._require_input().crm_task_queue,
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=CRM_RETRY,
                )
            except ActivityError as err:
                raise _Finished(CampaignState.FALLBACK, f"crm_failed: {_cause(err)}") from err
            del self._unrecorded[: min(len(carried), result.decisions_recorded)]
            if result.outcome == CrmOutcome.CONSENT_BLOCKED:
                raise _Finished(CampaignState.CONSENT_BLOCKED, result.detail or "no consent")
            if result.outcome == CrmOutcome.PAUSED:
                self._paused = True
                continue
            if result.outcome == CrmOutcome.CAPPED:
                return step.on_capped
            return None

    async def _wait(self, step: StepDef) -> str | None:
        if step.event:
            return await self._wait_for_event(step)
        until = self._take_deadline()
        if until is None:
            if step.until:
                until = await self._local_time(until=step.until)
            else:
                until = workflow.now() + timedelta(seconds=step.seconds)
        await self._hold(step, until, f"until {until.isoformat(timespec='seconds')}")
        return None

    async def _wait_for_event(self, step: StepDef) -> str | None:
        until = self._take_deadline() or workflow.now() + timedelta(seconds=step.seconds)
        self._wait_mark = self._event_seq
        self._waiting_for = step.event
        try:
            arrived = await self._hold(
                step,
                until,
                f"for event {step.event} until {until.isoformat(timespec='seconds')}",
                lambda: self._last_event.get(step.event, 0) > self._wait_mark,
            )
        finally:
            self._waiting_for = ""
        outcome = "event" if arrived else "timeout"
        await self._audit(
            self._visit_id(step.id), "event_wait", {"event": step.event, "outcome": outcome}
        )
        return step.on_event if arrived else step.on_timeout

    async def _hold(
        self,
        step: StepDef,
        until: datetime,
        detail: str,
        arrived: Callable[[], bool] | None = None,
    ) -> bool:
        """A durable wait until ``until``; True when ``arrived`` ended it first.

        Interrupts (cohort exit, exit events, consent revocation) end it at once; reaching
        the history bound hands the rest of the wait to a continuation.
        """
        await self._record_unrecorded()
        remaining = until - workflow.now()
        self._waiting_until = until.isoformat(timespec="seconds")
        self._transition(CampaignState.WAITING, detail)
        try:
            if remaining <= timedelta(0):
                return False
            await workflow.wait_condition(
                lambda: (
                    self._interrupted()
                    or (arrived is not None and arrived())
                    or self._continue_due()
                ),
                timeout=remaining,
            )
        except TimeoutError:
            return False
        finally:
            self._waiting_until = ""
        self._check_interrupts()
        if arrived is not None and arrived():
            return True
        raise _ContinueAsNew(step.id, until)

    # ------------------------------------------------------------------ interrupts

    def _interrupted(self) -> bool:
        return bool(self._exit_reason) or bool(self._revoked)

    def _check_interrupts(self) -> None:
        if self._exit_reason:
            raise _Finished(CampaignState.EXITED, self._exit_reason)
        if self._revoked:
            channel, purpose = sorted(self._revoked)[0]
            raise _Finished(CampaignState.CONSENT_BLOCKED, f"consent revoked: {channel}/{purpose}")

    async def _wait_while_paused(self) -> None:
        if self._paused:
            await self._record_unrecorded()
            self._transition(self._state, "paused by an operator")
            await workflow.wait_condition(lambda: not self._paused or self._interrupted())
            self._check_interrupts()

    # ------------------------------------------------------------------ continue-as-new

    def _continue_due(self) -> bool:
        """Whether this run's history has reached its bound (or the server suggests it)."""
        inp = self._require_input()
        info = workflow.info()
        limit = inp.history_limit or DEFAULT_HISTORY_LIMIT
        return info.get_current_history_length() >= limit or info.is_continue_as_new_suggested()

    def _take_deadline(self) -> datetime | None:
        """The carried deadline of the resumed wait, once; later steps compute their own."""
        deadline, self._deadline = self._deadline, None
        return deadline

    def _continuation(self, handover: _ContinueAsNew) -> CampaignInput:
        inp = self._require_input()
        entered = self._entered_at or workflow.now()
        waited_for = [e for e, seq in self._last_event.items() if seq > self._wait_mark]
        return CampaignInput(
            campaign_id=inp.campaign_id,
            version=inp.version,
            customer_key=inp.customer_key,
            entry_id=inp.entry_id,
            cohort_id=inp.cohort_id,
            crm_task_queue=inp.crm_task_queue,
            history_limit=inp.history_limit,
            carried=CarriedState(
                step_id=handover.step_id,
                entered_at=entered.isoformat(),
                deadline=handover.deadline.isoformat() if handover.deadline else "",
                scores=dict(self._scores),
                features=dict(self._features),
                model_versions=dict(self._model_versions),
                variant=self._variant,
                paused=self._paused,
                pending_approval=self._pending,
                exit_reason=self._exit_reason,
                revoked=[list(pair) for pair in sorted(self._revoked)],
                converted_at=self._converted_at,
                events_awaited=waited_for if self._waiting_for else [],
                steps_run=list(self._steps_run),
                runs=self._runs + 1,
            ),
        )

    def _restore(self, carried: CarriedState) -> None:
        self._entered_at = datetime.fromisoformat(carried.entered_at)
        self._deadline = datetime.fromisoformat(carried.deadline) if carried.deadline else None
        self._scores = dict(carried.scores)
        self._features = dict(carried.features)
        self._model_versions = dict(carried.model_versions)
        self._variant = carried.variant
        self._paused = carried.paused
        self._pending = carried.pending_approval
        self._exit_reason = self._exit_reason or carried.exit_reason
        self._revoked |= {(pair[0], pair[1]) for pair in carried.revoked}
        self._converted_at = self._converted_at or carried.converted_at
        self._steps_run = list(carried.steps_run)
        self._runs = carried.runs
        # An awaited event that arrived during the hand-over still ends the resumed wait.
        for event in carried.events_awaited:
            self._event_seq += 1
            self._last_event[event] = self._event_seq

    # ------------------------------------------------------------------ messages

    @workflow.update
    async def decide(self, request: DecideRequest) -> DecideResult:
        """An operator approves or rejects the pending approval."""
        self._decision = request
        return DecideResult(
            approval_id=request.approval_id,
            decision="approved" if request.approve else "rejected",
        )

    @decide.validator
    def _validate_decide(self, request: DecideRequest) -> None:
        spec = self._require_spec()
        if self._handing_over:
            raise ValueError(
                f"approval {request.approval_id}: the campaign is continuing as new; retry"
            )
        if self._pending is None or self._state != CampaignState.AWAITING_APPROVAL:
            raise ValueError(f"approval {request.approval_id} is not pending")
        if request.approval_id != self._pending.approval_id:
            raise ValueError(f"approval {request.approval_id} is not pending here")
        if self._decision is not None:
            raise ValueError(f"approval {request.approval_id} is already decided")
        operator = request.operator.strip()
        if not operator:
            raise ValueError("operator: must not be empty")
        if not request.reason.strip():
            raise ValueError("reason: must not be empty")
        if operator == spec.owner:
            raise ValueError(f"operator: {operator} requested this campaign and cannot approve it")
        if spec.approval.approvers and operator not in spec.approval.approvers:
            raise ValueError(f"operator: {operator} is not an authorised approver")

    @workflow.signal
    def cohort_exited(self, signal: CohortExited) -> None:
        """The customer left the entry cohort; exits when the spec says so."""
        if self._spec is not None and self._spec.exit_on_cohort_exit:
            self._exit_reason = f"left cohort {signal.cohort_id}"

    @workflow.signal
    def customer_event(self, signal: CustomerEvent) -> None:
        """An event of this customer was ingested: it may end a wait, the campaign or convert."""
        self._event_seq += 1
        self._last_event[signal.event] = self._event_seq
        if self._spec is None:
            self._early_events.append(signal)
        else:
            self._apply_event(signal)

    def _apply_event(self, signal: CustomerEvent) -> None:
        spec = self._require_spec()
        if signal.event in spec.exit_on_events and not self._exit_reason:
            self._exit_reason = f"event {signal.event}"
        if signal.event == spec.conversion_event and not self._converted_at:
            entered = self._entered_at or workflow.now()
            at = _instant(signal.occurred_at) or workflow.now()
            window = timedelta(seconds=spec.conversion_window_seconds)
            if entered <= at <= entered + window:
                self._converted_at = at.isoformat()

    @workflow.signal
    def consent_changed(self, signal: ConsentChanged) -> None:
        """A consent record changed; a revocation of a channel the campaign uses stops it."""
        key = (signal.channel, signal.purpose)
        if signal.granted:
            self._revoked.discard(key)
        elif key in self._channels():
            self._revoked.add(key)

    @workflow.signal
    def pause_changed(self, signal: PauseChanged) -> None:
        """An operator paused or resumed outbound actions."""
        self._paused = signal.paused

    @workflow.query
    def status(self) -> CampaignStatus:
        """Where the campaign is and what it waits for."""
        inp = self._require_input()
        return CampaignStatus(
            state=self._state,
            step_id=self._step_id,
            campaign_id=inp.campaign_id,
            version=inp.version,
            customer_key=inp.customer_key,
            scores=dict(self._scores),
            model_versions=dict(self._model_versions),
            variant=self._variant,
            paused=self._paused,
            pending_approval=self._pending,
            fallback_reason=self._fallback_reason,
            transitions=list(self._transitions),
            waiting_until=self._waiting_until,
            waiting_for_event=self._waiting_for,
            converted_at=self._converted_at,
            runs=self._runs,
        )

    # ------------------------------------------------------------------ helpers

    def _transition(self, state: CampaignState, detail: str, upsert_variant: bool = False) -> None:
        """Enter a state: search attributes on a real change, current details always."""
        changed = state != self._state or upsert_variant
        self._state = state
        self._transitions.append(f"{workflow.now().isoformat(timespec='seconds')} {state} {detail}")
        if changed:
            updates: list[SearchAttributeUpdate[Any]] = [
                SA.CAMPAIGN_STATE.value_set(state.value),
                SA.AWAITING_APPROVAL.value_set(state == CampaignState.AWAITING_APPROVAL),
            ]
            if upsert_variant:
                updates.append(SA.VARIANT.value_set(self._variant))
            if self._fallback_reason:
                updates.append(SA.FALLBACK_REASON.value_set(self._fallback_reason))
            workflow.upsert_search_attributes(updates)
        workflow.set_current_details(self._details(detail))

    def _details(self, detail: str) -> str:
        lines = [f"**{self._state.value}** at step `{self._step_id or '-'}`: {detail}"]
        if self._pending is not None:
            lines.append(
                f"Waiting for approval `{self._pending.approval_id}` until "
                f"{self._pending.expires_at} ({self._pending.reason}). "
                f"Approve: `cohortflow approve {self._pending.approval_id} "
                "--operator NAME --reason TEXT`"
            )
        if self._scores:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(self._scores.items()))
            lines.append(f"Scores: {scores} ({', '.join(sorted(self._model_versions.values()))})")
        if self._waiting_for:
            lines.append(f"Waiting for event `{self._waiting_for}` until {self._waiting_until}.")
        elif self._waiting_until:
            lines.append(f"Waiting until {self._waiting_until}.")
        if self._paused:
            lines.append("Outbound actions paused by an operator.")
        if self._fallback_reason:
            lines.append(f"Fallback reason: {self._fallback_reason}")
        lines.append(f"Variant: {self._variant}")
        return "\n\n".join(lines)

    async def _fallback(self, reason: str) -> None:
        inp = self._require_input()
        spec = self._require_spec()
        self._fallback_reason = reason.split(":", 1)[0]
        self._transition(CampaignState.FALLBACK, reason)
        carried = list(self._unrecorded)
        try:
            result = await workflow.execute_activity(
                RESOLVE_FALLBACK,
                FallbackInput(
                    workflow_id=workflow.info().workflow_id,
                    step_id=self._visit_id(self._step_id) if self._step_id else "fallback",
                    campaign_id=inp.campaign_id,
                    customer_key=inp.customer_key,
                    segment=spec.safe_default_segment,
                    reason=reason,
                    decisions=carried,
                ),
                result_type=FallbackResult,
                task_queue=self._require_input().crm_task_queue,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=FALLBACK_RETRY,
            )
        except ActivityError as err:
            # The workflow fails here: what it decided still goes on record first.
            await self._record_unrecorded()
            raise ApplicationError(f"could not record the fallback: {_cause(err)}") from err
        del self._unrecorded[: min(len(carried), result.decisions_recorded)]

    def _visit_id(self, step_id: str) -> str:
        """The step's name in records and idempotency keys: its id on the first visit, then
        ``id#n``, so a step a loop comes back to writes, and is audited, each time."""
        visits = self._steps_run.count(step_id)
        return step_id if visits <= 1 else f"{step_id}#{visits}"

    async def _audit(
        self,
        step_id: str,
        kind: str,
        payload: dict[str, Any],
        approval: PendingApproval | None = None,
        *,
        now: bool = False,
    ) -> None:
        """Record a decision: with the next activity (see DECISIONS_RIDE_ALONG_PATCH) unless
        it changes an approval or ``now`` asks for it at once, with every one not yet recorded.
        """
        if self._ride_along and approval is None and not now:
            self._unrecorded.append(Decision(step_id, kind, payload))
            return
        carried = list(self._unrecorded)
        await self._record(Decision(step_id, kind, payload), carried, approval)
        del self._unrecorded[: len(carried)]

    async def _record_unrecorded(self) -> None:
        """Before the campaign blocks (a wait, a pause, a hand-over), record what it decided."""
        if self._unrecorded:
            # The last decision is the record and the others ride with it. Nothing leaves the
            # list before the local activity has answered: a cancel may come in between.
            *earlier, last = self._unrecorded
            await self._record(last, earlier, None)
            del self._unrecorded[: len(earlier) + 1]

    async def _record(
        self, decision: Decision, earlier: list[Decision], approval: PendingApproval | None
    ) -> None:
        inp = self._require_input()
        await workflow.execute_local_activity(
            RECORD_AUDIT,
            AuditInput(
                workflow_id=workflow.info().workflow_id,
                step_id=decision.step_id,
                kind=decision.kind,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                payload=decision.payload,
                approval=approval,
                decisions=earlier,
            ),
            result_type=AuditResult,
            start_to_close_timeout=LOCAL_TIMEOUT,
        )

    async def _local_time(
        self, until: str = "", quiet_start: str = "", quiet_end: str = ""
    ) -> datetime:
        """When a local-time rule lets the campaign go on, from the customer's time zone."""
        inp = self._require_input()
        result: LocalTimeResult = await workflow.execute_local_activity(
            PLAN_LOCAL_TIME,
            LocalTimeInput(
                customer_key=inp.customer_key,
                now=workflow.now().isoformat(),
                default_timezone=self._require_spec().default_timezone,
                until=until,
                quiet_start=quiet_start,
                quiet_end=quiet_end,
            ),
            result_type=LocalTimeResult,
            start_to_close_timeout=LOCAL_TIMEOUT,
        )
        return datetime.fromisoformat(result.at)

    def _holds(self, comparison: Comparison) -> bool:
        source = self._scores if comparison.source == "score" else self._features
        value = source.get(comparison.name)
        return value is not None and compare(value, comparison.op, comparison.value)

    def _render(self, properties: dict[str, str]) -> dict[str, str]:
        """Fill ``{cohort}``, ``{campaign}``, ``{variant}``, ``{score.NAME}`` placeholders."""
        inp = self._require_input()
        values = {
            "cohort": inp.cohort_id,
            "campaign": inp.campaign_id,
            "variant": self._variant,
            **{f"score.{k}": f"{v:.4f}" for k, v in self._scores.items()},
            **{f"model.{k}": v for k, v in self._model_versions.items()},
        }
        rendered = {}
        for key, template in properties.items():
            text = template
            for name, value in values.items():
                text = text.replace("{" + name + "}", value)
            rendered[key] = text
        return rendered

    def _channels(self) -> set[tuple[str, str]]:
        spec = self._require_spec()
        return {(s.channel, s.purpose) for s in spec.steps if s.type == "crm"}

    def _require_input(self) -> CampaignInput:
        if self._input is None:
            raise ApplicationError("workflow input not set")
        return self._input

    def _require_spec(self) -> CampaignSpecDef:
        if self._spec is None:
            raise ValueError("the campaign spec is not loaded yet")
        return self._spec


def _instant(text: str) -> datetime | None:
    """An ISO-8601 instant from a message, or None when it is not one (never raise in a handler)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _clock(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure, for reasons and search attributes."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)[:200]
