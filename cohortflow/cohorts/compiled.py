"""A cohort rule as one DuckDB condition over the feature snapshot's columns.

A full evaluation of a rule over stored features only (no model score, no event count)
runs as one query: DuckDB reads the columns the rule names, makes them true on the
evaluation day and tests the rule, without handing a column to Python; only the members'
keys come back. The condition is generated, never written from the rule's text: column
names come from the snapshot's own mapping (``f0``, ``f1``, ...) and every value is a bound
parameter. Its meaning is the numpy interpreter's (``evaluator.apply_rule``): a comparison
with a missing value is false and ``not`` negates; day counters are aged from each row's
``as_of_day``, and a windowed count whose window has passed is zero. A row whose window has
only partly moved and whose recent days are stored (:data:`MOVING`) is left to the numpy
path, which re-counts it from those days.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cohortflow.cohorts.rules import AllRule, AnyRule, FeatureRule, NotRule, Rule, leaves
from cohortflow.events.features import WINDOWS, aged

_SQL_OPS = {"<": "<", "<=": "<=", "==": "=", "!=": "<>", ">=": ">=", ">": ">"}
# Whole days from a row's as_of to the evaluation day (``$today``, days since 1970-01-01).
ELAPSED = "($today::INTEGER - as_of_day)"
# Rows a windowed feature must be re-counted for from their recent days.
MOVING = f"(has_recent AND {ELAPSED} > 0 AND {ELAPSED} < {max(WINDOWS.values())})"


@dataclass
class Condition:
    """A generated SQL condition and the values it binds."""

    sql: str
    params: dict[str, float | int] = field(default_factory=dict)


def compilable(rule: Rule) -> bool:
    """Whether the rule compares stored features only (no score, no event count)."""
    return all(isinstance(leaf, FeatureRule) for leaf in leaves(rule))


def condition(rule: Rule, columns: Mapping[str, str], today: int) -> Condition:
    """The rule on day ``today`` (days since 1970-01-01) as a condition over a snapshot
    whose feature ``name`` is in column ``columns[name]`` (one it lacks is missing)."""
    compiled = Condition("")
    compiled.sql = _walk(rule, columns, compiled.params)
    if ELAPSED in compiled.sql:  # DuckDB refuses a parameter the query does not use
        compiled.params["today"] = today
    return compiled


def _walk(rule: Rule, columns: Mapping[str, str], params: dict[str, float | int]) -> str:
    if isinstance(rule, AllRule):
        return "(" + " AND ".join(_walk(sub, columns, params) for sub in rule.all) + ")"
    if isinstance(rule, AnyRule):
        return "(" + " OR ".join(_walk(sub, columns, params) for sub in rule.any) + ")"
    if isinstance(rule, NotRule):
        return f"(NOT {_walk(rule.not_, columns, params)})"
    if not isinstance(rule, FeatureRule):
        raise ValueError(f"only feature comparisons compile, not {type(rule).__name__}")
    name = f"v{len(params)}"
    params[name] = float(rule.value)
    value = feature(rule.feature, columns)
    # NaN is missing too, as in numpy, where DuckDB would order it above every number.
    return f"coalesce(NOT isnan({value}) AND {value} {_SQL_OPS[rule.op]} ${name}::DOUBLE, false)"


def feature(name: str, columns: Mapping[str, str]) -> str:
    """The feature's value on the evaluation day, as an expression over the snapshot."""
    stored = f'"{columns[name]}"' if name in columns else "NULL::DOUBLE"
    if aged(name):
        return f"({stored} + {ELAPSED})"
    if name in WINDOWS:
        passed = f"{ELAPSED} >= {WINDOWS[name]} AND NOT isnan({stored})"
        return f"(CASE WHEN {passed} THEN 0.0 ELSE {stored} END)"
    return stored
