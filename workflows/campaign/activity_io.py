"""One dataclass in and one out of every campaign activity.

Decisions the workflow made itself (arm drawn, branch taken, step skipped) ride with the next
activity (``decisions``) and are appended in its transaction; each result says how many it
appended, so a worker from before decisions rode along (answering 0) loses none.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from workflows.campaign.messages import PendingApproval


@dataclass
class LoadSpecInput:
    """Which spec version a campaign runs."""

    campaign_id: str
    version: int


@dataclass
class Decision:
    """A decision the workflow made (arm drawn, branch taken, step skipped), appended to the
    audit trail in the transaction of the next activity, which carries it."""

    step_id: str
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreInput:
    """Score customers with named models; the audit row is keyed by (workflow, step)."""

    workflow_id: str
    step_id: str
    campaign_id: str
    customer_keys: list[str]
    models: list[str]
    decisions: list[Decision] = field(default_factory=list)


@dataclass
class Contribution:
    """One feature's contribution (SHAP value, log-odds) to a score."""

    feature: str
    value: float


@dataclass
class CustomerScore:
    """Scores of one customer, with the features branches may test."""

    customer_key: str
    scores: dict[str, float]
    features: dict[str, float]
    top_contributions: dict[str, list[Contribution]] = field(default_factory=dict)


@dataclass
class ScoreResult:
    """Scores for every customer asked for, and the model versions that made them."""

    model_versions: dict[str, str]
    customers: list[CustomerScore]
    decisions_recorded: int = 0


@dataclass
class CrmWriteInput:
    """One outbound CRM action, gated by consent and pause right before it is made."""

    workflow_id: str
    step_id: str
    campaign_id: str
    customer_key: str
    action: str  # set_properties | enroll_sequence | add_to_list
    channel: str
    purpose: str
    properties: dict[str, str] = field(default_factory=dict)
    sequence_id: str = ""
    list_id: str = ""
    # Frequency cap across campaigns: 0 means none.
    cap_max_actions: int = 0
    cap_window_seconds: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    # Recorded with the write, and only if it is written (the lean generation's finish).
    if_written: list[Decision] = field(default_factory=list)


class CrmOutcome(enum.StrEnum):
    """What ``crm_write`` did."""

    WRITTEN = "written"
    CONSENT_BLOCKED = "consent_blocked"
    PAUSED = "paused"
    CAPPED = "capped"
    WAIT_WINDOW = "wait_window"  # the CRM's long rate window (a daily limit) is spent


@dataclass
class CrmWriteResult:
    """The outcome and the CRM's record id when written; ``retry_at`` (ISO-8601) when the
    CRM takes nothing before then."""

    outcome: CrmOutcome
    crm_record_id: str = ""
    detail: str = ""
    decisions_recorded: int = 0
    retry_at: str = ""
    # The write's ``if_written`` rows are on record with it (a worker from before them
    # leaves this False, and the campaign records its finish itself).
    if_written_recorded: bool = False


@dataclass
class CompensateInput:
    """Undo what a campaign did in the CRM after its customer revoked consent: ``undo`` names
    which kinds (``unenroll``, ``remove_from_lists``, ``clear_properties``)."""

    workflow_id: str
    campaign_id: str
    customer_key: str
    undo: list[str]
    decisions: list[Decision] = field(default_factory=list)


@dataclass
class CompensateResult:
    """How many effects were undone, and how many the CRM refused to undo."""

    undone: int
    refused: int = 0
    decisions_recorded: int = 0


@dataclass
class AuditInput:
    """A decision the workflow made itself (branch taken, approval requested or decided)."""

    workflow_id: str
    step_id: str
    kind: str
    campaign_id: str
    customer_key: str
    payload: dict[str, Any] = field(default_factory=dict)
    approval: PendingApproval | None = None  # set on approval rows
    decisions: list[Decision] = field(default_factory=list)  # appended first


@dataclass
class EscalationInput:
    """An approval request unanswered ``escalate_before`` its expiry: its notice carries ids,
    the step, the reason and the times, no personal data; decisions ride along."""

    workflow_id: str
    campaign_id: str
    customer_key: str
    approval: PendingApproval
    decisions: list[Decision] = field(default_factory=list)


@dataclass
class EscalationResult:
    """What became of the notice: ``delivered``, ``not configured``, ``refused: ...`` (the
    webhook answered 4xx) or ``failed: ...`` (it never answered well, after retries)."""

    webhook: str
    decisions_recorded: int = 0


@dataclass
class AuditResult:
    """The audit row's sequence number; ``created`` is False when it already existed."""

    seq: int
    created: bool


@dataclass
class FallbackInput:
    """Put a customer into the campaign's safe default segment."""

    workflow_id: str
    step_id: str
    campaign_id: str
    customer_key: str
    segment: str
    reason: str
    decisions: list[Decision] = field(default_factory=list)


@dataclass
class FallbackResult:
    """Whether the CRM now carries the safe segment too (the store always does)."""

    segment: str
    crm_synced: bool
    detail: str = ""
    decisions_recorded: int = 0


@dataclass
class LocalTimeInput:
    """When, in UTC, a local-time rule next lets the campaign go on.

    ``until``: the next HH:MM in the customer's zone. ``quiet_start``/``quiet_end``: the end
    of the quiet window if ``now`` is inside it, else ``now``. The zone comes from the
    customer's record, ``default_timezone`` when it has none.
    """

    customer_key: str
    now: str  # ISO-8601 workflow time
    default_timezone: str = "UTC"
    until: str = ""
    quiet_start: str = ""
    quiet_end: str = ""


@dataclass
class LocalTimeResult:
    """The UTC instant to wait until (``now`` when there is nothing to wait for), and the
    same instant on the customer's clock, for people reading the campaign."""

    at: str
    timezone: str
    local_at: str = ""  # e.g. "2026-12-01 08:00 CET"
    utc_offset_seconds: int = 0  # the zone's offset at ``at``
