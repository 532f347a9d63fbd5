"""Campaign specs: the YAML/JSON document CRM teams write, validated by pydantic.

``CampaignSpec`` is what people author and what the store keeps (as JSON); ``to_definition``
turns it into the plain ``CampaignSpecDef`` dataclass the workflow interprets.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workflows.messages import (
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


def parse_duration(text: str) -> timedelta:
    """Parse an ISO-8601 duration of days and time (``P3D``, ``PT30S``, ``P1DT12H``)."""
    match = _DURATION.match(text.strip().upper())
    if not match:
        raise ValueError(f"{text!r} is not an ISO-8601 duration such as P3D or PT30S")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    return timedelta(days=parts["d"], hours=parts["h"], minutes=parts["m"], seconds=parts["s"])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComparisonSpec(_Model):
    """One test: exactly one of ``score`` or ``feature``, an operator and a number."""

    score: str | None = None
    feature: str | None = None
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float

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
    """A step. Which fields apply depends on ``type``; others must be left out."""

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
    duration: str | None = None
    outcome: Literal["completed", "exited"] = "completed"

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _fields_for_type(self) -> StepSpec:
        problems = {
            "score": not self.models and "a score step names at least one model in 'models'",
            "branch": not self.rules and "a branch step needs 'rules'",
            "crm": self._crm_problem(),
            "wait": self.duration is None and "a wait step needs 'duration'",
        }
        problem = problems.get(self.type)
        if problem:
            raise ValueError(problem)
        return self

    def _crm_problem(self) -> str | bool:
        if self.type != "crm":
            return False
        if self.action is None:
            return "a crm step needs 'action'"
        if self.action == "set_properties" and not self.properties:
            return "set_properties needs 'properties'"
        if self.action == "enroll_sequence" and not self.sequence_id:
            return "enroll_sequence needs 'sequence_id'"
        if self.action == "add_to_list" and not self.list_id:
            return "add_to_list needs 'list_id'"
        return False


class ApprovalSpec(_Model):
    """Approval policy for sensitive campaigns."""

    timeout: str = "P3D"
    on_timeout: Literal["reject", "fallback"] = "reject"
    approvers: list[str] = Field(default_factory=list)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: str) -> str:
        parse_duration(value)
        return value


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


class CampaignSpec(_Model):
    """A campaign as authored: entry cohort, controls and steps."""

    campaign_id: Ident
    name: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    entry_cohort: Ident
    safe_default_segment: str = Field(min_length=1)
    sensitive: bool = False
    exit_on_cohort_exit: bool = True
    reentry: ReentrySpec = Field(default_factory=ReentrySpec)
    holdout_percent: float = Field(0.0, ge=0, le=50)
    approval: ApprovalSpec = Field(default_factory=ApprovalSpec)
    steps: list[StepSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> CampaignSpec:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.id in seen:
                raise ValueError(f"steps[{i}].id: duplicate step id {step.id!r}")
            seen.add(step.id)
        for i, step in enumerate(self.steps):
            refs = [step.next, step.default, *(r.next for r in step.rules)]
            for ref in refs:
                if ref is not None and ref not in seen:
                    raise ValueError(f"steps[{i}]: unknown step {ref!r}")
        if any(s.type == "approval" for s in self.steps) and not self.sensitive:
            raise ValueError("approval steps are only allowed in a campaign marked sensitive")
        return self

    def to_definition(self, version: int) -> CampaignSpecDef:
        """The plain dataclass form the workflow runs, for one stored version."""
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
                approvers=list(self.approval.approvers),
            ),
            steps=[_step_definition(s) for s in self.steps],
        )


def _step_definition(step: StepSpec) -> StepDef:
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
        seconds=parse_duration(step.duration).total_seconds() if step.duration else 0.0,
        outcome=step.outcome,
    )


class SpecError(ValueError):
    """A spec failed validation; ``problems`` lists every ``path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "spec"


def parse_spec(document: dict[str, Any]) -> CampaignSpec:
    """Validate a spec document, raising ``SpecError`` with every problem and its path."""
    try:
        return CampaignSpec.model_validate(document)
    except ValidationError as exc:
        raise SpecError(
            [
                f"{_path(tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            ]
        ) from exc


def load_spec_file(path: Path) -> CampaignSpec:
    """Read a YAML or JSON spec file and validate it."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML or JSON ({exc})"]) from exc
    if not isinstance(document, dict):
        raise SpecError([f"{path}: a spec is a mapping of fields"])
    return parse_spec(document)
