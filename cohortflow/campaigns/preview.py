"""Dry runs of a campaign spec: the path one customer would take now, with no side effect.

``walk`` runs the workflow's own interpreter (its step loop, branch comparisons, holdout
draw, rendering) with steps simulated over facts gathered up front (consent, frequency cap,
quiet hours, local-time waits), on a simulated clock. Where the future is unknown it says
what it assumed: an approval is answered as ``approve`` says (approved by default), and an
awaited event arrives only if it is listed in ``events``. ``cohortflow campaign preview``
gathers the facts read-only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow import schedule
from cohortflow.errors import NotFound
from cohortflow.storage import consent, customers, outbound
from scoring.scorer import Scorer, ScoringError
from workflows.campaign import interpreter
from workflows.campaign.contract import AuditKind, CampaignState
from workflows.campaign.definition import CampaignSpecDef, StepDef
from workflows.campaign.interpreter import Ending, Next


@dataclass
class PreviewContext:
    """What is known about the customer now."""

    customer_key: str
    now: datetime
    timezone: ZoneInfo
    cohort_id: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    consent: dict[tuple[str, str], bool] = field(default_factory=dict)  # missing: no consent
    recent_actions: int = 0  # outbound actions within the cap window, all campaigns
    events: frozenset[str] = frozenset()  # events assumed to arrive while waiting
    approve: bool = True  # the operator's assumed answer to an approval


@dataclass
class PreviewStep:
    """One step of the path and what it would do."""

    step_id: str
    type: str
    detail: str
    crm_write: str = ""  # the CRM write it would make, if any


@dataclass
class PreviewResult:
    """The whole path and where it ends."""

    customer_key: str
    variant: str
    steps: list[PreviewStep]
    outcome: str  # the campaign state it would end in
    reason: str

    @property
    def path(self) -> str:
        """The step ids in order, to group customers by the path they take."""
        return " > ".join(s.step_id for s in self.steps)


async def walk(spec: CampaignSpecDef, ctx: PreviewContext) -> PreviewResult:
    """Follow the spec for one customer as the workflow would, without doing anything.

    The step loop is the workflow's own (``interpreter.run_steps``); only what each step
    does is simulated, on ``_Paper``. Like the workflow, the walk knows scores, model
    versions and features only from its last score step: a branch or a ``{score.NAME}``
    placeholder before any score step sees none of them.
    """
    paper = _Paper(spec, ctx)
    ending = await interpreter.run_steps(spec, paper, [])
    return PreviewResult(ctx.customer_key, paper.variant, paper.path, ending.state, ending.reason)


class _Paper:
    """Runs each step on paper: what it would do, over the facts gathered up front, on a
    simulated clock."""

    def __init__(self, spec: CampaignSpecDef, ctx: PreviewContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.known = replace(ctx, scores={}, features={}, model_versions={})
        self.clock = ctx.now
        self.variant = interpreter.entry_variant(spec, ctx.customer_key)
        self.written = ctx.recent_actions
        self.path: list[PreviewStep] = []

    async def begin(self, step_id: str, resumed: bool) -> Ending | None:
        """Nothing interrupts a walk on paper."""
        return None

    async def score(self, step: StepDef) -> Next:
        """Take the scores gathered up front; a model that cannot score ends in the fallback."""
        ctx = self.ctx
        unscored = [m for m in step.models if m not in ctx.scores]
        if unscored:
            self.path.append(PreviewStep(step.id, "score", f"cannot score {', '.join(unscored)}"))
            return Ending(
                CampaignState.FALLBACK,
                f"scoring failed: segment {self.spec.safe_default_segment}",
            )
        scored = {m: ctx.scores[m] for m in step.models}
        self.known = replace(
            self.known,
            scores=scored,
            features=dict(ctx.features),
            model_versions={m: v for m, v in ctx.model_versions.items() if m in scored},
        )
        if self.variant == "unassigned":
            self.variant, _ = interpreter.stratified_variant(self.spec, ctx.customer_key, scored)
        shown = ", ".join(f"{m} {v:.3f}" for m, v in scored.items())
        self.path.append(PreviewStep(step.id, "score", shown))
        return None

    async def branch(self, step: StepDef) -> Next:
        """The rule the workflow would take."""
        choice = interpreter.choose_branch(step, self.known.scores, self.known.features)
        self.path.append(
            PreviewStep(step.id, "branch", f"{choice.matched} -> {choice.next or 'next'}")
        )
        return choice.next

    async def approval(self, step: StepDef) -> Next:
        """Control customers skip it; others get the answer the context assumes."""
        if self.variant == "control":
            self.path.append(PreviewStep(step.id, "approval", "skipped: control arm (holdout)"))
            return None
        answer = "approved" if self.ctx.approve else "rejected"
        self.path.append(
            PreviewStep(step.id, "approval", f"waits for an operator; assumed {answer}")
        )
        return None if self.ctx.approve else Ending(CampaignState.REJECTED, "not approved")

    async def crm(self, step: StepDef) -> Next:
        """Quiet hours, consent, the cap, then the write it would make."""
        if self.variant == "control":
            self.path.append(PreviewStep(step.id, "crm", f"holdout: no {step.action}"))
            return None
        spec, ctx, notes = self.spec, self.ctx, []
        if spec.quiet_start:
            opens = schedule.quiet_hours_end(
                self.clock, ctx.timezone, spec.quiet_start, spec.quiet_end
            )
            if opens > self.clock:
                notes.append(f"quiet hours: waits until {opens.isoformat(timespec='minutes')}")
                self.clock = opens
        if not ctx.consent.get((step.channel, step.purpose), False):
            detail = f"consent missing for {step.channel}/{step.purpose}"
            self.path.append(PreviewStep(step.id, "crm", detail))
            return Ending(CampaignState.CONSENT_BLOCKED, detail)
        if spec.cap_max_actions and self.written >= spec.cap_max_actions:
            notes.append(f"frequency cap reached ({self.written}/{spec.cap_max_actions}): skipped")
            self.path.append(PreviewStep(step.id, "crm", "; ".join(notes)))
            return step.on_capped
        write = f"{step.action} {self._target(step)}"
        notes.append(f"consent ok; would {write}")
        self.path.append(PreviewStep(step.id, "crm", "; ".join(notes), crm_write=write))
        self.written += 1
        return None

    def _target(self, step: StepDef) -> str:
        if step.action == "enroll_sequence":
            return f"sequence {step.sequence_id}"
        if step.action == "add_to_list":
            return f"list {step.list_id}"
        values = interpreter.placeholders(
            self.ctx.cohort_id,
            self.spec.campaign_id,
            self.variant,
            self.known.scores,
            self.known.model_versions,
        )
        rendered = interpreter.render(step.properties, values)
        return ", ".join(f"{key}={text}" for key, text in sorted(rendered.items()))

    async def wait(self, step: StepDef) -> Next:
        """Move the clock; an awaited event arrives only if the context lists it."""
        ctx, chosen = self.ctx, None
        if step.event and step.event in ctx.events:
            self.path.append(PreviewStep(step.id, "wait", f"{step.event} arrives (assumed)"))
            return step.on_event
        if step.until and not step.event:
            until = schedule.next_local_time(self.clock, ctx.timezone, step.until)
        else:
            until = self.clock + timedelta(seconds=step.seconds)
        shown = until.isoformat(timespec="minutes")
        if step.event:
            detail, chosen = f"no {step.event} by {shown}", step.on_timeout
        else:
            detail = f"until {shown}"
        self.clock = until
        self.path.append(PreviewStep(step.id, "wait", detail))
        return chosen

    async def exit(self, step: StepDef) -> Next:
        """Where the walk ends."""
        self.path.append(PreviewStep(step.id, "exit", step.outcome))
        return interpreter.exit_ending(step)


def summarise(results: list[PreviewResult]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """How many customers take each path, end in each outcome, and each CRM write made."""
    paths = Counter(r.path for r in results)
    outcomes = Counter(r.outcome for r in results)
    writes = Counter(s.crm_write for r in results for s in r.steps if s.crm_write)
    return paths, outcomes, writes


async def gather_context(
    session: AsyncSession,
    scorer: Scorer,
    spec: CampaignSpecDef,
    customer_key: str,
    now: datetime,
    *,
    events: frozenset[str] = frozenset(),
    approve: bool = True,
) -> tuple[PreviewContext, list[str]]:
    """Read (never write) what the campaign would check for this customer now.

    Returns the context and notes on what could not be known (a model that would fail
    to score, which sends the real campaign to its safe default segment).
    """
    notes: list[str] = []
    features = (await customers.get_features(session, [customer_key])).get(customer_key)
    if features is None:
        raise NotFound(f"customer {customer_key} has no stored features", field="customer")
    scores: dict[str, float] = {}
    versions: dict[str, str] = {}
    for model in sorted({m for s in spec.steps if s.type == "score" for m in s.models}):
        try:
            batch = scorer.score(model, [features], top_k=0)
        except ScoringError as exc:
            notes.append(f"model {model} cannot score ({exc}): the campaign would fall back")
            continue
        scores[model], versions[model] = batch.scores[0], batch.version
    channels = {(s.channel, s.purpose) for s in spec.steps if s.type == "crm"}
    consent_now = {
        pair: await consent.has_consent(session, customer_key, *pair) for pair in channels
    }
    recent = 0
    if spec.cap_max_actions:
        since = now - timedelta(seconds=spec.cap_window_seconds)
        recent = await outbound.outbound_since(
            session, customer_key, since, written_kind=AuditKind.CRM_WRITTEN, exclude=None
        )
    zone = schedule.zone(
        await customers.timezone_name(session, customer_key), spec.default_timezone
    )
    context = PreviewContext(
        customer_key=customer_key,
        now=now,
        timezone=zone,
        cohort_id=spec.entry_cohort,
        scores=scores,
        features={k: v for k, v in features.items() if v is not None},
        model_versions=versions,
        consent=consent_now,
        recent_actions=recent,
        events=events,
        approve=approve,
    )
    return context, notes
