"""The approval step's own moves, for the campaign workflows: ask, wait for the answer (escalating
once on the way when the spec says so), and put the answer or the expiry on record.

Workflow code: it runs inside the workflow, through the run's ``ActivityCalls``. The step's
place in the state machine (when it is entered, what interrupts it, the hand-over to a
continuation) stays in ``workflow.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.campaign import details, interpreter
    from workflows.campaign.calls import ActivityCalls
    from workflows.campaign.contract import (
        APPROVAL_ESCALATION,
        DECISION_AFTER_ACCEPTANCE,
        AuditKind,
        CampaignState,
        FallbackReason,
    )
    from workflows.campaign.definition import ApprovalPolicy, StepDef
    from workflows.campaign.interpreter import Ending, Next
    from workflows.campaign.messages import DecideRequest, PendingApproval
    from workflows.campaign.state import RunState


class ApprovalStep:
    """One run's approval requests, under the spec's approval policy."""

    def __init__(self, calls: ActivityCalls, state: RunState) -> None:
        self._calls = calls
        self._state = state

    async def ask(self, step: StepDef, policy: ApprovalPolicy) -> timedelta:
        """Open a request (audited, shown in the inbox); how long it stays open."""
        now = workflow.now()
        timeout = timedelta(seconds=policy.timeout_seconds)
        pending = PendingApproval(
            approval_id=interpreter.approval_id_for(workflow.info().workflow_id, step.id),
            step_id=step.id,
            reason=step.reason or "sensitive campaign",
            requested_at=now.isoformat(),
            expires_at=(now + timeout).isoformat(),
        )
        self._state.pending_approval, self._state.decision = pending, None
        self._state.approvals = []
        payload = {"scores": self._state.scores, "expires_at": pending.expires_at}
        await self._calls.audit(step.id, AuditKind.APPROVAL_REQUESTED, payload, approval=pending)
        return timeout

    async def wait(
        self,
        step: StepDef,
        policy: ApprovalPolicy,
        open_for: timedelta,
        answered: Callable[[], bool],
    ) -> None:
        """Wait up to ``open_for`` until ``answered``; :class:`TimeoutError` when the request
        expires first. A request still unanswered ``escalate_before`` its expiry is escalated
        once (APPROVAL_ESCALATION); a continuation remembers that it was."""
        pending = self._state.pending_approval
        assert pending is not None
        expires = workflow.now() + open_for
        early = _escalation_in(policy, pending, expires, self._calls)
        if early is not None:
            if await _until(answered, early, f"{step.id}: approval escalates"):
                return
            await self._escalate(pending, expires)
            open_for = expires - workflow.now()
        if not await _until(answered, open_for, f"{step.id}: approval expires"):
            raise TimeoutError

    async def _escalate(self, pending: PendingApproval, expires: datetime) -> None:
        now = workflow.now()
        pending.escalated_at = now.isoformat()
        line = f"{pending.step_id}: escalated, unanswered until {details.clock(expires)}"
        details.remember(self._state, now, line)
        workflow.set_current_details(details.current_details(self._state, line))
        await self._calls.escalate(pending)

    async def expired(self, step: StepDef, policy: ApprovalPolicy) -> Ending:
        """Close a request nobody answered in time, as ``on_timeout`` says."""
        pending, self._state.pending_approval = self._state.pending_approval, None
        details.remember(self._state, workflow.now(), f"{step.id}: expired unanswered")
        payload: dict[str, Any] = {"on_timeout": policy.on_timeout}
        if self._state.approvals:  # some approved, too few
            payload["approved_by"] = interpreter.approvers_of(self._state)
        await self._calls.audit(step.id, AuditKind.APPROVAL_EXPIRED, payload, pending)
        if policy.on_timeout == "fallback":
            return Ending(CampaignState.FALLBACK, FallbackReason.APPROVAL_EXPIRED.value)
        return Ending(CampaignState.REJECTED, "approval expired unanswered")

    async def decided(
        self,
        step: StepDef,
        policy: ApprovalPolicy,
        decision: DecideRequest,
        pending: PendingApproval,
    ) -> Next:
        """Put the answer on record; a rejection ends the campaign."""
        details.remember(self._state, workflow.now(), details.decision_line(step.id, decision))
        payload: dict[str, Any] = {"approve": decision.approve, "operator": decision.operator}
        payload["reason"] = decision.reason
        if policy.required > 1:
            payload["approved_by"] = interpreter.approvers_of(self._state, decision)
        # The decision came by an update, which is saved with the task that accepted it:
        # recorded from inside that task, a task lost with its worker left a record (and an
        # inbox) saying decided while the campaign, replayed, still waited.
        after_task = self._calls.patched(DECISION_AFTER_ACCEPTANCE)
        await self._calls.audit(
            step.id, AuditKind.APPROVAL_DECIDED, payload, pending, after_task=after_task
        )
        if not decision.approve:
            return Ending(CampaignState.REJECTED, f"rejected by {decision.operator}")
        return None


def _escalation_in(
    policy: ApprovalPolicy, pending: PendingApproval, expires: datetime, calls: ActivityCalls
) -> timedelta | None:
    """How long until ``pending`` is escalated, or None when it never will be: the spec
    asks for no escalation, it was escalated already, or the run predates escalations."""
    if policy.escalate_before_seconds <= 0 or pending.escalated_at:
        return None
    if not calls.patched(APPROVAL_ESCALATION):
        return None
    at = expires - timedelta(seconds=policy.escalate_before_seconds)
    return max(at - workflow.now(), timedelta(0))


async def _until(answered: Callable[[], bool], limit: timedelta, summary: str) -> bool:
    """Wait up to ``limit`` for ``answered``; whether it came (no wait at all when the time
    is already up)."""
    if limit <= timedelta(0):
        return False
    try:
        await workflow.wait_condition(answered, timeout=limit, timeout_summary=summary)
    except TimeoutError:
        return False
    return True
