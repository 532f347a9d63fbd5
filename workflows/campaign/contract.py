"""What the campaign workflow shares with everything around it, spelled once.

Names of the workflow, its activities and message handlers; the states it reports; the
search attribute keys (the server registration is derived from them); the audit kinds every
writer and reader uses; the typed refusals of the ``decide`` update; the registry of patches;
and the ids external systems see. Only the standard library and the Temporal SDK.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from temporalio.common import SearchAttributeKey

CAMPAIGN_WORKFLOW = "CampaignWorkflow"
# The lean generation (docs/architecture.md, "What a campaign costs"): every patch below
# taken, the spec pinned in the input, scoring as a local activity, search attributes only
# where a campaign rests. New entries start it; runs of the first type finish as they began.
CAMPAIGN_WORKFLOW_V2 = "CampaignWorkflowV2"
CAMPAIGN_WORKFLOW_TYPES = (CAMPAIGN_WORKFLOW, CAMPAIGN_WORKFLOW_V2)
DEFAULT_CRM_TASK_QUEUE = "cohortflow-crm"


class ActivityName(enum.StrEnum):
    """The campaign's activities, by the name they are registered under."""

    LOAD_SPEC = "load_spec"
    SCORE_CUSTOMER = "score_customer"
    CRM_WRITE = "crm_write"
    RECORD_AUDIT = "record_audit"
    RESOLVE_FALLBACK = "resolve_fallback"
    PLAN_LOCAL_TIME = "plan_local_time"
    CRM_COMPENSATE = "crm_compensate"
    ESCALATE_APPROVAL = "escalate_approval"


class HandlerName(enum.StrEnum):
    """Message handler names, for the ``temporal`` CLI; code references handlers by method."""

    DECIDE = "decide"
    COHORT_EXITED = "cohort_exited"
    CUSTOMER_EVENT = "customer_event"
    CONSENT_CHANGED = "consent_changed"
    PAUSE_CHANGED = "pause_changed"
    STATUS = "status"


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


class FallbackReason(enum.StrEnum):
    """Why a campaign went to its safe default segment (the ``FallbackReason`` attribute)."""

    SCORING_FAILED = "scoring_failed"
    CRM_FAILED = "crm_failed"
    APPROVAL_EXPIRED = "approval_expired"
    SPEC_INVALID = "spec_invalid"


class SA:
    """Search attribute keys every campaign carries. The dev server allows 10 Keyword and
    3 Datetime attributes per namespace; none may hold personal data (they are not encoded).
    """

    CAMPAIGN_ID = SearchAttributeKey.for_keyword("CampaignId")
    COHORT_ID = SearchAttributeKey.for_keyword("CohortId")
    CUSTOMER_KEY = SearchAttributeKey.for_keyword("CustomerKey")
    CAMPAIGN_STATE = SearchAttributeKey.for_keyword("CampaignState")
    MODEL_VERSION = SearchAttributeKey.for_keyword("ModelVersion")
    VARIANT = SearchAttributeKey.for_keyword("Variant")
    FALLBACK_REASON = SearchAttributeKey.for_keyword("FallbackReason")
    CAMPAIGN_VERSION = SearchAttributeKey.for_int("CampaignVersion")
    AWAITING_APPROVAL = SearchAttributeKey.for_bool("AwaitingApproval")
    APPROVAL_DEADLINE = SearchAttributeKey.for_datetime("ApprovalDeadline")
    WAIT_UNTIL = SearchAttributeKey.for_datetime("WaitUntil")


# Registered on the server before any campaign starts, derived from these keys alone.
SEARCH_ATTRIBUTES = (
    SA.CAMPAIGN_ID,
    SA.COHORT_ID,
    SA.CUSTOMER_KEY,
    SA.CAMPAIGN_STATE,
    SA.MODEL_VERSION,
    SA.VARIANT,
    SA.FALLBACK_REASON,
    SA.CAMPAIGN_VERSION,
    SA.AWAITING_APPROVAL,
    SA.APPROVAL_DEADLINE,
    SA.WAIT_UNTIL,
)


class AuditKind(enum.StrEnum):
    """Every kind of audit row, by whoever writes or reads it."""

    VARIANT_ASSIGNED = "variant_assigned"
    SCORED = "scored"
    BRANCH = "branch"
    HOLDOUT_SKIPPED = "holdout_skipped"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_WITHDRAWN = "approval_withdrawn"
    APPROVAL_ESCALATED = "approval_escalated"
    CONSENT_ALLOWED = "consent_allowed"
    CONSENT_BLOCKED = "consent_blocked"
    CRM_WRITTEN = "crm_written"  # an outbound action the CRM took: what frequency caps count
    CRM_COMPENSATED = "crm_compensated"  # an effect undone after a consent revocation
    FREQUENCY_CAPPED = "frequency_capped"
    EVENT_WAIT = "event_wait"
    CONVERTED = "converted"
    FINISHED = "finished"
    FALLBACK = "fallback"
    # Operator actions, outside any campaign workflow.
    CONSENT_GRANTED = "consent_granted"
    CONSENT_REVOKED = "consent_revoked"
    CAMPAIGN_PAUSED = "campaign_paused"
    CAMPAIGN_ACTIVE = "campaign_active"
    CAMPAIGN_CANCELLED = "campaign_cancelled"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    CAMPAIGN_APPLIED = "campaign_applied"
    COHORT_APPLIED = "cohort_applied"
    MODEL_PROMOTED = "model_promoted"
    CUSTOMER_ERASED = "customer_erased"
    ERASURE_REFUSED = "erasure_refused"


class DecideRefusal(enum.StrEnum):
    """``ApplicationError.type`` of a refused ``decide`` update, so callers branch on type.

    ``INVALID``: the request itself is wrong (its first detail names the field);
    ``CONFLICT``: the approval is not pending here (decided, expired, or another one; its
    detail is ``approval_id``); ``FORBIDDEN``: this identity may not decide it (four eyes,
    role, approver list; its detail is ``operator``); ``REPEATED``: this identity took this
    same decision already (a retry after a lost answer; its details are the earlier result's
    decision and remaining approvals), so the caller hands back the earlier result.
    """

    INVALID = "DecideInvalid"
    CONFLICT = "DecideConflict"
    FORBIDDEN = "DecideForbidden"
    REPEATED = "DecideRepeated"


@dataclass(frozen=True)
class Patch:
    """A behaviour change guarded by ``workflow.patched``.

    ``since`` is the first saved-history generation recorded with it (``tests/histories/
    campaign_{since}_*``); the older generations need the unpatched branch to replay, so the
    patch can be deprecated only once no run from before it is open and those are deleted.
    """

    id: str
    since: str
    changed: str


VARIANT_AUDIT = Patch("variant-audit", "v2", "the holdout arm is written to the audit trail")
CONTROL_SKIPS_APPROVAL = Patch(
    "control-skips-approval", "v3", "control customers are never put before an operator"
)
DECISIONS_RIDE_ALONG = Patch(
    "decisions-ride-along",
    "v4",
    "decisions ride with the next activity instead of a local activity each",
)
DEADLINE_ATTRIBUTES = Patch(
    "deadline-attributes",
    "v5",
    "ApprovalDeadline and WaitUntil search attributes are set while a campaign waits",
)
EVENTS_DURING_HANDOVER = Patch(
    "events-during-handover",
    "v5",
    "an awaited event that arrives while a wait continues as new ends the resumed wait",
)
EARLY_SIGNALS = Patch(
    "early-signals",
    "v5",
    "a cohort exit, pause or consent change that arrives before the spec is loaded is kept",
)
WITHDRAW_ON_END = Patch(
    "withdraw-on-end",
    "v5",
    "a run that ends with an approval still pending withdraws it on record",
)
INTERRUPTIBLE_ACTIVITIES = Patch(
    "interruptible-activities",
    "v5",
    "an exit or revocation stops a scoring or CRM call that is still being retried",
)
APPROVAL_ESCALATION = Patch(
    "approval-escalation",
    "v6",
    "a request unanswered until approval.escalate_before its expiry is escalated once",
)
DECISION_AFTER_ACCEPTANCE = Patch(
    "decision-after-acceptance",
    "v7",
    "an operator's decision is put on record by an activity scheduled once the workflow task"
    " that accepted it is saved, so a task lost with its worker leaves no record of it",
)

PATCHES = (
    VARIANT_AUDIT,
    CONTROL_SKIPS_APPROVAL,
    DECISIONS_RIDE_ALONG,
    DEADLINE_ATTRIBUTES,
    EVENTS_DURING_HANDOVER,
    EARLY_SIGNALS,
    WITHDRAW_ON_END,
    INTERRUPTIBLE_ACTIVITIES,
    APPROVAL_ESCALATION,
    DECISION_AFTER_ACCEPTANCE,
)


def campaign_workflow_id(campaign_id: str, customer_key: str, entry_id: str) -> str:
    """The business-keyed workflow id: one per (campaign, customer, entry)."""
    return f"campaign:{campaign_id}:{customer_key}:{entry_id}"


def idempotency_key(workflow_id: str, step_id: str) -> str:
    """The key every external write carries; stable across retries, resets and replays."""
    return f"{workflow_id}:{step_id}"
