"""What one run of a campaign knows, which is exactly what continue-as-new hands over.

``CampaignInput`` starts a campaign; a continuation gets the same input with ``carried`` set
to the previous run's ``RunState`` as it stood. The JSON of ``RunState`` is a superset of the
``CarriedState`` of releases before the campaign package split (same names, same meaning), so
a run continued as new by an older worker resumes on this code; fields are only ever added,
with defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.campaign.activity_io import Decision
from workflows.campaign.contract import DEFAULT_CRM_TASK_QUEUE, CampaignState
from workflows.campaign.messages import CustomerEvent, DecideRequest, PendingApproval

# How many of the latest decisions and transitions a run keeps for people to read.
RECENT = 8


@dataclass
class RunState:
    """Everything a campaign run knows."""

    step_id: str = ""  # the step running; at a hand-over, the step the next run resumes
    entered_at: str = ""  # ISO-8601, when the customer entered (the conversion window's start)
    deadline: str = ""  # ISO-8601 end of the wait or approval the next run resumes; used once
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    variant: str = "treatment"  # treatment | control | unassigned (until a stratified draw)
    paused: bool = False
    pending_approval: PendingApproval | None = None
    exit_reason: str = ""  # set: the campaign exits at the next check
    revoked: list[list[str]] = field(default_factory=list)  # [channel, purpose] revoked now
    converted_at: str = ""
    # Event names heard since the current event wait began (cleared when a wait starts, kept
    # when a continuation resumes one); what the old CarriedState held was always empty.
    events_awaited: list[str] = field(default_factory=list)
    steps_run: list[str] = field(default_factory=list)
    runs: int = 1
    # Added with the campaign package split.
    current: CampaignState = CampaignState.ENTERED
    left_cohort: str = ""  # the entry cohort, once the customer left it
    fallback_reason: str = ""
    decision: DecideRequest | None = None  # the operator's answer to the pending approval
    approvals: list[DecideRequest] = field(default_factory=list)  # given, fewer than required
    unrecorded: list[Decision] = field(default_factory=list)  # ride with the next activity
    early_events: list[CustomerEvent] = field(default_factory=list)  # before the spec loaded
    waiting_until: str = ""
    waiting_for: str = ""
    timezone: str = ""  # the customer's, once a local-time rule looked it up
    utc_offset_seconds: int = 0  # that zone's offset then, for showing times to people
    recent_decisions: list[str] = field(default_factory=list)  # in words, newest last
    transitions: list[str] = field(default_factory=list)
    # The last CRM write put the finish (and a conversion) on record with its effect: the
    # campaign completed with it, and the finish costs no further activity (lean generation).
    finish_recorded: bool = False
    converted_on_record: bool = False  # that write recorded the conversion too


@dataclass
class CampaignInput:
    """Starts one campaign for one customer entry, or continues it (``carried``)."""

    campaign_id: str
    version: int
    customer_key: str
    entry_id: str
    cohort_id: str
    crm_task_queue: str = DEFAULT_CRM_TASK_QUEUE
    carried: RunState | None = None
    history_limit: int = 0  # continue as new past this many history events; 0: the default
    # The spec version as ``definition.plain`` gives it, pinned by the launcher (lean
    # generation): no activity loads it.
    spec: dict[str, Any] | None = None
