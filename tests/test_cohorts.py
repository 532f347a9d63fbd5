"""Cohort rules, evaluation and membership transitions, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from cohortflow.cohorts.evaluator import evaluate, membership
from cohortflow.cohorts.rules import CohortError, parse_cohort
from cohortflow.events.ingest import Ingestor
from cohortflow.storage import cohorts
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CohortTransition
from tests.test_events import PSEUDONYMISER, track

T0 = datetime(2026, 1, 10, 12, tzinfo=UTC)


def cohort(rule: dict[str, Any], cohort_id: str = "test_cohort") -> dict[str, Any]:
    """A cohort document with this rule."""
    return {"cohort_id": cohort_id, "name": "Test", "rule": rule}


def key(user: str) -> str:
    """The customer key of a raw user id."""
    return PSEUDONYMISER.customer_key(user)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"feature": "nope", "op": ">", "value": 1}, "rule.feature: unknown feature 'nope'"),
        ({"all": [{"feature": "frequency", "op": "=~", "value": 1}]}, "rule.all[0].op: Input"),
        ({"any": []}, "rule.any: List should have at least 1 item"),
        ({"not": {"score": "churn", "op": ">", "value": 3}}, "rule.not.value: Input should be"),
        ({"event": "purchase", "within": "P3X"}, "rule.within: 'P3X' is not an ISO-8601"),
        ({"feature": "frequency", "score": "churn", "op": ">", "value": 1}, "rule: a rule has"),
        ({"feature": "__import__('os')", "op": ">", "value": 1}, "rule.feature: unknown"),
    ],
)
def test_bad_rules_name_their_path(rule: dict[str, Any], problem: str) -> None:
    with pytest.raises(CohortError) as caught:
        parse_cohort(cohort(rule))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_unknown_top_level_field_is_refused() -> None:
    with pytest.raises(CohortError) as caught:
        parse_cohort(cohort({"feature": "frequency", "op": ">", "value": 1}) | {"where": "1=1"})
    assert caught.value.problems == ["where: Extra inputs are not permitted"]


async def _ingest(db: Database, events: list[dict[str, Any]]) -> None:
    outcome = await Ingestor(db, PSEUDONYMISER).ingest(events)
    assert outcome.count("rejected") == 0


async def _population(db: Database) -> None:
    # big: two purchases, 300 spent; small: one purchase of 20; browser: page views only.
    await _ingest(
        db,
        [
            track("b1", "big", at=T0, amount=100.0),
            track("b2", "big", at=T0 + timedelta(days=5), amount=200.0),
            track("s1", "small", at=T0 + timedelta(days=5), amount=20.0),
            track("v1", "browser", event="page_view", at=T0 + timedelta(days=5)),
            track("v2", "browser", event="page_view", at=T0 + timedelta(days=6)),
        ],
    )


async def test_rules_select_by_features_windows_and_logic(db: Database) -> None:
    await _population(db)
    now = T0 + timedelta(days=20)

    async def members(rule: dict[str, Any]) -> set[str]:
        return await membership(db, parse_cohort(cohort(rule)), now)

    assert await members({"feature": "monetary_total", "op": ">=", "value": 100}) == {key("big")}
    # A missing value (no purchase) satisfies no comparison, not even "!=".
    assert await members({"feature": "monetary_total", "op": "!=", "value": 5}) == {
        key("big"),
        key("small"),
    }
    assert await members({"not": {"feature": "monetary_total", "op": ">=", "value": 100}}) == {
        key("small"),
        key("browser"),
    }
    assert await members(
        {
            "any": [
                {"feature": "frequency", "op": ">=", "value": 1},
                {"feature": "count:page_view", "op": ">=", "value": 2},
            ]
        }
    ) == {key("big"), key("browser")}
    # Recency is aged to the evaluation time: the last purchases were 15 days before now.
    assert await members({"feature": "recency_days", "op": "==", "value": 15}) == {
        key("big"),
        key("small"),
    }
    assert await members({"feature": "days_since:page_view", "op": "<", "value": 15}) == {
        key("browser")
    }
    # Event windows count in the window ending now: nothing in the last 10 days.
    assert await members({"event": "purchase", "within": "P10D", "op": "==", "count": 0}) == {
        key("big"),
        key("small"),
        key("browser"),
    }
    # The window is (now - within, now]: a purchase exactly 20 days ago is outside P20D.
    assert await members({"event": "purchase", "within": "P20D", "count": 2}) == set()
    assert await members({"event": "purchase", "within": "P21D", "count": 2}) == {key("big")}


async def test_evaluation_stores_entries_and_exits_once(db: Database) -> None:
    await _population(db)
    definition = parse_cohort(cohort({"feature": "monetary_total", "op": ">=", "value": 50}))
    async with db.transaction() as session:
        await cohorts.save_cohort(session, definition.cohort_id, definition.model_dump())
    first = await evaluate(db, definition, T0 + timedelta(days=7))
    assert first.diff.entered == [key("big")]
    assert first.diff.exited == []
    assert first.diff.first_seq is not None and first.diff.first_seq == first.diff.last_seq

    # Evaluating again with nothing changed emits nothing.
    again = await evaluate(db, definition, T0 + timedelta(days=8))
    assert (again.diff.entered, again.diff.exited, again.diff.members) == ([], [], 1)

    # "small" spends 80 more: enters. A stricter rule later makes "big" leave.
    await _ingest(db, [track("s2", "small", at=T0 + timedelta(days=9), amount=80.0)])
    third = await evaluate(db, definition, T0 + timedelta(days=9))
    assert third.diff.entered == [key("small")]
    stricter = parse_cohort(cohort({"feature": "recency_days", "op": "<", "value": 2}))
    fourth = await evaluate(db, stricter, T0 + timedelta(days=10))
    assert (fourth.diff.entered, fourth.diff.exited) == ([], [key("big")])

    async with db.transaction() as session:
        assert await cohorts.member_keys(session, "test_cohort") == {key("small")}
        kinds = [
            (t.kind, t.customer_key)
            for t in await session.scalars(select(CohortTransition).order_by(CohortTransition.seq))
        ]
        history = await cohorts.history(session, key("big"))
        last_entered = await cohorts.last_transition_seq(session, "test_cohort", cohorts.ENTERED)
        last_exited = await cohorts.last_transition_seq(session, "test_cohort", cohorts.EXITED)
        no_cohort = await cohorts.last_transition_seq(session, "no_cohort", cohorts.ENTERED)
    assert kinds == [("entered", key("big")), ("entered", key("small")), ("exited", key("big"))]
    assert (last_entered, last_exited) == (third.diff.last_seq, fourth.diff.last_seq)
    assert no_cohort is None
    assert [t.at for t in history] == [T0 + timedelta(days=7), T0 + timedelta(days=10)]


async def test_membership_matches_a_numpy_reference_on_random_customers(db: Database) -> None:
    rng = np.random.default_rng(3)
    events = []
    for i in range(300):
        for j in range(int(rng.integers(1, 5))):
            events.append(
                track(
                    f"e{i}-{j}",
                    f"u{i}",
                    at=T0 + timedelta(days=int(rng.integers(0, 60))),
                    amount=float(rng.integers(1, 200)),
                )
            )
    for start in range(0, len(events), 200):
        await _ingest(db, events[start : start + 200])
    rule = {
        "all": [
            {"feature": "monetary_total", "op": ">", "value": 150},
            {"not": {"feature": "frequency", "op": "<", "value": 1}},
        ]
    }
    got = await membership(db, parse_cohort(cohort(rule)), T0 + timedelta(days=90))
    totals: dict[str, float] = {}
    days: dict[str, set[str]] = {}
    for e in events:
        totals[e["userId"]] = totals.get(e["userId"], 0.0) + e["properties"]["amount"]
        days.setdefault(e["userId"], set()).add(e["timestamp"][:10])
    expected = {key(u) for u, total in totals.items() if total > 150 and len(days[u]) >= 2}
    assert got == expected
    assert 0 < len(expected) < 300


async def test_saving_a_cohort_versions_only_changes(db: Database) -> None:
    document = cohort({"feature": "frequency", "op": ">", "value": 1})
    async with db.transaction() as session:
        assert await cohorts.save_cohort(session, "c", document) == (1, True)
        assert await cohorts.save_cohort(session, "c", dict(reversed(document.items()))) == (
            1,
            False,
        )
        changed = cohort({"feature": "frequency", "op": ">", "value": 2})
        assert await cohorts.save_cohort(session, "c", changed) == (2, True)
        assert (await session.scalar(select(func.count()).select_from(CohortTransition))) == 0
