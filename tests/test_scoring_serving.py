"""The campaign's score step with a champion and a challenger: shadow scores are audited only."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.campaign.scoring import ScoringActivities
from cohortflow.storage import audit, customers
from cohortflow.storage.db import Database, migrate
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, rfm_features
from scoring.registry import ModelInfo, ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, TrainedModel, train_model
from workflows.campaign.activity_io import ScoreInput

KEYS = [f"c_{i:038d}" for i in range(5)]


@pytest.fixture(scope="module")
def trained() -> tuple[TrainedModel, TrainedModel]:
    """A champion and a different challenger (another seed), quickly trained."""
    transactions = load_transactions()
    config = TrainConfig(n_estimators=40, bootstrap_resamples=0)
    return (
        train_model(transactions, config),
        train_model(transactions, dataclasses.replace(config, seed=7, max_depth=2)),
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    await migrate(url)
    database = Database(url)
    features = rfm_features(load_transactions(), date(1998, 6, 30)).head(len(KEYS))
    rows = [
        {k: None if pd.isna(v) else float(v) for k, v in r.items()}
        for r in features.loc[:, list(FEATURE_NAMES)].to_dict("records")
    ]
    as_of = datetime(1998, 6, 30, tzinfo=UTC)
    async with database.transaction() as session:
        await customers.upsert_customers(
            session, [customers.CustomerRecord(k, f"src{i}", None) for i, k in enumerate(KEYS)]
        )
        await customers.upsert_features(
            session, [(k, r, as_of) for k, r in zip(KEYS, rows, strict=True)]
        )
    yield database
    await database.dispose()


def registry_with(
    root: Path, trained: tuple[TrainedModel, TrainedModel], challenger: bool
) -> tuple[ModelRegistry, ModelInfo, ModelInfo]:
    registry = ModelRegistry(root)
    champion = registry.register(trained[0], promoted_by="alice")
    other = registry.register(trained[1], make_champion=False)
    if challenger:
        registry.set_challenger("churn", other.version, by="bob")
    return registry, champion, other


async def score(
    db: Database, registry: ModelRegistry, workflow_id: str, keys: list[str] = KEYS[:1]
) -> tuple[Any, dict[str, Any]]:
    activities = ScoringActivities(db, Scorer(registry))
    inp = ScoreInput(workflow_id, "score", "camp", keys, ["churn"])
    result = await ActivityEnvironment().run(activities.score_customer, inp)
    async with db.transaction() as session:
        rows = await audit.audit_for_workflow(session, workflow_id)
    # Payloads are stored as the canonical JSON the chain hashes.
    return result, {
        row.customer_key: json.loads(row.payload) for row in rows if row.kind == "scored"
    }


async def test_challenger_scores_in_shadow_never_in_the_result(
    db: Database, tmp_path: Path, trained: tuple[TrainedModel, TrainedModel]
) -> None:
    registry, champion, challenger = registry_with(tmp_path / "m", trained, challenger=True)
    scorer = Scorer(registry)
    async with db.transaction() as session:
        stored = await customers.get_features(session, KEYS)
    rows = [stored[k] for k in KEYS]
    champion_scores = scorer.score("churn", rows).scores
    challenger_scores = scorer.score("churn", rows, version=challenger.version).scores
    assert champion_scores != challenger_scores

    # One customer per campaign step, as campaigns score (one audit row per step).
    for key, ours, expected in zip(KEYS, champion_scores, challenger_scores, strict=True):
        result, payloads = await score(db, registry, f"wf-shadow-{key}", [key])
        assert result.model_versions == {"churn": champion.version}
        assert result.customers[0].scores == {"churn": pytest.approx(ours)}
        assert payloads[key]["scores"] == {"churn": pytest.approx(ours)}
        shadow = payloads[key]["shadow"]["churn"]
        assert shadow["version"] == challenger.version
        assert shadow["score"] == pytest.approx(expected)
        assert payloads[key]["model_versions"] == {"churn": champion.version}
        assert len(payloads[key]["top_contributions"]["churn"]) == 3


async def test_no_challenger_no_shadow(
    db: Database, tmp_path: Path, trained: tuple[TrainedModel, TrainedModel]
) -> None:
    registry, _, _ = registry_with(tmp_path / "m", trained, challenger=False)
    _, payloads = await score(db, registry, "wf-plain")
    assert all(payload["shadow"] == {} for payload in payloads.values())


async def test_a_broken_challenger_is_recorded_and_does_not_fail_the_step(
    db: Database, tmp_path: Path, trained: tuple[TrainedModel, TrainedModel]
) -> None:
    registry, champion, challenger = registry_with(tmp_path / "m", trained, challenger=True)
    challenger.model_path.write_text("{}", encoding="utf-8")
    result, payloads = await score(db, registry, "wf-broken")
    assert result.model_versions == {"churn": champion.version}
    shadow = payloads[KEYS[0]]["shadow"]["churn"]
    assert shadow["version"] == challenger.version
    assert shadow["error"].startswith("ModelCorrupt")

    # The champion breaking is another matter: the step fails for the fallback path.
    champion.model_path.write_text("{}", encoding="utf-8")
    with pytest.raises(ApplicationError, match="ModelCorrupt"):
        await score(db, registry, "wf-broken-champion")
