"""Dry runs of a campaign spec: the path one customer would take now, with no side effect.

``walk`` follows the same rules as ``CampaignWorkflow`` (branch comparisons, holdout arm,
consent, frequency cap, quiet hours, local-time waits) over facts gathered up front, on a
simulated clock. Where the future is unknown it says what it assumed: an approval is
answered as ``approve`` says (approved by default), and an awaited event arrives only if it
is listed in ``events``. ``cohortflow campaign preview`` gathers the facts read-only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow import outbound, schedule
from cohortflow.errors import NotFound
from cohortflow.storage import consent, customers
from scoring.scorer import Scorer, ScoringError
from workflows.campaign import MAX_STEPS, compare, holdout_variant, score_band
from workflows.messages import CampaignSpecDef, Comparison, StepDef


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
    outcome: str
    reason: str

    @property
    def path(self) -> str:
        """The step ids in order, to group customers by the path they take."""
        return " > ".join(s.step_id for s in self.steps)


def walk(spec: CampaignSpecDef, ctx: PreviewContext) -> PreviewResult:
    """Follow the spec for one customer as the workflow would, without doing anything.

    Like the workflow, the walk knows scores, model versions and features only from its
    last score step: a branch or a ``{score.NAME}`` placeholder before any score step sees
    none of them.
    """
    known = replace(ctx, scores={}, features={}, model_versions={})
    steps = {s.id: s for s in spec.steps}
    order = [s.id for s in spec.steps]
    clock = ctx.now
    variant = (
        "unassigned"
        if spec.holdout_score
        else holdout_variant(spec.campaign_id, ctx.customer_key, spec.holdout_percent)
    )
    written = ctx.recent_actions
    path: list[PreviewStep] = []
    step_id: str | None = order[0]
    while len(path) < MAX_STEPS:
        if step_id is None:
            return PreviewResult(ctx.customer_key, variant, path, "completed", "all steps done")
        step = steps[step_id]
        chosen: str | None = None
        if step.type == "exit":
            path.append(PreviewStep(step.id, "exit", step.outcome))
            return PreviewResult(ctx.customer_key, variant, path, step.outcome, "exit step")
        if step.type == "score":
            unscored = [m for m in step.models if m not in ctx.scores]
            if unscored:
                # The workflow's scoring failure: the customer goes to the safe default.
                path.append(PreviewStep(step.id, "score", f"cannot score {', '.join(unscored)}"))
                return PreviewResult(
                    ctx.customer_key,
                    variant,
                    path,
                    "fallback",
                    f"scoring failed: segment {spec.safe_default_segment}",
                )
            scored = {m: ctx.scores[m] for m in step.models}
            known = replace(
                known,
                scores=scored,
                features=dict(ctx.features),
                model_versions={m: v for m, v in ctx.model_versions.items() if m in scored},
            )
            if variant == "unassigned":
                band = score_band(scored.get(spec.holdout_score, 0.0), spec.holdout_bands)
                variant = holdout_variant(
                    spec.campaign_id, ctx.customer_key, spec.holdout_percent, band
                )
            shown = ", ".join(f"{m} {v:.3f}" for m, v in scored.items())
            path.append(PreviewStep(step.id, "score", shown))
        elif step.type == "branch":
            chosen, matched = _branch(step, known)
            path.append(PreviewStep(step.id, "branch", f"{matched} -> {chosen or 'next'}"))
        elif step.type == "approval" and variant == "control":
            path.append(PreviewStep(step.id, "approval", "skipped: control arm (holdout)"))
        elif step.type == "approval":
            answer = "approved" if ctx.approve else "rejected"
            path.append(
                PreviewStep(step.id, "approval", f"waits for an operator; assumed {answer}")
            )
            if not ctx.approve:
                return PreviewResult(ctx.customer_key, variant, path, "rejected", "not approved")
        elif step.type == "crm":
            outcome = _crm(spec, step, known, variant, clock, written)
            path.append(outcome.step)
            clock = outcome.clock
            if outcome.terminal:
                return PreviewResult(
                    ctx.customer_key, variant, path, outcome.terminal, outcome.step.detail
                )
            written += 1 if outcome.step.crm_write else 0
            chosen = step.on_capped if outcome.capped else None
        elif step.type == "wait":
            chosen, clock, detail = _wait(step, ctx, clock)
            path.append(PreviewStep(step.id, "wait", detail))
        if chosen is None:
            following = order.index(step.id) + 1
            chosen = step.next or (order[following] if following < len(order) else None)
        step_id = chosen
    return PreviewResult(ctx.customer_key, variant, path, "failed", f"more than {MAX_STEPS} steps")


@dataclass
class _CrmOutcome:
    step: PreviewStep
    clock: datetime
    terminal: str = ""
    capped: bool = False


def _crm(
    spec: CampaignSpecDef,
    step: StepDef,
    ctx: PreviewContext,
    variant: str,
    clock: datetime,
    written: int,
) -> _CrmOutcome:
    if variant == "control":
        return _CrmOutcome(PreviewStep(step.id, "crm", f"holdout: no {step.action}"), clock)
    notes: list[str] = []
    if spec.quiet_start:
        opens = schedule.quiet_hours_end(clock, ctx.timezone, spec.quiet_start, spec.quiet_end)
        if opens > clock:
            notes.append(f"quiet hours: waits until {opens.isoformat(timespec='minutes')}")
            clock = opens
    if not ctx.consent.get((step.channel, step.purpose), False):
        detail = f"consent missing for {step.channel}/{step.purpose}"
        return _CrmOutcome(PreviewStep(step.id, "crm", detail), clock, "consent_blocked")
    if spec.cap_max_actions and written >= spec.cap_max_actions:
        notes.append(f"frequency cap reached ({written}/{spec.cap_max_actions}): skipped")
        return _CrmOutcome(PreviewStep(step.id, "crm", "; ".join(notes)), clock, capped=True)
    write = f"{step.action} {_target(spec, step, ctx, variant)}"
    notes.append(f"consent ok; would {write}")
    return _CrmOutcome(PreviewStep(step.id, "crm", "; ".join(notes), crm_write=write), clock)


def _target(spec: CampaignSpecDef, step: StepDef, ctx: PreviewContext, variant: str) -> str:
    if step.action == "enroll_sequence":
        return f"sequence {step.sequence_id}"
    if step.action == "add_to_list":
        return f"list {step.list_id}"
    values = {
        "cohort": ctx.cohort_id,
        "campaign": spec.campaign_id,
        "variant": variant,
        **{f"score.{k}": f"{v:.4f}" for k, v in ctx.scores.items()},
        **{f"model.{k}": v for k, v in ctx.model_versions.items()},
    }
    rendered = []
    for key, template in sorted(step.properties.items()):
        text = template
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        rendered.append(f"{key}={text}")
    return ", ".join(rendered)


def _wait(step: StepDef, ctx: PreviewContext, clock: datetime) -> tuple[str | None, datetime, str]:
    if step.event:
        if step.event in ctx.events:
            return step.on_event, clock, f"{step.event} arrives (assumed)"
        until = clock + timedelta(seconds=step.seconds)
        return step.on_timeout, until, f"no {step.event} by {until.isoformat(timespec='minutes')}"
    if step.until:
        until = schedule.next_local_time(clock, ctx.timezone, step.until)
    else:
        until = clock + timedelta(seconds=step.seconds)
    return None, until, f"until {until.isoformat(timespec='minutes')}"


def _branch(step: StepDef, ctx: PreviewContext) -> tuple[str | None, str]:
    for index, rule in enumerate(step.rules):
        if all(_holds(c, ctx) for c in rule.all):
            return rule.next, f"rules[{index}]"
    return step.default, "default"


def _holds(comparison: Comparison, ctx: PreviewContext) -> bool:
    source = ctx.scores if comparison.source == "score" else ctx.features
    value = source.get(comparison.name)
    return value is not None and compare(value, comparison.op, comparison.value)


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
        recent = await outbound.outbound_since(session, customer_key, since, exclude=None)
    zone = await outbound.customer_zone(session, customer_key, spec.default_timezone)
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
