"""The interpreter on its own: pure functions over a spec and a run's state, no Temporal.

What the workflow and the preview both rely on: the step loop ends every spec it is given
(an unknown step, step type or outcome goes to the safe default segment, never raises),
branches say which values decided them, and refusals of a decision say which field is wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from workflows.campaign import interpreter
from workflows.campaign.contract import CampaignState, DecideRefusal
from workflows.campaign.definition import BranchRule, CampaignSpecDef, Comparison, StepDef
from workflows.campaign.interpreter import Ending, Next
from workflows.campaign.messages import CustomerEvent, DecideRequest, PendingApproval
from workflows.campaign.state import RunState


def spec(*steps: StepDef, **fields: object) -> CampaignSpecDef:
    return CampaignSpecDef(
        campaign_id="c",
        version=1,
        name="n",
        owner="crm-team",
        entry_cohort="k",
        safe_default_segment="safe",
        steps=list(steps),
        **fields,  # type: ignore[arg-type]
    )


class Recorder:
    """A runner that records each step it is asked to run and goes where it is told."""

    def __init__(self, goto: dict[str, Next] | None = None) -> None:
        self.ran: list[str] = []
        self.goto = goto or {}

    async def begin(self, step_id: str, resumed: bool) -> Ending | None:
        return None

    async def _run(self, step: StepDef) -> Next:
        self.ran.append(step.id)
        return self.goto.get(step.id)

    score = branch = approval = crm = wait = _run

    async def exit(self, step: StepDef) -> Next:
        self.ran.append(step.id)
        return interpreter.exit_ending(step)


async def test_steps_run_in_order_until_an_exit_names_the_end() -> None:
    runner = Recorder()
    steps_run: list[str] = []
    ending = await interpreter.run_steps(
        spec(StepDef("a", "score"), StepDef("b", "wait"), StepDef("x", "exit", outcome="exited")),
        runner,
        steps_run,
    )
    assert ending == Ending(CampaignState.EXITED, "reached exit step x")
    assert runner.ran == steps_run == ["a", "b", "x"]


@pytest.mark.parametrize(
    ("steps", "goto", "reason"),
    [
        ([StepDef("a", "score")], {"a": "nowhere"}, "spec_invalid: no step 'nowhere'"),
        ([StepDef("a", "teleport")], {}, "spec_invalid: step a has unknown type 'teleport'"),
        ([StepDef("a", "exit", outcome="won")], {}, "spec_invalid: step a has unknown outcome"),
    ],
    ids=["unknown-step", "unknown-type", "unknown-outcome"],
)
async def test_a_spec_the_interpreter_cannot_follow_ends_in_the_safe_default(
    steps: list[StepDef], goto: dict[str, Next], reason: str
) -> None:
    ending = await interpreter.run_steps(spec(*steps), Recorder(goto), [])
    assert ending.state == CampaignState.FALLBACK
    assert ending.reason.startswith(reason)


async def test_a_loop_without_end_stops_at_the_step_bound() -> None:
    steps_run: list[str] = []
    ending = await interpreter.run_steps(
        spec(StepDef("a", "wait", next="a")), Recorder(), steps_run
    )
    assert ending.state == CampaignState.FAILED
    assert len(steps_run) == interpreter.MAX_STEPS


async def test_a_resumed_step_is_not_counted_again() -> None:
    steps_run = ["a", "b"]
    runner = Recorder()
    ending = await interpreter.run_steps(
        spec(StepDef("a", "score"), StepDef("b", "wait"), StepDef("c", "crm")),
        runner,
        steps_run,
        resume_at="b",
    )
    assert ending == Ending(CampaignState.COMPLETED, "all steps done")
    assert runner.ran == ["b", "c"] and steps_run == ["a", "b", "c"]


def test_a_branch_says_which_rule_chose_and_on_which_values() -> None:
    step = StepDef(
        "route",
        "branch",
        rules=[
            BranchRule(
                [Comparison("score", "churn", ">=", 0.8), Comparison("feature", "m", ">", 100)],
                "approve",
            )
        ],
        default="label",
    )
    chosen = interpreter.choose_branch(step, {"churn": 0.9}, {"m": 150.0})
    assert (chosen.next, chosen.matched, chosen.values) == (
        "approve",
        "rules[0]",
        {"churn": 0.9, "m": 150.0},
    )
    fell = interpreter.choose_branch(step, {"churn": 0.9}, {})
    assert (fell.next, fell.matched, fell.values) == ("label", "default", {"churn": 0.9, "m": None})
    assert not interpreter.compare(1.0, "~=", 1.0)  # an unknown operator never holds


def test_rendering_fills_known_placeholders_and_leaves_the_rest() -> None:
    values = interpreter.placeholders("cohort_a", "camp", "treatment", {"churn": 0.5}, {})
    rendered = interpreter.render({"a": "{cohort}/{score.churn}", "b": "{score.other}"}, values)
    assert rendered == {"a": "cohort_a/0.5000", "b": "{score.other}"}


def awaiting(**fields: object) -> RunState:
    pending = PendingApproval("apr_1", "approve", "r", "2026-01-01T00:00:00+00:00", "x")
    return RunState(
        current=CampaignState.AWAITING_APPROVAL,
        pending_approval=pending,
        **fields,  # type: ignore[arg-type]
    )


APPROVER = ["approver"]
CONFLICT, INVALID, FORBIDDEN = (
    DecideRefusal.CONFLICT,
    DecideRefusal.INVALID,
    DecideRefusal.FORBIDDEN,
)


def ask(operator: str, approve: bool = True, roles: list[str] = APPROVER) -> DecideRequest:
    return DecideRequest("apr_1", approve, operator, "ok", list(roles))


@pytest.mark.parametrize(
    ("state", "request_", "kind", "field"),
    [
        (RunState(), ask("alice"), CONFLICT, ""),
        (awaiting(), DecideRequest("apr_2", True, "alice", "ok", APPROVER), CONFLICT, ""),
        (awaiting(decision=ask("bob")), None, CONFLICT, ""),
        (awaiting(), ask(" "), INVALID, "operator"),
        (awaiting(), DecideRequest("apr_1", True, "alice", "", APPROVER), INVALID, "reason"),
        (awaiting(), ask("crm-team"), FORBIDDEN, "operator"),
        (awaiting(), ask("mallory"), FORBIDDEN, "operator"),
        (awaiting(), ask("alice", roles=["operator", "admin"]), FORBIDDEN, "operator"),
        (awaiting(), ask("carol"), FORBIDDEN, "operator"),
        (awaiting(), ask("dan"), FORBIDDEN, "operator"),
        (awaiting(approvals=[ask("alice")]), None, FORBIDDEN, "operator"),
    ],
    ids=[
        "not-pending", "other", "decided", "no-operator", "no-reason", "owner", "not-listed",
        "no-approver-role", "author", "applier", "approved-already",
    ],
)  # fmt: skip
def test_a_decision_is_refused_by_kind_naming_the_field(
    state: RunState, request_: DecideRequest | None, kind: DecideRefusal, field: str
) -> None:
    request = request_ or ask("alice")
    # carol and dan are listed, so only being the author or the applier bars them.
    document = approvers("alice", "bob", "carol", "dan")
    document.author, document.applied_by = "carol", "dan"
    document.approval.required = 2
    refusal = interpreter.decide_refusal(state, document, request, asking=True)
    assert refusal is not None and (refusal[0], refusal[2]) == (kind, field), refusal


def approvers(*names: str) -> CampaignSpecDef:
    document = spec(StepDef("approve", "approval"))
    document.approval.approvers = list(names)
    return document


def test_a_listed_approver_other_than_the_owner_may_decide_while_asked() -> None:
    request = DecideRequest("apr_1", False, "bob", "not now", APPROVER)
    document = approvers("alice", "bob")
    assert interpreter.decide_refusal(awaiting(), document, request, asking=True) is None
    # A request carried into a run that has not reached its step again is not being asked.
    refusal = interpreter.decide_refusal(awaiting(), document, request, asking=False)
    assert refusal == (CONFLICT, "approval apr_1 is not pending", "")


def test_reject_may_be_given_to_a_role_that_may_not_approve() -> None:
    document = approvers()
    document.approval.reject_roles = ["operator", "approver"]
    reject = ask("dave", approve=False, roles=["operator"])
    assert interpreter.decide_refusal(awaiting(), document, reject, asking=True) is None
    approve = ask("dave", roles=["operator"])
    refusal = interpreter.decide_refusal(awaiting(), document, approve, asking=True)
    assert refusal == (FORBIDDEN, "operator: dave needs role approver to approve", "operator")


def test_the_nth_distinct_approval_decides_and_any_rejection_ends_it_at_once() -> None:
    document = approvers()
    document.approval.required = 3
    state = awaiting()
    assert interpreter.take_decision(state, document, ask("alice")).remaining == 2
    assert interpreter.take_decision(state, document, ask("bob")).remaining == 1
    assert state.decision is None
    last = interpreter.take_decision(state, document, ask("carol"))
    assert (last.decision, last.remaining) == ("approved", 0)
    assert state.decision is not None and state.decision.operator == "carol"
    assert interpreter.approvers_of(state, state.decision) == ["alice", "bob", "carol"]

    rejected = awaiting()
    interpreter.take_decision(rejected, document, ask("alice"))
    no = interpreter.take_decision(rejected, document, ask("bob", approve=False))
    assert (no.decision, no.remaining) == ("rejected", 0)
    assert rejected.decision is not None and not rejected.decision.approve


def test_a_repeat_of_a_decision_already_taken_gets_the_earlier_result() -> None:
    document = approvers()
    document.approval.required = 2
    state = awaiting()
    first = interpreter.take_decision(state, document, ask("alice"))
    # The same identity, the same approval, the same answer: what it got the first time.
    assert interpreter.earlier_decision(state, document, ask("alice")) == first
    assert interpreter.earlier_decision(state, document, ask("alice", approve=False)) is None
    assert interpreter.earlier_decision(state, document, ask("bob")) is None
    last = interpreter.take_decision(state, document, ask("bob"))
    assert interpreter.earlier_decision(state, document, ask("bob")) == last
    # Alice's approval counted towards bob's decision: she now hears it needs none more.
    again = interpreter.earlier_decision(state, document, ask("alice"))
    assert again is not None and (again.decision, again.remaining) == ("approved", 0)
    other = DecideRequest("apr_2", True, "bob", "ok", APPROVER)
    assert interpreter.earlier_decision(state, document, other) is None


def test_only_a_revoked_channel_the_campaign_uses_stops_it() -> None:
    document = spec(StepDef("label", "crm", channel="email", purpose="marketing"))
    state = RunState()
    interpreter.set_consent(state, "sms", "marketing", False)
    assert interpreter.interruption(state, document) is None
    interpreter.set_consent(state, "email", "marketing", False)
    stop = interpreter.interruption(state, document)
    assert stop == Ending(CampaignState.CONSENT_BLOCKED, "consent revoked: email/marketing")
    interpreter.set_consent(state, "email", "marketing", True)
    assert interpreter.interruption(state, document) is None


def test_leaving_the_cohort_stops_only_a_campaign_that_exits_on_it() -> None:
    state = RunState(left_cohort="k")
    assert interpreter.interruption(state, spec(StepDef("a", "wait"))) == Ending(
        CampaignState.EXITED, "left cohort k"
    )
    staying = spec(StepDef("a", "wait"), exit_on_cohort_exit=False)
    assert interpreter.interruption(state, staying) is None


def test_a_conversion_counts_only_inside_its_window_after_entry() -> None:
    entered = datetime(2026, 1, 1, tzinfo=UTC)
    document = spec(
        StepDef("a", "wait"),
        conversion_event="purchase",
        conversion_window_seconds=timedelta(days=7).total_seconds(),
        exit_on_events=["unsubscribe"],
    )
    state = RunState(entered_at=entered.isoformat())
    late = CustomerEvent("purchase", (entered + timedelta(days=8)).isoformat())
    interpreter.apply_event(state, document, late, entered)
    assert state.converted_at == ""
    inside = CustomerEvent("purchase", (entered + timedelta(days=2)).isoformat())
    interpreter.apply_event(state, document, inside, entered)
    assert state.converted_at == inside.occurred_at
    interpreter.apply_event(state, document, CustomerEvent("unsubscribe", "not a time"), entered)
    assert state.exit_reason == "event unsubscribe"
