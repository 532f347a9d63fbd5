"""Cohort definitions: a tree of ``all``/``any``/``not`` over comparisons, validated by
pydantic and interpreted by the evaluator; never turned into code, and into SQL only as
generated column names and bound values (``cohorts.compiled``).

A rule is one of::

    {"all": [rule, ...]}   {"any": [rule, ...]}   {"not": rule}
    {"feature": "recency_days", "op": ">=", "value": 90}
    {"score": "churn", "op": ">=", "value": 0.8}
    {"event": "purchase", "within": "P30D", "op": ">=", "count": 2}

A comparison with a missing value is false (as in SQL); ``not`` negates its result.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from cohortflow.events.features import COUNT_PREFIX, DAYS_SINCE_PREFIX
from cohortflow.spec import Ident, parse_duration
from scoring.features import FEATURE_NAMES

Op = Literal["<", "<=", "==", "!=", ">=", ">"]
PLAIN_FEATURES = frozenset(FEATURE_NAMES) | {"events_total", "events_30d"}
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,128}$")
MAX_DEPTH = 16
MIN_EVALUATE_EVERY = timedelta(minutes=1)


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FeatureRule(_Rule):
    """A stored feature compared with a number."""

    feature: str
    op: Op
    value: float

    @field_validator("feature")
    @classmethod
    def _known(cls, name: str) -> str:
        for prefix in (COUNT_PREFIX, DAYS_SINCE_PREFIX):
            if name.startswith(prefix) and _EVENT_NAME.match(name.removeprefix(prefix)):
                return name
        if name not in PLAIN_FEATURES:
            known = ", ".join(sorted(PLAIN_FEATURES))
            raise ValueError(
                f"unknown feature {name!r}: one of {known}, count:<event> or days_since:<event>"
            )
        return name


class ScoreRule(_Rule):
    """A model's score (the champion's, at evaluation time) compared with a probability."""

    score: Ident
    op: Op
    value: float = Field(ge=0.0, le=1.0)


class EventRule(_Rule):
    """How many ``event`` events the customer had in the window ending at evaluation time."""

    event: str = Field(pattern=_EVENT_NAME.pattern)
    within: str
    op: Op = ">="
    count: int = Field(1, ge=0)

    @field_validator("within")
    @classmethod
    def _window(cls, value: str) -> str:
        if parse_duration(value).total_seconds() <= 0:
            raise ValueError("must be a positive duration")
        return value


class AllRule(_Rule):
    """Every sub-rule holds."""

    all: list[Rule] = Field(min_length=1)


class AnyRule(_Rule):
    """At least one sub-rule holds."""

    any: list[Rule] = Field(min_length=1)


class NotRule(_Rule):
    """The sub-rule does not hold."""

    not_: Rule = Field(alias="not")


_KINDS = ("all", "any", "not", "feature", "score", "event")


def _kind(value: Any) -> str | None:
    """Which rule a document is, by its one distinguishing key (None: not a rule)."""
    if isinstance(value, dict):
        found = [k for k in _KINDS if k in value]
        return found[0] if len(found) == 1 else None
    for kind, cls in _CLASSES.items():
        if isinstance(value, cls):
            return kind
    return None


Rule = Annotated[
    Annotated[AllRule, Tag("all")]
    | Annotated[AnyRule, Tag("any")]
    | Annotated[NotRule, Tag("not")]
    | Annotated[FeatureRule, Tag("feature")]
    | Annotated[ScoreRule, Tag("score")]
    | Annotated[EventRule, Tag("event")],
    Discriminator(
        _kind,
        custom_error_type="rule_kind",
        custom_error_message="a rule has exactly one of the keys " + ", ".join(_KINDS),
    ),
]
_CLASSES: dict[str, type[_Rule]] = {
    "all": AllRule,
    "any": AnyRule,
    "not": NotRule,
    "feature": FeatureRule,
    "score": ScoreRule,
    "event": EventRule,
}


class CohortDefinition(BaseModel):
    """A cohort as authored."""

    model_config = ConfigDict(extra="forbid")

    cohort_id: Ident
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    rule: Rule
    # How often the cohort's schedule evaluates it in full (ISO-8601, at least a minute);
    # customers touched by new events are re-evaluated within seconds in between.
    evaluate_every: str = "PT1H"

    @field_validator("evaluate_every")
    @classmethod
    def _interval(cls, value: str) -> str:
        if parse_duration(value) < MIN_EVALUATE_EVERY:
            raise ValueError(f"must be at least {MIN_EVALUATE_EVERY.total_seconds():.0f} s")
        return value

    @field_validator("rule")
    @classmethod
    def _shallow(cls, rule: Rule) -> Rule:
        if depth(rule) > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH}")
        return rule


def depth(rule: Rule) -> int:
    """How deep the rule tree is (a comparison is 1)."""
    if isinstance(rule, AllRule):
        return 1 + max(depth(r) for r in rule.all)
    if isinstance(rule, AnyRule):
        return 1 + max(depth(r) for r in rule.any)
    if isinstance(rule, NotRule):
        return 1 + depth(rule.not_)
    return 1


def leaves(rule: Rule) -> list[FeatureRule | ScoreRule | EventRule]:
    """Every comparison in the tree, in order."""
    if isinstance(rule, AllRule):
        return [leaf for r in rule.all for leaf in leaves(r)]
    if isinstance(rule, AnyRule):
        return [leaf for r in rule.any for leaf in leaves(r)]
    if isinstance(rule, NotRule):
        return leaves(rule.not_)
    return [rule]


class CohortError(ValueError):
    """A cohort document that does not validate; ``problems`` name their paths."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_cohort(document: Any) -> CohortDefinition:
    """Validate a cohort document; raises :class:`CohortError` naming each bad field."""
    try:
        return CohortDefinition.model_validate(document)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors(include_url=False, include_input=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{_path(error['loc'])}: {message}")
        raise CohortError(problems) from exc


def _path(loc: tuple[int | str, ...]) -> str:
    """``rule.all[0].op`` from pydantic's location, without the union's member tags."""
    path = ""
    expect_tag = False
    for part in loc:
        if expect_tag and part in _KINDS:
            expect_tag = False
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
        # A rule (and so a tag) follows the root's ``rule``, a list index and ``not``.
        expect_tag = part in ("rule", "not") or isinstance(part, int)
    return path
