"""What clients send to a running campaign and what they read back from it.

Signals for facts (``CohortExited``, ``CustomerEvent``, ``ConsentChanged``, ``PauseChanged``),
the ``decide`` update for an operator's answer, the ``status`` query. Fields are only ever
added, with defaults, so running histories keep decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.campaign.contract import CampaignState


@dataclass
class PendingApproval:
    """An approval the workflow is waiting for."""

    approval_id: str
    step_id: str
    reason: str
    requested_at: str  # ISO-8601, workflow time
    expires_at: str
    escalated_at: str = ""  # when its escalation notice went out; carried into continuations


@dataclass
class DecideRequest:
    """An operator's approval decision, sent as the ``decide`` update."""

    approval_id: str
    approve: bool
    operator: str  # the authenticated identity, never a name the caller typed
    reason: str
    roles: list[str] = field(default_factory=list)  # the identity's roles


@dataclass
class DecideResult:
    """What the workflow did with a decision."""

    approval_id: str
    decision: str  # approved | rejected
    remaining: int = 0  # approvals still needed before the campaign carries on


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
class CampaignResult:
    """How a campaign ended; ``segment`` is the safe default segment after a fallback."""

    state: CampaignState
    reason: str = ""
    steps_run: list[str] = field(default_factory=list)
    segment: str = ""


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
    decisions: list[str] = field(default_factory=list)  # the last few, newest last
    timezone: str = ""  # the customer's, once a step has looked it up
