"""The campaign spec in the plain form the workflow interprets.

``cohortflow.spec`` validates what people write and turns it into these dataclasses; the
workflow receives them from the ``load_spec`` activity, so its history records exactly what
ran. Fields are only ever added, with defaults, so histories of older versions still decode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Step types the interpreter knows; anything else goes to the safe default segment.
STEP_TYPES = ("score", "branch", "approval", "crm", "wait", "exit")


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
    escalate_before_seconds: float = 0.0  # 0: no escalation notice
    approvers: list[str] = field(default_factory=list)  # empty: any operator
    required: int = 1  # distinct approvals the campaign waits for; one rejection ends it
    approve_roles: list[str] = field(default_factory=lambda: ["approver"])
    reject_roles: list[str] = field(default_factory=lambda: ["approver"])


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
    # How long a CRM action keeps being retried while the CRM is down or rate limited before
    # the campaign falls back; 0: until it is made.
    crm_give_up_after_seconds: float = 0.0
    on_consent_revoked: list[str] = field(default_factory=list)  # what a revocation undoes
    # Four eyes: neither the version's author nor whoever applied it may approve for it.
    author: str = ""
    applied_by: str = ""


def plain(spec: CampaignSpecDef) -> dict[str, Any]:
    """The spec as plain JSON values, to pin in a campaign's input."""
    return asdict(spec)


def from_plain(raw: dict[str, Any]) -> CampaignSpecDef:
    """A pinned spec back as dataclasses. Built field by field: the payload converter's
    generic path looks up every dataclass's type hints on each decode, which cost a worker
    about 2 ms a campaign. A field this code does not know fails loudly (TypeError), so a
    spec is never followed in part."""
    steps = [_step(step) for step in raw["steps"]]
    approval = ApprovalPolicy(**raw.get("approval", {}))
    return CampaignSpecDef(**{**raw, "steps": steps, "approval": approval})


def _step(raw: dict[str, Any]) -> StepDef:
    rules = [
        BranchRule([Comparison(**c) for c in rule["all"]], rule["next"])
        for rule in raw.get("rules", [])
    ]
    return StepDef(**{**raw, "rules": rules})
