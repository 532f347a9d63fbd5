"""What people read about a running campaign: current details and decision lines for the
Temporal UI, summaries of its activities and timers. Pure text from the run's state.

Times are shown in UTC and, once a local-time rule has looked up the customer's zone, on the
customer's clock too (as an offset: the workflow never reads time zone data itself).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from workflows.campaign.contract import CampaignState
from workflows.campaign.interpreter import BranchChoice, instant
from workflows.campaign.messages import CampaignStatus, DecideRequest
from workflows.campaign.state import RECENT, CampaignInput, RunState


def clock(moment: datetime) -> str:
    """An instant as ISO-8601 to the second."""
    return moment.isoformat(timespec="seconds")


def when(text: str, state: RunState) -> str:
    """An ISO-8601 instant for people: UTC, and the customer's local time when known."""
    moment = instant(text)
    if moment is None:
        return text
    shown = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if state.timezone and state.timezone != "UTC":
        local = moment.astimezone(timezone(timedelta(seconds=state.utc_offset_seconds)))
        shown += f" ({local:%H:%M} {state.timezone} for the customer)"
    return shown


def remember(state: RunState, now: datetime, line: str) -> None:
    """Keep a decision in words among the last few, for the details and the status query."""
    state.recent_decisions.append(f"{now:%m-%d %H:%M}Z {line}")
    del state.recent_decisions[:-RECENT]


def branch_line(step_id: str, choice: BranchChoice) -> str:
    """``route: rules[0] -> approve (churn 0.831, monetary_total 150)``."""
    values = ", ".join(
        f"{name} {'unknown' if value is None else f'{value:.4g}'}"
        for name, value in choice.values.items()
    )
    return f"{step_id}: {choice.matched} -> {choice.next or 'next step'}" + (
        f" ({values})" if values else ""
    )


def decision_line(step_id: str, decision: DecideRequest) -> str:
    """``approve: approved by alice: offer within budget``."""
    verdict = "approved" if decision.approve else "rejected"
    return f"{step_id}: {verdict} by {decision.operator}: {decision.reason}"


def current_details(state: RunState, detail: str, *, safe_segment: str = "") -> str:
    """The campaign's current details in Markdown: state, step, what it waits for and until
    when, scores, the last decisions and, after a fallback, the safe segment."""
    lines = [f"**{state.current.value}** at step `{state.step_id or '-'}`: {detail}"]
    pending = state.pending_approval
    if pending is not None:
        lines.append(
            f"Waiting for approval `{pending.approval_id}` until {when(pending.expires_at, state)}"
            f" ({pending.reason}). Approve: `cohortflow approve {pending.approval_id} "
            "--reason TEXT`"
        )
        if pending.escalated_at:
            lines.append(f"Escalated {when(pending.escalated_at, state)}: still unanswered.")
    if state.waiting_for:
        lines.append(
            f"Waiting for event `{state.waiting_for}` until {when(state.waiting_until, state)}."
        )
    elif state.waiting_until:
        lines.append(f"Waiting until {when(state.waiting_until, state)}.")
    if state.paused:
        lines.append("Outbound actions paused by an operator.")
    if state.scores:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(state.scores.items()))
        lines.append(f"Scores: {scores} ({', '.join(sorted(state.model_versions.values()))})")
    if state.recent_decisions:
        lines.append("Last decisions:\n" + "\n".join(f"- {d}" for d in state.recent_decisions))
    if state.current == CampaignState.FALLBACK:
        lines.append(
            f"Fallback: the customer is in the safe default segment `{safe_segment}` "
            f"(reason: {state.fallback_reason})."
        )
    lines.append(f"Variant: {state.variant}")
    return "\n\n".join(lines)


def status(state: RunState, inp: CampaignInput) -> CampaignStatus:
    """The ``status`` query's answer."""
    return CampaignStatus(
        state=state.current,
        step_id=state.step_id,
        campaign_id=inp.campaign_id,
        version=inp.version,
        customer_key=inp.customer_key,
        scores=dict(state.scores),
        model_versions=dict(state.model_versions),
        variant=state.variant,
        paused=state.paused,
        pending_approval=state.pending_approval,
        fallback_reason=state.fallback_reason,
        transitions=list(state.transitions),
        waiting_until=state.waiting_until,
        waiting_for_event=state.waiting_for,
        converted_at=state.converted_at,
        runs=state.runs,
        decisions=list(state.recent_decisions),
        timezone=state.timezone,
    )
