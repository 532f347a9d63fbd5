"""Evaluate a cohort: its rule over every customer's features, as column arrays.

Only the features the rule names are read, each extracted by the database from the JSON
feature vector (``JSON_EXTRACT`` / ``->>``), so Python never parses a million documents; the
rule then runs as numpy comparisons over whole columns. Features are read true on the
evaluation day, as ``events.features.features_as_of`` says: day counters are aged from each
row's ``as_of`` over the whole column; a windowed count whose window has passed entirely is
zero, and one whose window has only partly moved is re-counted by ``windowed`` from that
customer's recent days (only those rows parse JSON). Event rules are counted in SQL.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, extract, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.cohorts.rules import (
    AllRule,
    AnyRule,
    CohortDefinition,
    EventRule,
    FeatureRule,
    NotRule,
    Rule,
    ScoreRule,
    leaves,
)
from cohortflow.events.features import (
    WINDOWS,
    RecentDays,
    aged,
    windowed,
)
from cohortflow.spec import parse_duration
from cohortflow.storage._sql import chunked, rows_per_statement, utc
from cohortflow.storage.cohorts import Diff, apply_membership
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CustomerFeatures, Event
from scoring.features import FEATURE_NAMES
from scoring.scorer import Scorer

Mask = npt.NDArray[np.bool_]
Column = npt.NDArray[np.float64]
# Scores every customer with a model (its champion): feature columns in, probabilities out.
ScoreFn = Callable[[str, Mapping[str, Column]], Column]

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    ">": operator.gt,
}
_SECONDS_PER_DAY = 86_400
_JULIAN_DAY_OF_EPOCH = 2_440_587.5
_EPOCH_DATE = date(1970, 1, 1)


@dataclass
class Population:
    """Every customer with features, and the columns a rule needs, aligned by position."""

    keys: npt.NDArray[np.object_]
    features: dict[str, Column]
    events: dict[tuple[str, str], Column]
    scores: dict[str, Column]


def _epoch_day(session: AsyncSession, column: Any) -> ColumnElement[Any]:
    """Days since 1970-01-01 of a UTC timestamp column, computed by the database (parsing
    a million timestamps in Python would dominate the evaluation)."""
    if session.get_bind().dialect.name == "sqlite":
        return func.julianday(column) - _JULIAN_DAY_OF_EPOCH
    return extract("epoch", column) / _SECONDS_PER_DAY


async def load_population(
    session: AsyncSession,
    definition: CohortDefinition,
    now: datetime,
    score: ScoreFn | None = None,
    only: Sequence[str] | None = None,
) -> Population:
    """Read what ``definition``'s rule needs for every customer with features (only those
    of ``only`` when given: the incremental path)."""
    comparisons = leaves(definition.rule)
    names = sorted({c.feature for c in comparisons if isinstance(c, FeatureRule)})
    models = sorted({c.score for c in comparisons if isinstance(c, ScoreRule)})
    if models:
        names = sorted(set(names) | set(FEATURE_NAMES))
    if WINDOWS.keys() & set(names):
        names = sorted(set(names) | WINDOWS.keys())  # ``windowed`` reads them together
    columns: list[ColumnElement[Any]] = [CustomerFeatures.features[n].as_float() for n in names]
    dated = any(aged(n) or n in WINDOWS for n in names)
    if dated:
        columns.append(_epoch_day(session, CustomerFeatures.as_of))
    query = select(CustomerFeatures.customer_key, *columns).order_by(CustomerFeatures.customer_key)
    if only is None:
        rows = list((await session.execute(query)).all())
    else:
        rows = []
        for chunk in chunked(sorted(set(only)), rows_per_statement(session, 1)):
            found = await session.execute(query.where(CustomerFeatures.customer_key.in_(chunk)))
            rows.extend(found.all())
    # Column-wise from here: one C-level conversion per column, None becoming NaN.
    transposed = list(zip(*rows, strict=True)) if rows else [() for _ in range(len(columns) + 1)]
    keys = np.array(transposed[0], dtype=object)
    features: dict[str, Column] = {}
    for index, name in enumerate(names, start=1):
        features[name] = np.array(transposed[index], dtype=np.float64)
    if dated:
        # Whole days from each row's as_of (a UTC midnight) to the evaluation day.
        today = float((utc(now).date() - _EPOCH_DATE).days)
        elapsed = today - np.floor(np.array(transposed[-1], dtype=np.float64) + 1e-9)
        for name in names:
            if aged(name):
                features[name] = features[name] + elapsed
        if WINDOWS.keys() & set(names):
            await _rewindow(session, keys, features, elapsed, utc(now).date())
    events: dict[tuple[str, str], Column] = {}
    position = {key: i for i, key in enumerate(keys)} if keys.size else {}
    for rule in comparisons:
        if isinstance(rule, EventRule) and (rule.event, rule.within) not in events:
            counts = np.zeros(len(keys), dtype=np.float64)
            start = utc(now) - parse_duration(rule.within)
            counted = (
                select(Event.customer_key, func.count())
                .where(Event.event == rule.event, Event.occurred_at > start)
                .where(Event.occurred_at <= utc(now), Event.type == "track")
                .group_by(Event.customer_key)
            )
            if only is not None:
                counted = counted.where(Event.customer_key.in_(sorted(position)))
            for key, count in await session.execute(counted):
                at_position = position.get(key)
                if at_position is not None:
                    counts[at_position] = count
            events[(rule.event, rule.within)] = counts
    scores: dict[str, Column] = {}
    for model in models:
        if score is None:
            raise ValueError(f"the rule uses score {model!r} but no scorer is configured")
        scores[model] = score(model, features) if len(keys) else np.zeros(0)
    return Population(keys, features, events, scores)


async def _rewindow(
    session: AsyncSession,
    keys: npt.NDArray[np.object_],
    features: dict[str, Column],
    elapsed: Column,
    day: date,
) -> None:
    """Move the windowed columns to the windows ending ``day`` (see the module's doc)."""
    for name, window in WINDOWS.items():
        passed = (elapsed >= window) & ~np.isnan(features[name])
        features[name] = np.where(passed, 0.0, features[name])
    moving = np.flatnonzero((elapsed > 0) & (elapsed < max(WINDOWS.values())))
    if not moving.size:
        return
    position = {keys[i]: int(i) for i in moving}
    for chunk in chunked(list(position), rows_per_statement(session, 1)):
        found = await session.execute(
            select(CustomerFeatures.customer_key, CustomerFeatures.recent).where(
                CustomerFeatures.customer_key.in_(chunk)
            )
        )
        for key, recent in found:
            i = position[key]
            stored = {n: None if np.isnan(v := features[n][i]) else float(v) for n in WINDOWS}
            days = RecentDays.from_json(recent) if recent is not None else None
            for name, value in windowed(stored, days, day, int(elapsed[i])).items():
                features[name][i] = np.nan if value is None else value


def apply_rule(rule: Rule, population: Population) -> Mask:
    """Which customers of the population the rule selects."""
    size = len(population.keys)
    if isinstance(rule, AllRule):
        mask = np.ones(size, dtype=bool)
        for sub in rule.all:
            mask &= apply_rule(sub, population)
        return mask
    if isinstance(rule, AnyRule):
        mask = np.zeros(size, dtype=bool)
        for sub in rule.any:
            mask |= apply_rule(sub, population)
        return mask
    if isinstance(rule, NotRule):
        return ~apply_rule(rule.not_, population)
    if isinstance(rule, FeatureRule):
        return _compare(population.features[rule.feature], rule.op, rule.value)
    if isinstance(rule, ScoreRule):
        return _compare(population.scores[rule.score], rule.op, rule.value)
    return _compare(population.events[(rule.event, rule.within)], rule.op, float(rule.count))


def _compare(column: Column, op: str, value: float) -> Mask:
    # A missing value (NaN) satisfies no comparison, ``!=`` included.
    with np.errstate(invalid="ignore"):
        result: Mask = _OPS[op](column, value) & ~np.isnan(column)
    return result


async def membership(
    db: Database,
    definition: CohortDefinition,
    now: datetime | None = None,
    score: ScoreFn | None = None,
    keys: Sequence[str] | None = None,
) -> set[str]:
    """The customer keys the cohort holds at ``now`` (of ``keys`` only, when given)."""
    at = utc(now)
    async with db.read_transaction() as session:
        population = await load_population(session, definition, at, score, keys)
    mask = apply_rule(definition.rule, population)
    return set(population.keys[mask].tolist())


def model_scores(scorer: Scorer) -> ScoreFn:
    """A :data:`ScoreFn` scoring with the registry's champion of each model."""

    def score(model: str, features: Mapping[str, Column]) -> Column:
        # Columns in: the scorer derives what a hybrid model adds to the stored features.
        return np.array(scorer.score(model, features, top_k=0).scores, dtype=np.float64)

    return score


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: its id, time and what changed."""

    cohort_id: str
    evaluation_id: str
    at: datetime
    diff: Diff


async def evaluate(
    db: Database,
    definition: CohortDefinition,
    now: datetime | None = None,
    score: ScoreFn | None = None,
    keys: Sequence[str] | None = None,
) -> Evaluation:
    """Compute membership and store the difference as entered/exited transitions; with
    ``keys``, for those customers only (the others keep their membership).

    Evaluating again with nothing changed stores nothing.
    """
    at = utc(now) if now is not None else datetime.now(UTC)
    members = await membership(db, definition, at, score, keys)
    evaluation_id = uuid.uuid4().hex
    among = set(keys) if keys is not None else None
    async with db.transaction() as session:
        diff = await apply_membership(
            session,
            definition.cohort_id,
            members,
            evaluation_id=evaluation_id,
            now=at,
            among=among,
        )
    return Evaluation(definition.cohort_id, evaluation_id, at, diff)
