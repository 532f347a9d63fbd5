"""CampaignWorkflow: one customer's run through one campaign spec, as a state machine.

    entered ─► scoring ─► (branch) ─► [awaiting_approval] ─► acting ─► waiting ─► … ─► completed
       │ scoring or CRM failure                        │ consent missing      │ cohort exit
       └──────────────► fallback          consent_blocked ◄┘          exited ◄┘
    rejected: an operator said no, or the approval expired with ``on_timeout: reject``.

The workflow only decides. Every side effect (loading the spec, scoring, consent-gated CRM
writes, audit rows, the safe default segment) is an activity; waits are durable timers.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
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
        CohortExited,
        Comparison,
        ConsentChanged,
        CrmOutcome,
        CrmWriteInput,
        CrmWriteResult,
        DecideRequest,
        DecideResult,
        FallbackInput,
        FallbackResult,
        LoadSpecInput,
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
MAX_STEPS = 200  # a spec with a cycle can never loop a workflow for ever


def approval_id_for(workflow_id: str, step_id: str) -> str:
    """A short, stable approval id operators can type."""
    return "apr_" + hashlib.sha256(f"{workflow_id}:{step_id}".encode()).hexdigest()[:12]


def holdout_variant(campaign_id: str, customer_key: str, holdout_percent: float) -> str:
    """Deterministic assignment: the same customer always lands in the same arm."""
    if holdout_percent <= 0:
        return "treatment"
    bucket = int(hashlib.sha256(f"{campaign_id}:{customer_key}".encode()).hexdigest()[:8], 16)
    return "control" if bucket % 10_000 < holdout_percent * 100 else "treatment"


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

    # ------------------------------------------------------------------ the state machine

    @workflow.run
    async def run(self, inp: CampaignInput) -> CampaignResult:
        """Load the spec, then run its steps until a terminal state."""
        self._input = inp
        self._spec = await workflow.execute_local_activity(
            LOAD_SPEC,
            LoadSpecInput(inp.campaign_id, inp.version),
            result_type=CampaignSpecDef,
            start_to_close_timeout=LOCAL_TIMEOUT,
        )
        self._variant = holdout_variant(
            inp.campaign_id, inp.customer_key, self._spec.holdout_percent
        )
        self._transition(CampaignState.ENTERED, "loaded spec", upsert_variant=True)
        try:
            state, reason = await self._run_steps()
        except asyncio.CancelledError:
            state, reason = CampaignState.EXITED, "cancelled by an operator"
        except _Finished as done:
            state, reason = done.state, done.reason
        if state == CampaignState.FALLBACK:
            await self._fallback(reason)
        await self._audit("finish", "finished", {"state": state.value, "reason": reason})
        self._transition(state, reason)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return CampaignResult(state=state, reason=reason, steps_run=list(self._steps_run))

    async def _run_steps(self) -> tuple[CampaignState, str]:
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
        step_id: str | None = order[0]
        for _ in range(MAX_STEPS):
            if step_id is None:
                return CampaignState.COMPLETED, "all steps done"
            self._check_interrupts()
            step = steps[step_id]
            self._step_id = step.id
            self._steps_run.append(step.id)
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
        self._transition(CampaignState.SCORING, f"scoring with {', '.join(step.models)}")
        try:
            result = await workflow.execute_activity(
                SCORE_CUSTOMER,
                ScoreInput(
                    workflow_id=workflow.info().workflow_id,
                    step_id=step.id,
                    campaign_id=inp.campaign_id,
                    customer_keys=[inp.customer_key],
                    models=list(step.models),
                ),
                result_type=ScoreResult,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=SCORE_RETRY,
            )
        except ActivityError as err:
            raise _Finished(CampaignState.FALLBACK, f"scoring_failed: {_cause(err)}") from err
        customer = result.customers[0]
        self._scores = dict(customer.scores)
        self._features = dict(customer.features)
        self._model_versions = dict(result.model_versions)
        workflow.upsert_search_attributes(
            [SA.MODEL_VERSION.value_set(",".join(sorted(self._model_versions.values())))]
        )
        return None

    async def _branch(self, step: StepDef) -> str | None:
        chosen = step.default
        matched = "default"
        for index, rule in enumerate(step.rules):
            if all(self._holds(c) for c in rule.all):
                chosen, matched = rule.next, f"rules[{index}]"
                break
        await self._audit(step.id, "branch", {"taken": chosen, "matched": matched})
        return chosen

    async def _approval(self, step: StepDef) -> str | None:
        spec = self._require_spec()
        info = workflow.info()
        now = workflow.now()
        timeout = timedelta(seconds=spec.approval.timeout_seconds)
        self._pending = PendingApproval(
            approval_id=approval_id_for(info.workflow_id, step.id),
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
            await workflow.wait_condition(
                lambda: self._decision is not None or self._interrupted(), timeout=timeout
            )
        except TimeoutError:
            pending, self._pending = self._pending, None
            await self._audit(
                step.id, "approval_expired", {"on_timeout": spec.approval.on_timeout}, pending
            )
            if spec.approval.on_timeout == "fallback":
                raise _Finished(CampaignState.FALLBACK, "approval_expired") from None
            raise _Finished(CampaignState.REJECTED, "approval expired unanswered") from None
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
        if self._variant == "control":
            await self._audit(step.id, "holdout_skipped", {"action": step.action})
            return None
        while True:
            await self._wait_while_paused()
            self._transition(CampaignState.ACTING, f"CRM {step.action}")
            try:
                result = await workflow.execute_activity(
                    CRM_WRITE,
                    CrmWriteInput(
                        workflow_id=workflow.info().workflow_id,
                        step_id=step.id,
                        campaign_id=inp.campaign_id,
                        customer_key=inp.customer_key,
                        action=step.action,
                        channel=step.channel,
                        purpose=step.purpose,
                        properties=self._render(step.properties),
                        sequence_id=step.sequence_id,
                        list_id=step.list_id,
                    ),
                    result_type=CrmWriteResult,
                    task_queue=self._require_input().crm_task_queue,
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=CRM_RETRY,
                )
            except ActivityError as err:
                raise _Finished(CampaignState.FALLBACK, f"crm_failed: {_cause(err)}") from err
            if result.outcome == CrmOutcome.CONSENT_BLOCKED:
                raise _Finished(CampaignState.CONSENT_BLOCKED, result.detail or "no consent")
            if result.outcome == CrmOutcome.PAUSED:
                self._paused = True
                continue
            return None

    async def _wait(self, step: StepDef) -> str | None:
        until = workflow.now() + timedelta(seconds=step.seconds)
        self._transition(CampaignState.WAITING, f"until {until.isoformat(timespec='seconds')}")
        try:
            await workflow.wait_condition(self._interrupted, timeout=step.seconds)
        except TimeoutError:
            return None
        self._check_interrupts()
        return None

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
            self._transition(self._state, "paused by an operator")
            await workflow.wait_condition(lambda: not self._paused or self._interrupted())
            self._check_interrupts()

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
        try:
            await workflow.execute_activity(
                RESOLVE_FALLBACK,
                FallbackInput(
                    workflow_id=workflow.info().workflow_id,
                    step_id=self._step_id or "fallback",
                    campaign_id=inp.campaign_id,
                    customer_key=inp.customer_key,
                    segment=spec.safe_default_segment,
                    reason=reason,
                ),
                result_type=FallbackResult,
                task_queue=self._require_input().crm_task_queue,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=FALLBACK_RETRY,
            )
        except ActivityError as err:
            raise ApplicationError(f"could not record the fallback: {_cause(err)}") from err

    async def _audit(
        self,
        step_id: str,
        kind: str,
        payload: dict[str, Any],
        approval: PendingApproval | None = None,
    ) -> AuditResult:
        inp = self._require_input()
        result: AuditResult = await workflow.execute_local_activity(
            RECORD_AUDIT,
            AuditInput(
                workflow_id=workflow.info().workflow_id,
                step_id=step_id,
                kind=kind,
                campaign_id=inp.campaign_id,
                customer_key=inp.customer_key,
                payload=payload,
                approval=approval,
            ),
            result_type=AuditResult,
            start_to_close_timeout=LOCAL_TIMEOUT,
        )
        return result

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


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure, for reasons and search attributes."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)[:200]
