"""Plain dataclasses exchanged between campaign workflows, their activities and clients.

Only the standard library and the Temporal SDK: workflows import this module, and so do the
activities, the API and the CLI. One dataclass in, one out, so fields can be added without
breaking running histories (new fields always get defaults).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from temporalio.common import SearchAttributeKey

CAMPAIGN_WORKFLOW = "CampaignWorkflow"


class CampaignState(enum.StrEnum):
    """Every state a campaign workflow can be in; the terminal ones end the workflow."""

    ENTERED = "entered"
    SCORING = "scoring"
    AWAITING_APPROVAL = "awaiting_approval"
    ACTING = "acting"
    WAITING = "waiting"
    COMPLETED = "completed"
    EXITED = "exited"
    REJECTED = "rejected"
    CONSENT_BLOCKED = "consent_blocked"
    FALLBACK = "fallback"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True for states a campaign never leaves."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        CampaignState.COMPLETED,
        CampaignState.EXITED,
        CampaignState.REJECTED,
        CampaignState.CONSENT_BLOCKED,
        CampaignState.FALLBACK,
        CampaignState.FAILED,
    }
)

# States the demo summary and `temporal workflow count` report on, in that order.
SUMMARY_STATES = (
    CampaignState.COMPLETED,
    CampaignState.AWAITING_APPROVAL,
    CampaignState.WAITING,
    CampaignState.CONSENT_BLOCKED,
    CampaignState.FALLBACK,
    CampaignState.REJECTED,
    CampaignState.EXITED,
    CampaignState.FAILED,
)


class SA:
    """Search attribute keys every campaign carries (dev server: at most 10 Keyword)."""

    CAMPAIGN_ID = SearchAttributeKey.for_keyword("CampaignId")
    COHORT_ID = SearchAttributeKey.for_keyword("CohortId")
    CUSTOMER_KEY = SearchAttributeKey.for_keyword("CustomerKey")
    CAMPAIGN_STATE = SearchAttributeKey.for_keyword("CampaignState")
    MODEL_VERSION = SearchAttributeKey.for_keyword("ModelVersion")
    VARIANT = SearchAttributeKey.for_keyword("Variant")
    FALLBACK_REASON = SearchAttributeKey.for_keyword("FallbackReason")
    CAMPAIGN_VERSION = SearchAttributeKey.for_int("CampaignVersion")
    AWAITING_APPROVAL = SearchAttributeKey.for_bool("AwaitingApproval")


# Registered on the server before any campaign starts: name -> indexed value type.
SEARCH_ATTRIBUTE_TYPES: dict[str, str] = {
    "CampaignId": "Keyword",
    "CohortId": "Keyword",
    "CustomerKey": "Keyword",
    "CampaignState": "Keyword",
    "ModelVersion": "Keyword",
    "Variant": "Keyword",
    "FallbackReason": "Keyword",
    "CampaignVersion": "Int",
    "AwaitingApproval": "Bool",
}


def campaign_workflow_id(campaign_id: str, customer_key: str, entry_id: str) -> str:
    """The business-keyed workflow id: one per (campaign, customer, entry)."""
    return f"campaign:{campaign_id}:{customer_key}:{entry_id}"


def idempotency_key(workflow_id: str, step_id: str) -> str:
    """The key every external write carries; stable across retries, resets and replays."""
    return f"{workflow_id}:{step_id}"


# ---------------------------------------------------------------- the campaign spec, as run


@dataclass
class Comparison:
    """``source.name op value``: source is ``score`` or ``feature``."""

    source: str
    name: str
    op: str
    value: float


@dataclass
class BranchRule:
    """Go to ``next`` when every comparison in ``all`` holds."""

    all: list[Comparison]
    next: str


@dataclass
class StepDef:
    """One step of a spec. ``type`` says which of the optional fields apply."""

    id: str
    type: str  # score | branch | approval | crm | wait | exit
    next: str | None = None  # default: the following step; None after the last means done
    # score
    models: list[str] = field(default_factory=list)
    # branch
    rules: list[BranchRule] = field(default_factory=list)
    default: str | None = None
    # approval
    reason: str = ""
    # crm
    action: str = ""  # set_properties | enroll_sequence | add_to_list
    properties: dict[str, str] = field(default_factory=dict)
    sequence_id: str = ""
    list_id: str = ""
    channel: str = "email"
    purpose: str = "marketing"
    # wait
    seconds: float = 0.0
    # exit
    outcome: str = "completed"
    # wait until a local time of day (HH:MM), or for an event (``seconds`` is its timeout)
    until: str = ""
    event: str = ""
    on_event: str | None = None  # default: the following step
    on_timeout: str | None = None
    # crm: where to go when the frequency cap refuses the action (default: the following step)
    on_capped: str | None = None


@dataclass
class ApprovalPolicy:
    """Who may approve, how long they have and what happens when nobody answers."""

    timeout_seconds: float = 3 * 24 * 3600.0
    on_timeout: str = "reject"  # reject | fallback
    approvers: list[str] = field(default_factory=list)  # empty: any operator


@dataclass
class CampaignSpecDef:
    """A validated, versioned campaign spec in the plain form the workflow interprets."""

    campaign_id: str
    version: int
    name: str
    owner: str
    entry_cohort: str
    safe_default_segment: str
    steps: list[StepDef]
    sensitive: bool = False
    exit_on_cohort_exit: bool = True
    holdout_percent: float = 0.0
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    exit_on_events: list[str] = field(default_factory=list)
    conversion_event: str = ""  # empty: no conversion goal
    conversion_window_seconds: float = 0.0
    holdout_score: str = ""  # empty: one stratum; else the arm is drawn per band of this score
    holdout_bands: list[float] = field(default_factory=list)
    cap_max_actions: int = 0  # 0: no frequency cap
    cap_window_seconds: float = 0.0
    quiet_start: str = ""  # HH:MM local; empty: no quiet hours
    quiet_end: str = ""
    default_timezone: str = "UTC"


# ---------------------------------------------------------------- workflow input and messages


@dataclass
class CampaignInput:
    """Starts one campaign for one customer entry."""

    campaign_id: str
    version: int
    customer_key: str
    entry_id: str
    cohort_id: str
    crm_task_queue: str = "cohortflow-crm"
    # Continue-as-new: what the previous run handed over, and the history bound (0: default).
    carried: CarriedState | None = None
    history_limit: int = 0


@dataclass
class CarriedState:
    """Everything a campaign run hands to its continuation, so nothing is lost.

    ``step_id`` is the step to resume; ``deadline`` the absolute end (ISO-8601) of the wait
    or approval it was in, so the continuation waits only for what remained.
    """

    step_id: str
    entered_at: str
    deadline: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    variant: str = "treatment"
    paused: bool = False
    pending_approval: PendingApproval | None = None
    exit_reason: str = ""
    revoked: list[list[str]] = field(default_factory=list)
    converted_at: str = ""
    events_awaited: list[str] = field(default_factory=list)  # arrived during the hand-over
    steps_run: list[str] = field(default_factory=list)
    runs: int = 1


@dataclass
class CampaignResult:
    """How a campaign ended."""

    state: CampaignState
    reason: str = ""
    steps_run: list[str] = field(default_factory=list)


@dataclass
class DecideRequest:
    """An operator's approval decision, sent as the ``decide`` update."""

    approval_id: str
    approve: bool
    operator: str
    reason: str


@dataclass
class DecideResult:
    """What the workflow did with a decision."""

    approval_id: str
    decision: str  # approved | rejected


@dataclass
class CohortExited:
    """Signal: the customer left the campaign's entry cohort."""

    cohort_id: str
    reason: str = ""


@dataclass
class CustomerEvent:
    """Signal ``customer_event``: an event of this customer was ingested (a purchase, a click).

    Sent by the ingestion path to every running campaign of the customer, so waits for an
    event and exit-on-event criteria work whatever started the campaign.
    """

    event: str
    occurred_at: str  # ISO-8601, UTC
    message_id: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConsentChanged:
    """Signal: a consent record of this customer changed in the store."""

    channel: str
    purpose: str
    granted: bool


@dataclass
class PauseChanged:
    """Signal: an operator paused or resumed the campaign's outbound actions."""

    paused: bool
    operator: str = ""
    reason: str = ""


@dataclass
class PendingApproval:
    """An approval the workflow is waiting for."""

    approval_id: str
    step_id: str
    reason: str
    requested_at: str  # ISO-8601, workflow time
    expires_at: str


@dataclass
class CampaignStatus:
    """The ``status`` query's answer."""

    state: CampaignState
    step_id: str
    campaign_id: str
    version: int
    customer_key: str
    scores: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    variant: str = ""
    paused: bool = False
    pending_approval: PendingApproval | None = None
    fallback_reason: str = ""
    transitions: list[str] = field(default_factory=list)
    waiting_until: str = ""  # ISO-8601 end of the current wait, if any
    waiting_for_event: str = ""
    converted_at: str = ""
    runs: int = 1  # how many runs (continue-as-new cycles) this campaign has had


# ---------------------------------------------------------------- activity inputs and outputs


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
    # How many carried decisions were appended: a worker from before decisions rode along
    # answers 0, so the workflow keeps them for the next activity (a rolling deploy is safe).
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


class CrmOutcome(enum.StrEnum):
    """What ``crm_write`` did."""

    WRITTEN = "written"
    CONSENT_BLOCKED = "consent_blocked"
    PAUSED = "paused"
    CAPPED = "capped"


@dataclass
class CrmWriteResult:
    """The outcome and the CRM's record id when written."""

    outcome: CrmOutcome
    crm_record_id: str = ""
    detail: str = ""
    # How many carried decisions were appended: a worker from before decisions rode along
    # answers 0, so the workflow keeps them for the next activity (a rolling deploy is safe).
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
    approval: PendingApproval | None = None  # set on approval_requested
    decisions: list[Decision] = field(default_factory=list)  # appended first


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
    # How many carried decisions were appended: a worker from before decisions rode along
    # answers 0, so the workflow keeps them for the next activity (a rolling deploy is safe).
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
    """The UTC instant to wait until (``now`` when there is nothing to wait for)."""

    at: str
    timezone: str
