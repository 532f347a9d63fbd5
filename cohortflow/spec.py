"""Campaign specs: the YAML/JSON document CRM teams write, validated by pydantic.

``CampaignSpec`` is what people author and what the store keeps (as JSON); ``to_definition``
turns it into the plain ``CampaignSpecDef`` dataclass the workflow interprets.

Validation reports every problem at once, each as ``path: reason``: pydantic's field errors,
then the checks over the step graph (unknown step references, steps no path reaches, loops
without a wait step, in which the interpreter would spin until its step bound).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from workflows.campaign.definition import (
    ApprovalPolicy,
    BranchRule,
    CampaignSpecDef,
    Comparison,
    StepDef,
)

Ident = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]{0,62}$")]
_DURATION = re.compile(
    r"^P(?!$)(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_TIME_OF_DAY = re.compile(r"^(?P<h>[01]\d|2[0-3]):(?P<m>[0-5]\d)$")
# Ten years: longer than any campaign runs, and far inside what timedelta and Temporal's
# timers accept, so a typo like P99999999D is refused here instead of crashing a workflow.
MAX_DURATION = timedelta(days=3650)
# Steps that hold a workflow durably; a loop must pass one, or it spins without waiting.
WAIT_STEP = "wait"


def parse_duration(text: str) -> timedelta:
    """Parse an ISO-8601 duration of days and time (``P3D``, ``PT30S``, ``P1DT12H``)."""
    match = _DURATION.match(text.strip().upper())
    if not match:
        raise ValueError(f"{text!r} is not an ISO-8601 duration such as P3D or PT30S")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    seconds = parts["d"] * 86_400 + parts["h"] * 3_600 + parts["m"] * 60 + parts["s"]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than the longest allowed duration, P3650D")
    return timedelta(seconds=seconds)


def _positive_duration(text: str) -> str:
    if parse_duration(text) <= timedelta(0):
        raise ValueError(f"{text!r} must be longer than zero")
    return text


def _time_of_day(text: str) -> str:
    if not _TIME_OF_DAY.match(text):
        raise ValueError(f"{text!r} is not a local time of day HH:MM (00:00 to 23:59)")
    return text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComparisonSpec(_Model):
    """One test: exactly one of ``score`` or ``feature``, an operator and a number."""

    score: str | None = None
    feature: str | None = None
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> ComparisonSpec:
        if (self.score is None) == (self.feature is None):
            raise ValueError("give exactly one of 'score' or 'feature'")
        return self


class BranchRuleSpec(_Model):
    """Take ``next`` when every comparison in ``all`` holds."""

    all: list[ComparisonSpec] = Field(min_length=1)
    next: Ident


class StepSpec(_Model):
    """A step. Which fields apply depends on ``type``; others must be left out.

    A ``wait`` step holds for exactly one of: ``duration`` (ISO-8601), ``until`` (the next
    local time of day HH:MM in the customer's time zone), or ``event`` (a customer event
    such as ``purchase``) with a ``timeout``, going to ``on_event`` or ``on_timeout``.
    A ``crm`` step goes to ``on_capped`` when the frequency cap refuses its action.
    """

    id: Ident
    type: Literal["score", "branch", "approval", "crm", "wait", "exit"]
    next: Ident | None = None
    models: list[str] = Field(default_factory=list)
    rules: list[BranchRuleSpec] = Field(default_factory=list)
    default: Ident | None = None
    reason: str = ""
    action: Literal["set_properties", "enroll_sequence", "add_to_list"] | None = None
    properties: dict[str, str] = Field(default_factory=dict)
    sequence_id: str = ""
    list_id: str = ""
    channel: str = "email"
    purpose: str = "marketing"
    on_capped: Ident | None = None
    duration: str | None = None
    until: str | None = None
    event: Ident | None = None
    timeout: str | None = None
    on_event: Ident | None = None
    on_timeout: Ident | None = None
    outcome: Literal["completed", "exited"] = "completed"

    @field_validator("duration", "timeout")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        return None if value is None else _positive_duration(value)

    @field_validator("until")
    @classmethod
    def _until(cls, value: str | None) -> str | None:
        return None if value is None else _time_of_day(value)

    @model_validator(mode="after")
    def _fields_for_type(self) -> StepSpec:
        problems = list(self._type_problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _type_problems(self) -> Iterator[str]:
        if self.type == "score" and not self.models:
            yield "a score step names at least one model in 'models'"
        if self.type == "branch" and not self.rules:
            yield "a branch step needs 'rules'"
        if self.type == "crm":
            yield from self._crm_problems()
        if self.type == "wait":
            yield from self._wait_problems()
        else:
            waits = ("duration", "until", "event", "timeout", "on_event", "on_timeout")
            stray = [name for name in waits if getattr(self, name) is not None]
            if stray:
                yield f"{', '.join(stray)} only apply to wait steps"
        if self.type != "crm" and self.on_capped is not None:
            yield "'on_capped' only applies to crm steps"

    def _crm_problems(self) -> Iterator[str]:
        if self.action is None:
            yield "a crm step needs 'action'"
        elif self.action == "set_properties" and not self.properties:
            yield "set_properties needs 'properties'"
        elif self.action == "enroll_sequence" and not self.sequence_id:
            yield "enroll_sequence needs 'sequence_id'"
        elif self.action == "add_to_list" and not self.list_id:
            yield "add_to_list needs 'list_id'"

    def _wait_problems(self) -> Iterator[str]:
        kinds = [k for k in ("duration", "until", "event") if getattr(self, k) is not None]
        if len(kinds) != 1:
            yield "a wait step needs exactly one of 'duration', 'until' or 'event'"
        if self.event is not None and self.timeout is None:
            yield "a wait for an event needs 'timeout' (an ISO-8601 duration)"
        if self.event is None and (
            self.timeout is not None or self.on_event is not None or self.on_timeout is not None
        ):
            yield "'timeout', 'on_event' and 'on_timeout' only apply to a wait for an event"


ApproverRole = Literal["approver", "operator", "admin"]


def _approvers_only() -> list[ApproverRole]:
    return ["approver"]


class ApprovalSpec(_Model):
    """Approval policy for sensitive campaigns.

    ``required`` distinct approvers must approve (the campaign waits for the last; one
    rejection ends it). ``approve_roles`` and ``reject_roles`` say which token roles may
    give each answer; ``approvers``, when set, names the only identities who may decide.
    ``escalate_before`` (an ISO-8601 duration shorter than ``timeout``): that long before a
    request expires unanswered, the campaign escalates it once (audited, shown beside the
    request, posted to the escalation webhook).
    """

    timeout: str = "P3D"
    on_timeout: Literal["reject", "fallback"] = "reject"
    escalate_before: str | None = None
    approvers: list[str] = Field(default_factory=list)
    required: int = Field(1, ge=1, le=10)
    approve_roles: list[ApproverRole] = Field(default_factory=_approvers_only, min_length=1)
    reject_roles: list[ApproverRole] = Field(default_factory=_approvers_only, min_length=1)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: str) -> str:
        return _positive_duration(value)

    @field_validator("escalate_before")
    @classmethod
    def _escalate_before(cls, value: str | None) -> str | None:
        return None if value is None else _positive_duration(value)

    @model_validator(mode="after")
    def _escalation_inside_timeout(self) -> ApprovalSpec:
        if self.escalate_before is not None and parse_duration(
            self.escalate_before
        ) >= parse_duration(self.timeout):
            raise ValueError(
                f"escalate_before {self.escalate_before!r} must be shorter than timeout"
                f" {self.timeout!r}"
            )
        return self


class ReentrySpec(_Model):
    """Whether a customer who entered before may enter again.

    ``once``: never. ``after_exit``: after their previous campaign ended. ``cooldown``: once
    ``cooldown`` (an ISO-8601 duration) has passed since their previous entry.
    """

    rule: Literal["once", "after_exit", "cooldown"] = "once"
    cooldown: str | None = None

    @field_validator("cooldown")
    @classmethod
    def _cooldown(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _cooldown_for_rule(self) -> ReentrySpec:
        if (self.rule == "cooldown") != (self.cooldown is not None):
            raise ValueError("give 'cooldown' exactly when rule is 'cooldown'")
        return self


class ConversionSpec(_Model):
    """The goal: the customer's ``event`` within ``window`` of entering counts as converted."""

    event: Ident
    window: str = "P14D"

    @field_validator("window")
    @classmethod
    def _window(cls, value: str) -> str:
        return _positive_duration(value)


class StratifySpec(_Model):
    """Holdout strata: bands of one score, cut at ``bands`` (ascending, between 0 and 1)."""

    score: str = Field(min_length=1)
    bands: list[float] = Field(min_length=1, max_length=9)

    @field_validator("bands")
    @classmethod
    def _bands(cls, value: list[float]) -> list[float]:
        if any(not 0 < b < 1 for b in value) or value != sorted(set(value)):
            raise ValueError("bands are distinct cut points in (0, 1), ascending")
        return value


class FrequencyCapSpec(_Model):
    """At most ``max_actions`` outbound actions per customer per ``per``, all campaigns."""

    max_actions: int = Field(ge=1, le=1000)
    per: str = "P7D"

    @field_validator("per")
    @classmethod
    def _per(cls, value: str) -> str:
        return _positive_duration(value)


class QuietHoursSpec(_Model):
    """No outbound action from ``start`` to ``end`` in the customer's local time.

    The window may wrap midnight (``21:00`` to ``08:00``).
    """

    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        return _time_of_day(value)

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHoursSpec:
        if self.start == self.end:
            raise ValueError("quiet hours need 'start' and 'end' to differ")
        return self


class CrmSpec(_Model):
    """How the campaign treats its CRM."""

    # How long a CRM action may keep failing for reasons that are not this record's (the CRM
    # down, rate limited) before the customer goes to the safe default segment instead.
    give_up_after: str = "P1D"

    @field_validator("give_up_after")
    @classmethod
    def _give_up_after(cls, value: str) -> str:
        return _positive_duration(value)


class CampaignSpec(_Model):
    """A campaign as authored: entry cohort, controls and steps."""

    campaign_id: Ident
    name: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    # Who wrote this version: barred from approving for it, like whoever applies it.
    author: str = ""
    tags: list[Ident] = Field(default_factory=list)  # approver tokens may be scoped to tags
    entry_cohort: Ident
    safe_default_segment: str = Field(min_length=1)
    sensitive: bool = False
    exit_on_cohort_exit: bool = True
    exit_on_events: list[Ident] = Field(default_factory=list)
    conversion: ConversionSpec | None = None
    reentry: ReentrySpec = Field(default_factory=ReentrySpec)
    holdout_percent: float = Field(0.0, ge=0, le=50)
    holdout_stratify: StratifySpec | None = None
    frequency_cap: FrequencyCapSpec | None = None
    quiet_hours: QuietHoursSpec | None = None
    default_timezone: str = "UTC"
    crm: CrmSpec = Field(default_factory=lambda: CrmSpec())
    on_consent_revoked: list[Literal["unenroll", "remove_from_lists", "clear_properties"]] = Field(
        default_factory=list
    )
    approval: ApprovalSpec = Field(
        default_factory=ApprovalSpec, validation_alias=AliasChoices("approval", "approvals")
    )
    steps: list[StepSpec] = Field(min_length=1)

    @field_validator("default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as Europe/Paris") from None
        return value

    @model_validator(mode="after")
    def _whole_spec(self) -> CampaignSpec:
        problems = [
            *graph_problems(_nodes_of(self.steps)),
            *_campaign_problems(self),
        ]
        if problems:
            raise ValueError(_PROBLEMS_MARK + "\n".join(problems))
        return self

    def to_definition(self, version: int, applied_by: str = "") -> CampaignSpecDef:
        """The plain dataclass form the workflow runs, for one stored version (applied by
        ``applied_by``)."""
        cap, quiet, goal, strata = (
            self.frequency_cap,
            self.quiet_hours,
            self.conversion,
            self.holdout_stratify,
        )
        return CampaignSpecDef(
            campaign_id=self.campaign_id,
            version=version,
            name=self.name,
            owner=self.owner,
            entry_cohort=self.entry_cohort,
            safe_default_segment=self.safe_default_segment,
            sensitive=self.sensitive,
            exit_on_cohort_exit=self.exit_on_cohort_exit,
            holdout_percent=self.holdout_percent,
            approval=ApprovalPolicy(
                timeout_seconds=parse_duration(self.approval.timeout).total_seconds(),
                on_timeout=self.approval.on_timeout,
                escalate_before_seconds=parse_duration(
                    self.approval.escalate_before or "PT0S"
                ).total_seconds(),
                approvers=list(self.approval.approvers),
                required=self.approval.required,
                approve_roles=list(self.approval.approve_roles),
                reject_roles=list(self.approval.reject_roles),
            ),
            steps=[_step_definition(s) for s in self.steps],
            exit_on_events=list(self.exit_on_events),
            conversion_event=goal.event if goal else "",
            conversion_window_seconds=parse_duration(goal.window).total_seconds() if goal else 0,
            holdout_score=strata.score if strata else "",
            holdout_bands=list(strata.bands) if strata else [],
            cap_max_actions=cap.max_actions if cap else 0,
            cap_window_seconds=parse_duration(cap.per).total_seconds() if cap else 0.0,
            quiet_start=quiet.start if quiet else "",
            quiet_end=quiet.end if quiet else "",
            default_timezone=self.default_timezone,
            crm_give_up_after_seconds=parse_duration(self.crm.give_up_after).total_seconds(),
            on_consent_revoked=list(dict.fromkeys(self.on_consent_revoked)),
            author=self.author,
            applied_by=applied_by,
        )


def _campaign_problems(spec: CampaignSpec) -> Iterator[str]:
    """Rules across fields that pydantic's per-field checks cannot see."""
    for i, step in enumerate(spec.steps):
        if step.type == "approval" and not spec.sensitive:
            yield f"steps[{i}]: approval steps are only allowed in a campaign marked sensitive"
    named = spec.approval.approvers
    if named and spec.approval.required > len(set(named)):
        yield (
            f"approval.required: {spec.approval.required} approvers required but "
            f"approval.approvers names only {len(set(named))}"
        )
    strata = spec.holdout_stratify
    if strata is not None:
        first = spec.steps[0]
        if first.type != "score" or strata.score not in first.models:
            yield (
                f"holdout_stratify.score: the first step must be a score step with model "
                f"{strata.score!r}, so the arm is drawn before any outbound action"
            )
        if spec.holdout_percent <= 0:
            yield "holdout_stratify: only applies when holdout_percent is above 0"


# ---------------------------------------------------------------------- the step graph


@dataclass(frozen=True)
class _Node:
    """A step as the graph checks see it: position, id, type and where it may go next."""

    index: int
    id: str
    type: str
    # (field path, target) for every explicit reference, e.g. ("rules[0].next", "approve").
    refs: tuple[tuple[str, str], ...]
    falls_through: bool  # may continue with ``next`` or the following step


_REF_FIELDS = ("next", "default", "on_capped", "on_event", "on_timeout")


def _nodes_of(steps: Iterable[StepSpec]) -> list[_Node]:
    return [
        node
        for i, s in enumerate(steps)
        if (node := _node(i, s.model_dump(mode="python"))) is not None
    ]


def _node(index: int, raw: Any) -> _Node | None:
    """Read one step from a parsed model or a raw document, ignoring what cannot be read."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        return None
    refs: list[tuple[str, str]] = [
        (name, raw[name]) for name in _REF_FIELDS if isinstance(raw.get(name), str)
    ]
    rules = raw.get("rules")
    if isinstance(rules, list):
        refs += [
            (f"rules[{r}].next", rule["next"])
            for r, rule in enumerate(rules)
            if isinstance(rule, dict) and isinstance(rule.get("next"), str)
        ]
    kind = raw.get("type") if isinstance(raw.get("type"), str) else ""
    # Which outcomes leave through the fall-through edge: a branch only when it has no
    # default, a wait for an event when one of its outcomes names no step; never an exit.
    falls = kind != "exit" and not (kind == "branch" and isinstance(raw.get("default"), str))
    if kind == "wait" and raw.get("event") is not None:
        falls = not (
            isinstance(raw.get("on_event"), str) and isinstance(raw.get("on_timeout"), str)
        )
    return _Node(index, raw["id"], str(kind), tuple(refs), falls)


def graph_problems(nodes: list[_Node]) -> Iterator[str]:
    """Duplicate ids, unknown references, unreachable steps and loops without a wait."""
    by_id: dict[str, _Node] = {}
    for node in nodes:
        if node.id in by_id:
            yield f"steps[{node.index}].id: duplicate step id {node.id!r}"
        else:
            by_id[node.id] = node
    for node in nodes:
        for path, target in node.refs:
            if target not in by_id:
                yield f"steps[{node.index}].{path}: unknown step {target!r}"
    if not nodes or nodes[0].index != 0:
        return
    edges = {node.id: _successors(node, nodes, by_id) for node in by_id.values()}
    reached = _reachable(nodes[0].id, edges)
    for node in nodes:
        if node.id not in reached and by_id.get(node.id) is node:
            yield f"steps[{node.index}]: step {node.id!r} is unreachable from the first step"
    # An approval's id is derived from (workflow, step): asking twice would reuse a decided one.
    looped_approvals = [
        node
        for node in nodes
        if node.type == "approval"
        and by_id.get(node.id) is node
        and node.id in _reachable_from(edges.get(node.id, []), edges)
    ]
    for node in looped_approvals:
        yield (
            f"steps[{node.index}]: approval step {node.id!r} is inside a loop; "
            "a campaign asks for one approval once"
        )
    loop = _loop_without_wait(edges, by_id)
    if loop:
        first = by_id[loop[0]]
        yield (
            f"steps[{first.index}]: loop {' -> '.join([*loop, loop[0]])} has no wait step, "
            "so it would repeat without ever pausing"
        )


def _successors(node: _Node, nodes: list[_Node], by_id: dict[str, _Node]) -> list[str]:
    explicit = {path: target for path, target in node.refs if target in by_id}
    out = [t for p, t in explicit.items() if p != "next"]
    if node.falls_through:
        if "next" in explicit:
            out.append(explicit["next"])
        else:
            position = nodes.index(node)
            if position + 1 < len(nodes):
                out.append(nodes[position + 1].id)
    return out


def _reachable(start: str, edges: dict[str, list[str]]) -> set[str]:
    return {start} | _reachable_from([start], edges)


def _reachable_from(starts: list[str], edges: dict[str, list[str]]) -> set[str]:
    """Every step some path from ``starts`` reaches, the starts included."""
    seen, todo = set(starts), list(starts)
    while todo:
        for target in edges.get(todo.pop(), []):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _loop_without_wait(edges: dict[str, list[str]], by_id: dict[str, _Node]) -> list[str]:
    """A cycle through steps that are not waits, in step order, or [] when there is none."""
    free = {n for n, node in by_id.items() if node.type != WAIT_STEP}
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        colour[node] = 1
        path.append(node)
        for target in edges.get(node, []):
            if target not in free:
                continue
            if colour.get(target) == 1:
                return path[path.index(target) :]
            if target not in colour and (found := visit(target)):
                return found
        path.pop()
        colour[node] = 2
        return []

    for start in sorted(free, key=lambda n: by_id[n].index):
        if start not in colour and (found := visit(start)):
            return found
    return []


# ---------------------------------------------------------------------- definitions


def _step_definition(step: StepSpec) -> StepDef:
    seconds = 0.0
    if step.duration is not None:
        seconds = parse_duration(step.duration).total_seconds()
    elif step.timeout is not None:
        seconds = parse_duration(step.timeout).total_seconds()
    return StepDef(
        id=step.id,
        type=step.type,
        next=step.next,
        models=list(step.models),
        rules=[
            BranchRule(
                all=[
                    Comparison(
                        source="score" if c.score is not None else "feature",
                        name=c.score if c.score is not None else str(c.feature),
                        op=c.op,
                        value=c.value,
                    )
                    for c in rule.all
                ],
                next=rule.next,
            )
            for rule in step.rules
        ],
        default=step.default,
        reason=step.reason,
        action=step.action or "",
        properties=dict(step.properties),
        sequence_id=step.sequence_id,
        list_id=step.list_id,
        channel=step.channel,
        purpose=step.purpose,
        seconds=seconds,
        outcome=step.outcome,
        until=step.until or "",
        event=step.event or "",
        on_event=step.on_event,
        on_timeout=step.on_timeout,
        on_capped=step.on_capped,
    )


# ---------------------------------------------------------------------- parsing


class SpecError(ValueError):
    """A spec failed validation; ``problems`` lists every ``path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# Prefixes the whole-spec validator's message, whose lines already carry their own paths.
_PROBLEMS_MARK = "spec problems:\n"


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "spec"


def _messages(exc: ValidationError) -> tuple[list[str], bool]:
    """Every problem as ``path: reason``, and whether the whole-spec checks ran."""
    problems: list[str] = []
    whole_spec_ran = False
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if message.startswith(_PROBLEMS_MARK):
            whole_spec_ran = True
            problems += message.removeprefix(_PROBLEMS_MARK).splitlines()
        else:
            problems.append(f"{_path(tuple(error['loc']))}: {message}")
    return problems, whole_spec_ran


def parse_spec(document: Any) -> CampaignSpec:
    """Validate a spec document, raising ``SpecError`` with every problem and its path.

    When some fields fail their own checks, pydantic never runs the whole-spec checks, so
    the step graph is then checked here over the raw document: one pass reports both.
    """
    if not isinstance(document, dict):
        raise SpecError(["spec: a spec is a mapping of fields"])
    try:
        return CampaignSpec.model_validate(document)
    except ValidationError as exc:
        problems, whole_spec_ran = _messages(exc)
    steps = document.get("steps")
    if not whole_spec_ran and isinstance(steps, list):
        nodes = [n for i, raw in enumerate(steps) if (n := _node(i, raw)) is not None]
        problems += graph_problems(nodes)
        if document.get("sensitive") is not True:
            problems += [
                f"steps[{n.index}]: approval steps are only allowed in a campaign marked sensitive"
                for n in nodes
                if n.type == "approval"
            ]
    raise SpecError(problems)


def load_spec_text(text: str, source: str = "spec") -> CampaignSpec:
    """Validate YAML or JSON text (JSON is YAML)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([f"{source}: not valid YAML or JSON ({exc})"]) from exc
    if not isinstance(document, dict):
        raise SpecError([f"{source}: a spec is a mapping of fields"])
    return parse_spec(document)


def load_spec_file(path: Path) -> CampaignSpec:
    """Read a YAML or JSON spec file and validate it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot be read ({exc})"]) from exc
    return load_spec_text(text, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a campaign spec document."""
    return CampaignSpec.model_json_schema()
