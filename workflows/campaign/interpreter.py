"""The campaign spec's rules as pure functions: the one step loop, branches, holdout draws,
rendering, ids and interruptions.

No Temporal SDK calls (its search attribute keys are plain names) and no clock: the workflow
passes ``now`` in. The campaign workflows (both types) and
``cohortflow.campaigns.preview`` both run ``run_steps`` with their own ``StepRunner``, so a dry run
follows exactly the path a campaign takes. A spec the interpreter cannot follow (an unknown
step, step type or outcome) ends in the safe default segment with the reason, never in an
exception.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from temporalio.common import SearchAttributeKey

from workflows.campaign.activity_io import CrmWriteInput, Decision
from workflows.campaign.contract import (
    SA,
    AuditKind,
    CampaignState,
    DecideRefusal,
    FallbackReason,
)
from workflows.campaign.definition import CampaignSpecDef, Comparison, StepDef
from workflows.campaign.messages import (
    CohortExited,
    ConsentChanged,
    CustomerEvent,
    DecideRequest,
    DecideResult,
    PauseChanged,
)
from workflows.campaign.state import CampaignInput, RunState

# Counted over every run of a campaign: a cycle the validator let through (or a spec stored
# before loops were checked) still ends, while a weekly drip loop has room for years.
MAX_STEPS = 1_000

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@dataclass(frozen=True)
class Ending:
    """How a campaign ends: its terminal state and why."""

    state: CampaignState
    reason: str


# What a step handler answers: the step to go to, None for the following one, or the end.
Next = str | None | Ending


class StepRunner(Protocol):
    """What runs each kind of step: the workflow for real, the preview on paper."""

    async def begin(self, step_id: str, resumed: bool) -> Ending | None:
        """Before each step: the end if the campaign must stop here, else None."""

    async def score(self, step: StepDef) -> Next:
        """Run a ``score`` step."""

    async def branch(self, step: StepDef) -> Next:
        """Run a ``branch`` step."""

    async def approval(self, step: StepDef) -> Next:
        """Run an ``approval`` step."""

    async def crm(self, step: StepDef) -> Next:
        """Run a ``crm`` step."""

    async def wait(self, step: StepDef) -> Next:
        """Run a ``wait`` step."""

    async def exit(self, step: StepDef) -> Next:
        """Run an ``exit`` step: the end it names (``exit_ending``)."""


def spec_invalid(problem: str) -> Ending:
    """The end of a campaign whose spec cannot be followed: the safe default segment."""
    return Ending(CampaignState.FALLBACK, f"{FallbackReason.SPEC_INVALID}: {problem}")


def _handler(runner: StepRunner, step_type: str) -> Callable[[StepDef], Awaitable[Next]] | None:
    return {
        "score": runner.score,
        "branch": runner.branch,
        "approval": runner.approval,
        "crm": runner.crm,
        "wait": runner.wait,
        "exit": runner.exit,
    }.get(step_type)


async def run_steps(
    spec: CampaignSpecDef,
    runner: StepRunner,
    steps_run: list[str],
    *,
    resume_at: str = "",
) -> Ending:
    """Run the spec's steps from the first (or ``resume_at``, a step an earlier run began)
    until a handler answers an ending (an exit step always does) or the last step is done.

    ``steps_run`` records each step as it begins (a resumed step was recorded by the run
    that began it) and bounds the loop at ``MAX_STEPS``.
    """
    step_id: str | None = resume_at or (spec.steps[0].id if spec.steps else None)
    resumed = bool(resume_at)
    while len(steps_run) < MAX_STEPS:
        if step_id is None:
            return Ending(CampaignState.COMPLETED, "all steps done")
        stop = await runner.begin(step_id, resumed)
        if stop is not None:
            return stop
        step = find_step(spec, step_id)
        if step is None:
            return spec_invalid(f"no step {step_id!r}")
        if not resumed:
            steps_run.append(step.id)
        resumed = False
        handler = _handler(runner, step.type)
        if handler is None:
            return spec_invalid(f"step {step.id} has unknown type {step.type!r}")
        outcome = await handler(step)
        if isinstance(outcome, Ending):
            return outcome
        step_id = outcome if outcome is not None else following(spec, step)
    return Ending(CampaignState.FAILED, f"spec ran more than {MAX_STEPS} steps")


def find_step(spec: CampaignSpecDef, step_id: str) -> StepDef | None:
    """The step with this id, or None."""
    return next((s for s in spec.steps if s.id == step_id), None)


def following(spec: CampaignSpecDef, step: StepDef) -> str | None:
    """Where a step goes when it names nothing else: ``next``, else the step after it."""
    if step.next:
        return step.next
    index = next(i for i, s in enumerate(spec.steps) if s.id == step.id)
    return spec.steps[index + 1].id if index + 1 < len(spec.steps) else None


def exit_ending(step: StepDef) -> Ending:
    """The end an exit step names."""
    if step.outcome not in (CampaignState.COMPLETED, CampaignState.EXITED):
        return spec_invalid(f"step {step.id} has unknown outcome {step.outcome!r}")
    return Ending(CampaignState(step.outcome), f"reached exit step {step.id}")


# ---------------------------------------------------------------- branches


def compare(value: float, op: str, threshold: float) -> bool:
    """Apply a spec comparison operator; an unknown operator never holds."""
    test = _OPERATORS.get(op)
    return test is not None and test(value, threshold)


def holds(comparison: Comparison, scores: dict[str, float], features: dict[str, float]) -> bool:
    """Whether a comparison holds; a score or feature nobody knows never does."""
    source = scores if comparison.source == "score" else features
    value = source.get(comparison.name)
    return value is not None and compare(value, comparison.op, comparison.value)


@dataclass(frozen=True)
class BranchChoice:
    """The step a branch goes to, which rule chose it and the values it was decided on."""

    next: str | None
    matched: str  # rules[i] | default
    values: dict[str, float | None] = field(default_factory=dict)


def choose_branch(
    step: StepDef, scores: dict[str, float], features: dict[str, float]
) -> BranchChoice:
    """The first rule whose comparisons all hold, else the step's default."""
    seen: dict[str, float | None] = {}
    for index, rule in enumerate(step.rules):
        for comparison in rule.all:
            source = scores if comparison.source == "score" else features
            seen[comparison.name] = source.get(comparison.name)
        if all(holds(c, scores, features) for c in rule.all):
            return BranchChoice(
                rule.next, f"rules[{index}]", {c.name: seen[c.name] for c in rule.all}
            )
    return BranchChoice(step.default, "default", seen)


# ---------------------------------------------------------------- holdout


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


def entry_variant(spec: CampaignSpecDef, customer_key: str) -> str:
    """The arm drawn at entry; ``unassigned`` while a stratified draw waits for its score."""
    if spec.holdout_score:
        return "unassigned"
    return holdout_variant(spec.campaign_id, customer_key, spec.holdout_percent)


def stratified_variant(
    spec: CampaignSpecDef, customer_key: str, scores: dict[str, float]
) -> tuple[str, str]:
    """The arm drawn within the band of the spec's stratifying score, and that band."""
    band = score_band(scores.get(spec.holdout_score, 0.0), spec.holdout_bands)
    return holdout_variant(spec.campaign_id, customer_key, spec.holdout_percent, band), band


# ---------------------------------------------------------------- CRM steps


def placeholders(
    cohort_id: str,
    campaign_id: str,
    variant: str,
    scores: dict[str, float],
    model_versions: dict[str, str],
) -> dict[str, str]:
    """What ``{cohort}``, ``{campaign}``, ``{variant}``, ``{score.X}``, ``{model.X}`` stand for."""
    return {
        "cohort": cohort_id,
        "campaign": campaign_id,
        "variant": variant,
        **{f"score.{k}": f"{v:.4f}" for k, v in scores.items()},
        **{f"model.{k}": v for k, v in model_versions.items()},
    }


def render(properties: dict[str, str], values: dict[str, str]) -> dict[str, str]:
    """Fill the placeholders of each property template; unknown ones stay as written."""
    rendered = {}
    for key, template in properties.items():
        text = template
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        rendered[key] = text
    return rendered


def ending_after(spec: CampaignSpecDef, step: StepDef, steps_run: list[str]) -> Ending | None:
    """The end a campaign reaches as soon as ``step`` is done and goes on as it names (no
    later step acts), or None when more follows."""
    following_id = following(spec, step)
    if len(steps_run) >= MAX_STEPS:
        return None  # ``run_steps`` ends it as failed
    if following_id is None:
        return Ending(CampaignState.COMPLETED, "all steps done")
    last = find_step(spec, following_id)
    if last is None or last.type != "exit":
        return None
    ending = exit_ending(last)
    return None if ending.state == CampaignState.FALLBACK else ending


def finish_payload(state: RunState, ending: Ending) -> dict[str, Any]:
    """What the ``finished`` audit row says."""
    return {"state": ending.state.value, "reason": ending.reason, "variant": state.variant}


def conversion_payload(state: RunState) -> dict[str, Any]:
    """What the ``converted`` audit row says."""
    return {"variant": state.variant, "at": state.converted_at}


def finish_decisions(state: RunState, ending: Ending) -> list[Decision]:
    """The rows a campaign that ends with ``ending`` now records last: its conversion, if
    any, then its finish."""
    finish = Decision("finish", AuditKind.FINISHED.value, finish_payload(state, ending))
    if not state.converted_at:
        return [finish]
    return [Decision("goal", AuditKind.CONVERTED.value, conversion_payload(state)), finish]


def crm_write_input(
    spec: CampaignSpecDef,
    step: StepDef,
    state: RunState,
    inp: CampaignInput,
    workflow_id: str,
    decisions: list[Decision],
    if_written: list[Decision] | None = None,
) -> CrmWriteInput:
    """The ``crm_write`` a CRM step makes, properties rendered from what the run knows."""
    values = placeholders(
        inp.cohort_id, inp.campaign_id, state.variant, state.scores, state.model_versions
    )
    return CrmWriteInput(
        workflow_id=workflow_id,
        step_id=visit_id(step.id, state.steps_run),
        campaign_id=inp.campaign_id,
        customer_key=inp.customer_key,
        action=step.action,
        channel=step.channel,
        purpose=step.purpose,
        properties=render(step.properties, values),
        sequence_id=step.sequence_id,
        list_id=step.list_id,
        cap_max_actions=spec.cap_max_actions,
        cap_window_seconds=spec.cap_window_seconds,
        decisions=decisions,
        if_written=list(if_written or []),
    )


def channels(spec: CampaignSpecDef) -> set[tuple[str, str]]:
    """The (channel, purpose) pairs the campaign's CRM steps need consent for."""
    return {(s.channel, s.purpose) for s in spec.steps if s.type == "crm"}


# ---------------------------------------------------------------- ids


def visit_id(step_id: str, steps_run: list[str]) -> str:
    """The step's name in records and idempotency keys: its id on the first visit, then
    ``id#n``, so a step a loop comes back to writes, and is audited, each time."""
    visits = steps_run.count(step_id)
    return step_id if visits <= 1 else f"{step_id}#{visits}"


def approval_id_for(workflow_id: str, step_id: str) -> str:
    """A short, stable approval id operators can type."""
    return "apr_" + hashlib.sha256(f"{workflow_id}:{step_id}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------- what the customer does


def decide_refusal(
    state: RunState,
    spec: CampaignSpecDef | None,
    request: DecideRequest,
    *,
    asking: bool,
    handing_over: bool = False,
) -> tuple[DecideRefusal, str, str] | None:
    """Why an operator's decision cannot be taken: (kind, message, the request field at
    fault), or None when it can. ``asking``: the run is waiting for this answer now (a
    carried request is not asked until its step resumes); ``handing_over``: the run is
    continuing as new, so the next one will take it."""
    conflict = DecideRefusal.CONFLICT
    if handing_over:
        return (
            conflict,
            f"approval {request.approval_id}: the campaign is continuing as new; retry",
            "",
        )
    pending = state.pending_approval
    if pending is None or spec is None or not asking:
        return conflict, f"approval {request.approval_id} is not pending", ""
    if request.approval_id != pending.approval_id:
        return conflict, f"approval {request.approval_id} is not pending here", ""
    if state.decision is not None:
        return conflict, f"approval {request.approval_id} is already decided", ""
    operator = request.operator.strip()
    if not operator:
        return DecideRefusal.INVALID, "operator: must not be empty", "operator"
    if not request.reason.strip():
        return DecideRefusal.INVALID, "reason: must not be empty", "reason"
    why_not = _four_eyes_refusal(spec, state, request, operator)
    return (DecideRefusal.FORBIDDEN, why_not, "operator") if why_not else None


def _four_eyes_refusal(
    spec: CampaignSpecDef, state: RunState, request: DecideRequest, operator: str
) -> str:
    """Why this identity may not decide this approval, or "" when it may."""
    policy = spec.approval
    verb = "approve" if request.approve else "reject"
    roles = policy.approve_roles if request.approve else policy.reject_roles
    if not set(request.roles) & set(roles):
        return f"operator: {operator} needs role {' or '.join(roles)} to {verb}"
    if operator == spec.owner:
        return f"operator: {operator} requested this campaign and cannot approve it"
    if operator in (spec.author, spec.applied_by):
        return (
            f"operator: {operator} authored or applied version {spec.version} of "
            f"{spec.campaign_id} and cannot decide its approvals"
        )
    if policy.approvers and operator not in policy.approvers:
        return f"operator: {operator} is not an authorised approver"
    if any(given.operator == operator for given in state.approvals):
        return f"operator: {operator} has already approved; another approver must"
    return ""


def earlier_decision(
    state: RunState, spec: CampaignSpecDef | None, request: DecideRequest
) -> DecideResult | None:
    """The result ``request``'s identity already got for this same decision (approval,
    approve or reject), or None: a repeat after a lost answer is not a new decision."""
    wanted = (request.approval_id, request.approve, request.operator.strip())

    def same(given: DecideRequest | None) -> bool:
        return given is not None and (given.approval_id, given.approve, given.operator) == wanted

    if same(state.decision):
        return DecideResult(request.approval_id, "approved" if request.approve else "rejected")
    if spec is not None and any(same(given) for given in state.approvals):
        decided = state.decision is not None
        remaining = 0 if decided else max(spec.approval.required - len(state.approvals), 0)
        return DecideResult(request.approval_id, "approved", remaining=remaining)
    return None


def take_decision(state: RunState, spec: CampaignSpecDef, request: DecideRequest) -> DecideResult:
    """Record a validated decision: an approval short of the required number is kept and
    waits for more; the last approval, or any rejection, becomes the decision."""
    if request.approve and len(state.approvals) + 1 < spec.approval.required:
        state.approvals.append(request)
        remaining = spec.approval.required - len(state.approvals)
        return DecideResult(request.approval_id, "approved", remaining=remaining)
    state.decision = request
    return DecideResult(request.approval_id, "approved" if request.approve else "rejected")


def approvers_of(state: RunState, decision: DecideRequest | None = None) -> list[str]:
    """Everyone who approved so far, in order, with ``decision``'s operator when it approves."""
    names = [given.operator for given in state.approvals]
    if decision is not None and decision.approve:
        names.append(decision.operator)
    return names


def interruption(state: RunState, spec: CampaignSpecDef) -> Ending | None:
    """Why the campaign must stop now (exit, cohort exit, revoked consent), or None."""
    if state.exit_reason:
        return Ending(CampaignState.EXITED, state.exit_reason)
    if state.left_cohort and spec.exit_on_cohort_exit:
        return Ending(CampaignState.EXITED, f"left cohort {state.left_cohort}")
    used = channels(spec)
    revoked = sorted(pair for pair in state.revoked if (pair[0], pair[1]) in used)
    if revoked:
        channel, purpose = revoked[0]
        return Ending(CampaignState.CONSENT_BLOCKED, f"consent revoked: {channel}/{purpose}")
    return None


def apply_signal(state: RunState, signal: CohortExited | ConsentChanged | PauseChanged) -> None:
    """Record what a cohort exit, consent change or pause says; ``interruption`` and the
    CRM step decide what it means for the campaign."""
    if isinstance(signal, CohortExited):
        state.left_cohort = signal.cohort_id
    elif isinstance(signal, ConsentChanged):
        set_consent(state, signal.channel, signal.purpose, signal.granted)
    else:
        state.paused = signal.paused


def set_consent(state: RunState, channel: str, purpose: str, granted: bool) -> None:
    """Record a consent change; whether it stops the campaign is ``interruption``'s call."""
    pair = [channel, purpose]
    if granted and pair in state.revoked:
        state.revoked.remove(pair)
    elif not granted and pair not in state.revoked:
        state.revoked.append(pair)


def apply_event(
    state: RunState, spec: CampaignSpecDef, event: CustomerEvent, now: datetime
) -> None:
    """A customer event may exit the campaign (``exit_on_events``) or meet its goal."""
    if event.event in spec.exit_on_events and not state.exit_reason:
        state.exit_reason = f"event {event.event}"
    if event.event == spec.conversion_event and not state.converted_at:
        entered = instant(state.entered_at) or now
        at = instant(event.occurred_at) or now
        if entered <= at <= entered + timedelta(seconds=spec.conversion_window_seconds):
            state.converted_at = at.isoformat()


# Where a lean campaign comes to rest and its search attributes are brought up to date; a
# wait shorter than SEEN_REST is over before visibility (eventually consistent, refreshed
# about every second) could show it to anyone, so it costs no upsert.
RESTING = frozenset({CampaignState.WAITING, CampaignState.AWAITING_APPROVAL})
SEEN_REST = timedelta(seconds=2)


def rests(state: RunState, entering: CampaignState, now: datetime) -> bool:
    """Whether a campaign entering a state comes to rest there long enough to be seen."""
    if entering != CampaignState.WAITING:
        return entering in RESTING
    until = instant(state.waiting_until)
    return until is None or until - now >= SEEN_REST


def visible_attributes(
    state: RunState, entering: CampaignState
) -> dict[SearchAttributeKey[Any], Any]:
    """Every search attribute a campaign entering a state where it rests should show (None:
    unset), for the lean generation's one upsert there."""
    wanted: dict[SearchAttributeKey[Any], Any] = {
        SA.CAMPAIGN_STATE: entering.value,
        SA.AWAITING_APPROVAL: entering == CampaignState.AWAITING_APPROVAL,
        SA.VARIANT: state.variant,
        **deadlines(state, entering),
    }
    if state.model_versions:
        wanted[SA.MODEL_VERSION] = ",".join(sorted(state.model_versions.values()))
    if state.fallback_reason:
        wanted[SA.FALLBACK_REASON] = state.fallback_reason
    return wanted


def deadlines(
    state: RunState, entering: CampaignState
) -> dict[SearchAttributeKey[datetime], datetime | None]:
    """The ApprovalDeadline and WaitUntil a campaign entering a state should carry: set while
    it waits for an operator or a time, None once it no longer does."""
    pending = state.pending_approval
    deadline = pending.expires_at if pending is not None else ""
    awaiting = entering == CampaignState.AWAITING_APPROVAL
    waiting = entering == CampaignState.WAITING
    return {
        SA.APPROVAL_DEADLINE: instant(deadline) if awaiting and deadline else None,
        SA.WAIT_UNTIL: instant(state.waiting_until) if waiting else None,
    }


def instant(text: str) -> datetime | None:
    """An ISO-8601 instant from a message, or None when it is not one (never raise)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
