"""Features true on the day they are used: one function (``features_as_of``) ages day counts
and re-windows windowed counts, and the feature store, the cohort evaluator (its rules on
features and on every registered model's score), the campaign's score step and a fresh
training snapshot agree on a customer whose last event is 300 days old, and on customers
whose windows have only partly moved."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from cohortflow.cohorts.evaluator import load_population, membership, model_scores
from cohortflow.cohorts.rules import CohortDefinition
from cohortflow.events.features import FeatureEvent, RecentDays, compute_features, features_as_of
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from cohortflow.storage.events import EventRecord, insert_events
from cohortflow.storage.feature_store import update_features
from cohortflow.storage.tables import AuditRow, CustomerFeatures
from scoring.features import FEATURE_NAMES, rfm_features
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from tests.harness import Harness, spec_document, wait_for_state
from workflows.campaign.contract import CampaignState

TODAY = datetime.now(UTC).date()
NOW = datetime.combine(TODAY, time(12), tzinfo=UTC)

# Per profile: purchases as (days ago, amount, items) and page views (days ago).
PROFILES: dict[str, tuple[list[tuple[int, float, int]], list[int]]] = {
    # Last seen 300 days ago: every window has passed, recency and age have grown 300 days.
    "stale": ([(700, 40.0, 2), (500, 25.0, 1), (320, 60.0, 3), (300, 15.0, 1)], [300, 310]),
    # Last seen 25 days ago: the 90-day and 30-day windows have partly moved past its days.
    "moving": ([(200, 30.0, 1), (100, 20.0, 1), (75, 45.0, 2), (40, 10.0, 1)], [45, 35, 25]),
    # Seen today: nothing moves.
    "fresh": ([(60, 12.0, 1), (10, 18.0, 2), (0, 22.0, 1)], [3, 0]),
    # Browsed only: no purchase, so the RFM features are missing, events_30d is not.
    "browser": ([], [50, 20, 12]),
}


def at_noon(days_ago: int) -> datetime:
    return NOW - timedelta(days=days_ago)


def records(key: str, profile: str) -> list[EventRecord]:
    bought, viewed = PROFILES[profile]
    found = [
        EventRecord(
            f"{key}-p{i}", key, "track", "purchase", at_noon(ago), {"amount": a, "quantity": q}
        )
        for i, (ago, a, q) in enumerate(bought)
    ]
    found += [
        EventRecord(f"{key}-v{i}", key, "track", "page_view", at_noon(ago), {})
        for i, ago in enumerate(viewed)
    ]
    return found


def snapshot(profile: str) -> dict[str, float | None]:
    """A fresh training snapshot: ``rfm_features`` over the purchases, as of today, with
    the 30-day event count beside it."""
    bought, viewed = PROFILES[profile]
    events_30d = float(sum(1 for ago in [b[0] for b in bought] + viewed if ago < 30))
    if not bought:
        return dict.fromkeys(FEATURE_NAMES) | {"events_30d": events_30d}
    frame = pd.DataFrame(
        {
            "customer_id": ["x"] * len(bought),
            "date": pd.to_datetime([at_noon(ago).date() for ago, _, _ in bought]),
            "cds": [float(q) for _, _, q in bought],
            "amount": [a for _, a, _ in bought],
        }
    )
    row = rfm_features(frame, TODAY).iloc[0]
    values = {n: None if math.isnan(v) else float(v) for n, v in row.items()}
    return values | {"events_30d": events_30d}


def same(got: dict[str, Any], expected: dict[str, float | None]) -> list[str]:
    """The names whose values differ (None and NaN are the same missing value)."""
    differ = []
    for name, want in expected.items():
        have = got.get(name)
        have = None if have is None or (isinstance(have, float) and math.isnan(have)) else have
        if (have is None) != (want is None) or (
            want is not None and not math.isclose(float(have), want, abs_tol=1e-6)
        ):
            differ.append(f"{name}: {have} != {want}")
    return differ


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_features_as_of_today_equal_a_fresh_training_snapshot(profile: str) -> None:
    events = [
        FeatureEvent(r.type, r.event, r.occurred_at, r.properties) for r in records("k", profile)
    ]
    computed = compute_features(events)
    stored = RecentDays.from_json(json.loads(json.dumps(computed.recent.to_json())))
    today = features_as_of(computed.features, computed.as_of, stored, TODAY)
    assert same(today, snapshot(profile)) == []
    if profile == "stale":  # as stored, the customer still looked recently active
        assert computed.features["recency_days"] == 0.0
        assert today["recency_days"] == 300.0 and today["purchases_90d"] == 0.0


def test_features_are_never_read_before_the_day_they_describe() -> None:
    computed = compute_features(
        FeatureEvent(r.type, r.event, r.occurred_at, r.properties) for r in records("k", "fresh")
    )
    with pytest.raises(ValueError, match="cannot be read as of the earlier"):
        features_as_of(computed.features, computed.as_of, None, TODAY - timedelta(days=1))


async def stored_profiles(db: Database) -> dict[str, str]:
    """One customer per profile, their events stored and features computed from them, plus
    one whose features were stored 40 days ago without recent days (a row from before they
    were kept): by key."""
    keys = {profile: f"c_{profile}" for profile in PROFILES}
    async with db.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(k, f"src-{k}", None) for k in keys.values()]
        )
        await insert_events(session, [r for p, k in keys.items() for r in records(k, p)])
        await update_features(session, list(keys.values()))
        legacy = "c_legacy"
        await customers.upsert_customers(session, [customers.CustomerRecord(legacy, "s", None)])
        old = datetime.combine(TODAY - timedelta(days=40), time(), tzinfo=UTC)
        legacy_features = dict(snapshot("moving")) | {"recency_days": 5.0, "purchases_90d": 3.0}
        await customers.upsert_features(session, [(legacy, legacy_features, old)])
    return keys | {"legacy": legacy}


def legacy_expected() -> dict[str, float | None]:
    # Aged by 40 days; its 90-day window has only partly moved and no recent days say how
    # far: the stored count stands. Its 30-day window has passed: zero.
    return dict(snapshot("moving")) | {
        "recency_days": 45.0,
        "age_days": snapshot("moving")["age_days"] + 40,  # type: ignore[operator]
        "purchases_90d": 3.0,
        "events_30d": 0.0,
    }


async def test_the_store_and_the_evaluator_read_the_same_features_as_of_today(
    db: Database,
) -> None:
    keys = await stored_profiles(db)
    rule = {"all": [{"feature": n, "op": ">=", "value": 0} for n in (*FEATURE_NAMES, "events_30d")]}
    definition = CohortDefinition.model_validate({"cohort_id": "c", "name": "all", "rule": rule})
    async with db.transaction() as session:
        read = await customers.get_features(session, list(keys.values()), NOW)
    population = await load_population(db, definition, NOW)
    position = {k: i for i, k in enumerate(population.keys.tolist())}
    for profile, key in keys.items():
        expected = legacy_expected() if profile == "legacy" else snapshot(profile)
        assert same(read[key], expected) == [], profile
        column_values = {n: population.features[n][position[key]] for n in expected}
        assert same(column_values, expected) == [], profile


async def test_the_score_steps_point_read_reads_what_a_session_reads(db: Database) -> None:
    keys = await stored_profiles(db)
    wanted = [*keys.values(), "nobody"]
    async with db.read_transaction() as session:
        through_session = await customers.get_features(session, wanted, NOW)
    # On a SQLite file the step's read bypasses the session; PostgreSQL reads through one.
    assert (db.point_read("SELECT 1", []) is not None) == (db.dialect == "sqlite")
    assert await customers.read_features(db, wanted, NOW) == through_session
    assert set(through_session) == set(keys.values())


@pytest.fixture
def scorer(registry_root: Path) -> Scorer:
    return Scorer(ModelRegistry(registry_root))


def models(registry_root: Path) -> Iterator[str]:
    yield from sorted({info.name for info in ModelRegistry(registry_root).list()})


async def test_a_cohort_rule_on_every_registered_models_score_works(
    db: Database, scorer: Scorer, registry_root: Path
) -> None:
    keys = await stored_profiles(db)
    names = list(models(registry_root))
    assert names, "the test registry holds no model"
    for model in names:
        rule = {"score": model, "op": ">=", "value": 0.0}
        definition = CohortDefinition.model_validate({"cohort_id": "s", "name": "s", "rule": rule})
        members = await membership(db, definition, NOW, model_scores(scorer))
        population = await load_population(db, definition, NOW, model_scores(scorer))
        async with db.transaction() as session:
            read = await customers.get_features(session, list(keys.values()), NOW)
        # Everyone with features has a score: the browser's missing RFM features included.
        assert members == set(keys.values()), model
        direct = scorer.score(model, [read[k] for k in keys.values()], top_k=0).scores
        position = {k: i for i, k in enumerate(population.keys.tolist())}
        evaluated = [population.scores[model][position[k]] for k in keys.values()]
        assert np.allclose(evaluated, direct, atol=1e-6), model


async def test_the_campaign_the_cohort_and_a_training_snapshot_score_alike(
    harness: Harness, scorer: Scorer
) -> None:
    keys = await stored_profiles(harness.db)
    stale = keys["stale"]
    spec, version = await harness.apply(spec_document())
    rule = {"score": "churn", "op": ">=", "value": 0.0}
    definition = CohortDefinition.model_validate({"cohort_id": "s", "name": "s", "rule": rule})
    async with harness.workers():
        handle = await harness.launch(spec, version, stale)
        await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        await handle.cancel()
    async with harness.db.transaction() as session:
        payload = await session.scalar(
            select(AuditRow.payload).where(
                AuditRow.workflow_id == handle.id, AuditRow.kind == "scored"
            )
        )
    population = await load_population(harness.db, definition, NOW, model_scores(scorer))
    assert payload is not None
    scored = json.loads(payload)
    day = date.fromisoformat(scored["features_as_of"])
    assert day in (TODAY, TODAY + timedelta(days=1))  # the test may straddle midnight
    in_campaign = scored["scores"]["churn"]
    in_cohort = population.scores["churn"][population.keys.tolist().index(stale)]
    trained_on = scorer.score("churn", [snapshot("stale")], top_k=0).scores[0]
    assert math.isclose(in_campaign, in_cohort, abs_tol=1e-6)
    assert math.isclose(in_campaign, trained_on, abs_tol=1e-6)
    # As stored (as of its last event) the customer scored otherwise: the ageing mattered.
    async with harness.db.transaction() as session:
        row = await session.get(CustomerFeatures, stale)
    assert row is not None
    as_stored = scorer.score("churn", [row.features], top_k=0).scores[0]
    assert not math.isclose(in_campaign, as_stored, abs_tol=1e-3)
