"""Evaluate a cohort: its rule over every customer's features, as column arrays.

A full evaluation of a rule over stored features only runs on the columnar snapshot as one
DuckDB query (``cohorts.compiled``); the customers changed since the snapshot, and rows whose
windowed counts must be re-counted, go through the numpy interpreter below, as do rules on
scores or event counts and the incremental path.

Only the features the rule names are read. A full evaluation reads them from the columnar
snapshot (``storage.feature_snapshot``: DuckDB over Parquet, one column per feature) and,
for the customers changed since it, from the operational copy, where the incremental path
reads its few customers too (the database extracts each feature from the JSON vector). Keys,
the costly part, are read from the snapshot only for the members. The rule then runs as
numpy comparisons over whole columns. Features are read true on the
evaluation day, as ``events.features.features_as_of`` says: day counters are aged from each
row's ``as_of`` over the whole column; a windowed count whose window has passed entirely is
zero, and one whose window has only partly moved is re-counted by ``windowed`` from that
customer's recent days (only those rows parse JSON). Event rules are counted in SQL.
"""

from __future__ import annotations

import asyncio
import json
import operator
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.cohorts import compiled
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
from cohortflow.storage.feature_snapshot import (
    EPOCH_DATE,
    Snapshot,
    changed_keys,
    default_directory,
    epoch_day,
    registered,
    take,
)
from cohortflow.storage.tables import CustomerFeatures, Event, FeatureChange
from scoring.features import FEATURE_NAMES
from scoring.scorer import Scorer

_T = TypeVar("_T")
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
# A full evaluation takes a new snapshot once more customers than this (or a hundredth of
# the snapshot) changed since the last: reading them row by row would cost more.
RETAKE_AFTER = 50_000


class Keys:
    """The customer keys of a population, by position: held in memory."""

    def __init__(self, keys: npt.NDArray[np.object_]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def tolist(self) -> list[str]:
        """Every key, in position order."""
        return list(self._keys.tolist())

    def where(self, mask: Mask) -> list[str]:
        """The keys at the positions ``mask`` selects."""
        return list(self._keys[mask].tolist())

    async def recent(self, session: AsyncSession, mask: Mask) -> list[RecentDays | None]:
        """The stored recent days of the customers ``mask`` selects, in position order."""
        chosen = self.where(mask)
        found: dict[str, RecentDays | None] = {}
        for chunk in chunked(chosen, rows_per_statement(session, 1)):
            rows = await session.execute(
                select(CustomerFeatures.customer_key, CustomerFeatures.recent).where(
                    CustomerFeatures.customer_key.in_(chunk)
                )
            )
            found |= {k: None if r is None else RecentDays.from_json(r) for k, r in rows}
        return [found.get(key) for key in chosen]


class SnapshotKeys(Keys):
    """Keys of a snapshot's customers followed by those of the changed rows (``delta``),
    read from the snapshot file only for the positions asked for. The snapshot's rows of
    the changed customers (``changed``) stay in place and are never returned as keys: one
    scan of the key column both drops them and reads the members."""

    def __init__(self, path: Path, size: int, delta: Keys, changed: Sequence[str]) -> None:
        super().__init__(np.empty(0, dtype=object))
        self._path = path
        self._size = size
        self._delta = delta
        self._changed = changed

    def __len__(self) -> int:
        return self._size + len(self._delta)

    def tolist(self) -> list[str]:
        """Every key in position order: a changed customer's stale snapshot row too, before
        its current row (so a key's last position is its current one)."""
        stored: list[str] = _positional(self._path, "customer_key", np.ones(self._size, bool))
        return stored + self._delta.tolist()

    def where(self, mask: Mask) -> list[str]:
        """The current keys at the positions ``mask`` selects."""
        found: list[str] = _positional(
            self._path, "customer_key", mask[: self._size], self._changed
        )
        return found + self._delta.where(mask[self._size :])

    async def recent(self, session: AsyncSession, mask: Mask) -> list[RecentDays | None]:
        """The recent days of the customers ``mask`` selects, in position order."""
        rows = mask[: self._size]
        stored = await asyncio.to_thread(_positional, self._path, "recent", rows)
        days = [_recent_days(r) for r in stored]
        return days + await self._delta.recent(session, mask[self._size :])


class HeldKeys(Keys):
    """Keys with each customer's recent days as read beside them (snapshot JSON text)."""

    def __init__(self, keys: npt.NDArray[np.object_], recent: npt.NDArray[np.object_]) -> None:
        super().__init__(keys)
        self._recent = recent

    async def recent(self, session: AsyncSession, mask: Mask) -> list[RecentDays | None]:
        """The recent days of the customers ``mask`` selects, in position order."""
        return [_recent_days(r) for r in self._recent[mask].tolist()]


def _recent_days(stored: str | None) -> RecentDays | None:
    return None if stored in (None, "null") else RecentDays.from_json(json.loads(stored))


def _positional(path: Path, column: str, mask: Mask, excluded: Sequence[str] = ()) -> list[Any]:
    """``column`` of the snapshot's rows that ``mask`` selects, in file order, leaving out
    the customers ``excluded``."""
    if not mask.any():
        return []
    query = f"SELECT {column} FROM read_parquet($path) POSITIONAL JOIN selected WHERE selected"
    with duckdb.connect() as con:
        con.register("selected", pd.DataFrame({"selected": mask}))
        if excluded:
            con.register("excluded", pd.DataFrame({"key": list(excluded)}))
            query += " AND customer_key NOT IN (SELECT key FROM excluded)"
        rows = con.execute(query, {"path": str(path)}).fetchall()
    return [value for (value,) in rows]


@dataclass
class Population:
    """Every customer with features, and the columns a rule needs, aligned by position."""

    keys: Keys
    features: dict[str, Column]
    events: dict[tuple[str, str], Column]
    scores: dict[str, Column]


@dataclass
class _Read:
    """Stored columns as read, before they are made true on the evaluation day."""

    keys: Keys
    features: dict[str, Column]
    days: Column | None  # each row's as_of as days since 1970-01-01
    has_recent: Mask | None = None  # which rows store recent days (None: ask for each)


def _needs(definition: CohortDefinition) -> tuple[list[str], list[str], bool]:
    """The stored features a rule reads, its models, and whether it needs each as_of."""
    comparisons = leaves(definition.rule)
    names = sorted({c.feature for c in comparisons if isinstance(c, FeatureRule)})
    models = sorted({c.score for c in comparisons if isinstance(c, ScoreRule)})
    if models:
        names = sorted(set(names) | set(FEATURE_NAMES))
    if WINDOWS.keys() & set(names):
        names = sorted(set(names) | WINDOWS.keys())  # ``windowed`` reads them together
    return names, models, any(aged(n) or n in WINDOWS for n in names)


async def _read_rows(
    session: AsyncSession, names: list[str], dated: bool, only: Sequence[str]
) -> _Read:
    """The named features of these customers from the operational copy."""
    columns: list[ColumnElement[Any]] = [CustomerFeatures.features[n].as_float() for n in names]
    if dated:
        columns.append(epoch_day(session, CustomerFeatures.as_of))
    query = select(CustomerFeatures.customer_key, *columns).order_by(CustomerFeatures.customer_key)
    rows: list[Any] = []
    for chunk in chunked(sorted(set(only)), rows_per_statement(session, 1)):
        found = await session.execute(query.where(CustomerFeatures.customer_key.in_(chunk)))
        rows.extend(found.all())
    # Column-wise from here: one C-level conversion per column, None becoming NaN.
    transposed = list(zip(*rows, strict=True)) if rows else [() for _ in range(len(columns) + 1)]
    features = {
        name: np.array(transposed[i], dtype=np.float64) for i, name in enumerate(names, start=1)
    }
    days = np.floor(np.array(transposed[-1], dtype=np.float64) + 1e-9) if dated else None
    return _Read(Keys(np.array(transposed[0], dtype=object)), features, days)


def _columns(snapshot: Snapshot, names: list[str]) -> list[str]:
    """The named features as the snapshot's columns ``c0``, ``c1``, ... (NULL if absent)."""
    return [
        f"{snapshot.columns[n]} AS c{i}" if n in snapshot.columns else f"NULL::DOUBLE AS c{i}"
        for i, n in enumerate(names)
    ]


def _read_snapshot(snapshot: Snapshot, names: list[str], dated: bool, windows: bool) -> _Read:
    """The named feature columns of every customer in the snapshot (blocking: DuckDB)."""
    wanted = _columns(snapshot, names)
    if dated:
        wanted.append("as_of_day")
    if windows:
        wanted.append("has_recent")
    with duckdb.connect() as con:
        found = con.execute(
            f"SELECT {', '.join(wanted) or 'NULL AS none'} FROM read_parquet($path)",
            {"path": str(snapshot.path)},
        ).fetchnumpy()
    features = {name: _floats(found[f"c{i}"]) for i, name in enumerate(names)}
    days = _floats(found["as_of_day"]) if dated else None
    has_recent = np.asarray(found["has_recent"], dtype=bool) if windows else None
    return _Read(Keys(np.empty(0, dtype=object)), features, days, has_recent)


def _floats(values: Any) -> Column:
    # DuckDB hands a column with NULLs back masked; a missing value is NaN here.
    return np.ma.filled(np.ma.asarray(values).astype(np.float64), np.nan)


async def _read_all(session: AsyncSession, directory: Path, names: list[str], dated: bool) -> _Read:
    """Every customer's named features: the snapshot's rows, then the current rows of the
    customers changed since it (none for one whose features were deleted)."""
    # Changes before the snapshot's id: a snapshot registered in between covers them.
    changed = await changed_keys(session)
    snapshot = await registered(session, directory)
    if snapshot is None:
        raise LookupError("no snapshot")
    windows = bool(WINDOWS.keys() & set(names))
    stored = await asyncio.to_thread(_read_snapshot, snapshot, names, dated, windows)
    delta = await _read_rows(session, names, dated, changed)
    # The snapshot's rows of changed customers stay, evaluated but never returned as keys.
    features = {n: np.concatenate([stored.features[n], delta.features[n]]) for n in names}
    days = None
    if stored.days is not None and delta.days is not None:
        days = np.concatenate([stored.days, delta.days])
    has_recent = None
    if stored.has_recent is not None:
        has_recent = np.concatenate([stored.has_recent, np.ones(len(delta.keys), dtype=bool)])
    keys = SnapshotKeys(snapshot.path, snapshot.customers, delta.keys, changed)
    return _Read(keys, features, days, has_recent)


async def _fresh_snapshot(db: Database, directory: Path) -> None:
    """Take a snapshot when there is none here or too many customers changed since."""
    async with db.read_transaction() as session:
        snapshot = await registered(session, directory)
        changes = await session.scalar(select(func.count()).select_from(FeatureChange))
    if snapshot is None or int(changes or 0) > max(RETAKE_AFTER, snapshot.customers // 100):
        await take(db, directory)


async def load_population(
    db: Database,
    definition: CohortDefinition,
    now: datetime,
    score: ScoreFn | None = None,
    only: Sequence[str] | None = None,
    *,
    snapshots: Path | None = None,
) -> Population:
    """Read what ``definition``'s rule needs for every customer with features, from the
    snapshot in ``snapshots`` and the rows changed since (only those of ``only`` when
    given, from the operational copy: the incremental path)."""
    directory = snapshots or default_directory(db.url)

    async def read(session: AsyncSession) -> Population:
        return await _population(session, directory, definition, now, score, only)

    return await _reading(db, directory, read, fresh=only is None)


async def _reading(
    db: Database,
    directory: Path,
    read: Callable[[AsyncSession], Awaitable[_T]],
    *,
    fresh: bool,
) -> _T:
    """``read`` in a read transaction, after taking a snapshot if one is due (``fresh``)."""
    for _ in range(3):  # a snapshot replaced between two reads is read again
        if fresh:
            await _fresh_snapshot(db, directory)
        async with db.read_transaction() as session:
            try:
                return await read(session)
            except (LookupError, duckdb.IOException):
                continue
    raise RuntimeError("the feature snapshot kept changing while being read")


async def _population(
    session: AsyncSession,
    directory: Path,
    definition: CohortDefinition,
    now: datetime,
    score: ScoreFn | None,
    only: Sequence[str] | None,
) -> Population:
    names, models, dated = _needs(definition)
    if only is None:
        read = await _read_all(session, directory, names, dated)
    else:
        read = await _read_rows(session, names, dated, only)
    return await _populated(session, definition, read, names, models, now, score, only is not None)


async def _populated(
    session: AsyncSession,
    definition: CohortDefinition,
    read: _Read,
    names: list[str],
    models: list[str],
    now: datetime,
    score: ScoreFn | None,
    bounded: bool,
) -> Population:
    """The population of ``read``'s customers, its features made true on ``now``'s day and
    the events and scores the rule compares counted and computed (``bounded``: for these
    customers only, not for everyone)."""
    features = read.features
    if read.days is not None:
        # Whole days from each row's as_of (a UTC midnight) to the evaluation day.
        elapsed = float((utc(now).date() - EPOCH_DATE).days) - read.days
        for name in names:
            if aged(name):
                features[name] = features[name] + elapsed
        if WINDOWS.keys() & set(names):
            await _rewindow(session, read, elapsed, utc(now).date())
    events = await _count_events(session, definition, now, read.keys, bounded)
    scores: dict[str, Column] = {}
    for model in models:
        if score is None:
            raise ValueError(f"the rule uses score {model!r} but no scorer is configured")
        scores[model] = score(model, features) if len(read.keys) else np.zeros(0)
    return Population(read.keys, features, events, scores)


async def _count_events(
    session: AsyncSession, definition: CohortDefinition, now: datetime, keys: Keys, only: bool
) -> dict[tuple[str, str], Column]:
    """Each event rule's count per customer, counted in SQL."""
    events: dict[tuple[str, str], Column] = {}
    rules = [r for r in leaves(definition.rule) if isinstance(r, EventRule)]
    if not rules:
        return events
    position = {key: i for i, key in enumerate(keys.tolist())}
    for rule in rules:
        if (rule.event, rule.within) in events:
            continue
        counts = np.zeros(len(keys), dtype=np.float64)
        start = utc(now) - parse_duration(rule.within)
        counted = (
            select(Event.customer_key, func.count())
            .where(Event.event == rule.event, Event.occurred_at > start)
            .where(Event.occurred_at <= utc(now), Event.type == "track")
            .group_by(Event.customer_key)
        )
        if only:
            counted = counted.where(Event.customer_key.in_(sorted(position)))
        for key, count in await session.execute(counted):
            at_position = position.get(key)
            if at_position is not None:
                counts[at_position] = count
        events[(rule.event, rule.within)] = counts
    return events


async def _rewindow(session: AsyncSession, read: _Read, elapsed: Column, day: date) -> None:
    """Move the windowed columns to the windows ending ``day`` (see the module's doc)."""
    features = read.features
    for name, window in WINDOWS.items():
        passed = (elapsed >= window) & ~np.isnan(features[name])
        features[name] = np.where(passed, 0.0, features[name])
    moving = (elapsed > 0) & (elapsed < max(WINDOWS.values()))
    if read.has_recent is not None:
        moving &= read.has_recent  # without recent days the stored counts stay
    if not moving.any():
        return
    for i, days in zip(
        np.flatnonzero(moving), await read.keys.recent(session, moving), strict=True
    ):
        stored = {n: None if np.isnan(v := features[n][i]) else float(v) for n in WINDOWS}
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
    *,
    snapshots: Path | None = None,
) -> set[str]:
    """The customer keys the cohort holds at ``now`` (of ``keys`` only, when given), reading
    the feature snapshot in ``snapshots`` (see :func:`load_population`)."""
    if keys is None and compiled.compilable(definition.rule):
        directory = snapshots or default_directory(db.url)

        async def read(session: AsyncSession) -> set[str]:
            return await _compiled_members(session, directory, definition, utc(now))

        return await _reading(db, directory, read, fresh=True)
    population = await load_population(db, definition, utc(now), score, keys, snapshots=snapshots)
    mask = apply_rule(definition.rule, population)
    return set(population.keys.where(mask))


async def _compiled_members(
    session: AsyncSession, directory: Path, definition: CohortDefinition, now: datetime
) -> set[str]:
    """Every member of a rule over stored features only: the snapshot's rows by one DuckDB
    query (``cohorts.compiled``); the customers changed since it and the rows whose windows
    must be re-counted through the numpy interpreter, as the incremental path does."""
    changed = await changed_keys(session)
    snapshot = await registered(session, directory)
    if snapshot is None:
        raise LookupError("no snapshot")
    names, _, dated = _needs(definition)
    today = (now.date() - EPOCH_DATE).days
    members, moving = await asyncio.to_thread(
        _query_snapshot, snapshot, definition.rule, names, today, changed
    )
    delta = await _read_rows(session, names, dated, changed)
    for read in (moving, delta):
        if read is not None and len(read.keys):
            population = await _populated(session, definition, read, names, [], now, None, True)
            members.update(read.keys.where(apply_rule(definition.rule, population)))
    return members


def _query_snapshot(
    snapshot: Snapshot, rule: Rule, names: list[str], today: int, changed: Sequence[str]
) -> tuple[set[str], _Read | None]:
    """The snapshot's members but the ``changed`` customers', and, when the rule names a
    windowed feature, the rows to re-count from their recent days (blocking: DuckDB)."""
    where = compiled.condition(rule, snapshot.columns, today)
    kept = "customer_key NOT IN (SELECT key FROM changed)" if changed else "true"
    windows = bool(WINDOWS.keys() & set(names))
    with duckdb.connect() as con:
        if changed:
            con.register("changed", pd.DataFrame({"key": list(changed)}))
        query = f"SELECT customer_key FROM read_parquet($path) WHERE {where.sql} AND {kept}"
        if windows:
            query += f" AND NOT {compiled.MOVING}"
        found = con.execute(query, {"path": str(snapshot.path), **where.params}).fetchnumpy()
        members = set(found["customer_key"].tolist())
        if not windows:
            return members, None
        rows = con.execute(
            f"SELECT customer_key, as_of_day, recent, {', '.join(_columns(snapshot, names))}"
            f" FROM read_parquet($path) WHERE {compiled.MOVING} AND {kept}",
            {"path": str(snapshot.path), "today": today},
        ).fetchnumpy()
    keys = HeldKeys(np.asarray(rows["customer_key"], dtype=object), np.asarray(rows["recent"]))
    features = {name: _floats(rows[f"c{i}"]) for i, name in enumerate(names)}
    return members, _Read(keys, features, _floats(rows["as_of_day"]))


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
    *,
    snapshots: Path | None = None,
) -> Evaluation:
    """Compute membership and store the difference as entered/exited transitions; with
    ``keys``, for those customers only (the others keep their membership).

    Evaluating again with nothing changed stores nothing.
    """
    at = utc(now) if now is not None else datetime.now(UTC)
    members = await membership(db, definition, at, score, keys, snapshots=snapshots)
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
