"""The scoring library on the real CDNOW log with real XGBoost."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import xgboost as xgb

from scoring.bgnbd import BgNbdParams
from scoring.cdnow import cdnow_path, load_transactions
from scoring.features import BGNBD_FEATURE_NAMES, FEATURE_NAMES, bgnbd_columns, rfm_features
from scoring.registry import ModelRegistry
from scoring.scorer import FeatureMismatch, ModelCorrupt, ModelNotFound, Scorer, ScoringError
from scoring.train import (
    LeakageError,
    TrainConfig,
    TrainedModel,
    assert_no_leakage,
    build_churn_dataset,
    train_churn,
)

CONFIG = TrainConfig()
CUTOFF = CONFIG.feature_cutoff


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return load_transactions()


@pytest.fixture(scope="module")
def trained(transactions: pd.DataFrame) -> TrainedModel:
    return train_churn(transactions, CONFIG)


@pytest.fixture(scope="module")
def features(transactions: pd.DataFrame) -> pd.DataFrame:
    return rfm_features(transactions, CUTOFF)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def as_rows(frame: pd.DataFrame) -> list[dict[str, float | None]]:
    return [
        {name: None if np.isnan(value) else float(value) for name, value in row.items()}
        for row in frame.to_dict("records")
    ]


def matrix(frame: pd.DataFrame, model: TrainedModel | None = None) -> npt.NDArray[np.float32]:
    """The booster's input matrix: the store's features plus, for a hybrid, BG/NBD's."""
    base = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float32)
    if model is None or model.derived is None:
        return base
    d = model.derived
    params = BgNbdParams(d["r"], d["alpha"], d["a"], d["b"], 0.0, 0)
    column = {name: base[:, i] for i, name in enumerate(FEATURE_NAMES)}
    extra = bgnbd_columns(
        column["frequency"], column["tenure_days"], column["age_days"], params, d["horizon_days"]
    )
    return np.hstack([base, extra.astype(np.float32)])


def tx(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "date", "cds", "amount"])
    frame["date"] = pd.to_datetime(frame["date"])
    return frame


def test_scoring_is_a_library_without_service_imports() -> None:
    forbidden = (
        "temporalio",
        "sqlalchemy",
        "cohortflow.storage",
        "cohortflow.settings",
        "cohortflow.crm",
    )
    code = (
        "import json, sys, scoring.cdnow, scoring.features, scoring.train, scoring.registry, "
        "scoring.scorer, scoring.bgnbd, scoring.drift; print(json.dumps(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    modules = json.loads(loaded)
    assert "scoring.scorer" in modules
    offending = [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert offending == []


# --- loader -------------------------------------------------------------------------------


def test_loader_reads_every_row_and_customer(transactions: pd.DataFrame) -> None:
    assert len(transactions) == 69_659
    assert transactions["customer_id"].nunique() == 23_570
    assert list(transactions.columns) == ["customer_id", "date", "cds", "amount"]
    assert pd.api.types.is_datetime64_any_dtype(transactions["date"])
    assert pd.api.types.is_integer_dtype(transactions["cds"])
    assert pd.api.types.is_float_dtype(transactions["amount"])
    first = transactions.iloc[0]
    assert (first["customer_id"], first["date"], first["cds"], first["amount"]) == (
        "00001",
        pd.Timestamp("1997-01-01"),
        1,
        11.77,
    )
    assert transactions["date"].min() == pd.Timestamp("1997-01-01")
    assert transactions["date"].max() == pd.Timestamp("1998-06-30")


def test_loader_accepts_a_file_without_header(tmp_path: Path) -> None:
    with gzip.open(cdnow_path(), "rt") as handle:
        lines = handle.read().splitlines()[1:4]
    headerless = tmp_path / "cdnow.txt.gz"
    with gzip.open(headerless, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    frame = load_transactions(headerless)
    assert frame["customer_id"].tolist() == ["00001", "00002", "00002"]
    assert frame["amount"].tolist() == [11.77, 12.0, 77.0]


# --- features -----------------------------------------------------------------------------


def test_features_only_use_transactions_up_to_as_of() -> None:
    before = [
        ("A", "1997-01-10", 1, 10.0),
        ("A", "1997-01-10", 2, 20.0),  # same day: one purchase
        ("A", "1997-03-01", 1, 15.0),
        ("C", "1997-09-30", 3, 30.0),  # on as_of: counts
    ]
    after = [
        ("A", "1997-10-01", 9, 900.0),
        ("B", "1997-12-24", 1, 12.0),  # first purchase after as_of: excluded
    ]
    features = rfm_features(tx(before + after), CUTOFF)

    assert list(features.columns) == list(FEATURE_NAMES)
    assert features.index.tolist() == ["A", "C"]
    pd.testing.assert_frame_equal(features, rfm_features(tx(before), CUTOFF))
    assert features.loc["A"].to_dict() == pytest.approx(
        {
            "recency_days": 213.0,
            "frequency": 1.0,
            "tenure_days": 50.0,
            "age_days": 263.0,
            "monetary_total": 45.0,
            "monetary_avg": 22.5,
            "cds_total": 4.0,
            "purchases_90d": 0.0,
            "monetary_90d": 0.0,
            "mean_interpurchase_days": 50.0,
        }
    )
    c = features.loc["C"]
    assert (c["recency_days"], c["frequency"], c["purchases_90d"], c["monetary_90d"]) == (
        0.0,
        0.0,
        1.0,
        30.0,
    )
    assert np.isnan(c["mean_interpurchase_days"])


# --- training -----------------------------------------------------------------------------


def test_training_dataset_has_no_leakage(transactions: pd.DataFrame) -> None:
    dataset = build_churn_dataset(transactions, CUTOFF, CONFIG.label_end)
    assert_no_leakage(dataset)
    assert dataset.feature_rows["date"].max() <= pd.Timestamp(CUTOFF)
    assert dataset.label_rows["date"].min() > pd.Timestamp(CUTOFF)
    assert len(dataset.feature_rows) + len(dataset.label_rows) == len(transactions)

    leaky_features = dataclasses.replace(
        dataset, features=rfm_features(transactions, CONFIG.label_end)
    )
    with pytest.raises(LeakageError, match="features differ"):
        assert_no_leakage(leaky_features)

    leaky_feature_rows = dataclasses.replace(dataset, feature_rows=transactions)
    with pytest.raises(LeakageError, match="feature rows"):
        assert_no_leakage(leaky_feature_rows)

    leaky_label_rows = dataclasses.replace(dataset, label_rows=transactions)
    with pytest.raises(LeakageError, match="label rows"):
        assert_no_leakage(leaky_label_rows)

    flipped = dataclasses.replace(dataset, labels=1 - dataset.labels)
    with pytest.raises(LeakageError, match="labels"):
        assert_no_leakage(flipped)


def test_churn_model_holdout_metrics(trained: TrainedModel) -> None:
    metrics = trained.metrics
    assert metrics["auroc"] > 0.70
    assert metrics["brier"] < 0.25
    assert metrics["pr_auc"] > metrics["base_rate"]
    assert metrics["precision_at_10pct"] > metrics["base_rate"]
    # A time split: every customer appears in each of the three training snapshots (as of
    # 1997-03-31, 04-30 and 05-30) and in the test snapshot (as of 1997-09-30).
    assert (trained.n_train, trained.n_test) == (3 * 23_570, 23_570)
    assert sum(count for _, _, count in metrics["calibration"]) == trained.n_test
    assert (trained.feature_cutoff, trained.label_end) == (date(1997, 9, 30), date(1998, 6, 30))
    assert trained.feature_names == FEATURE_NAMES + BGNBD_FEATURE_NAMES
    assert trained.input_features == FEATURE_NAMES
    assert tuple(trained.booster.feature_names or ()) == trained.feature_names
    assert len(trained.data_hash) == 64


def test_training_is_reproducible(
    transactions: pd.DataFrame, trained: TrainedModel, features: pd.DataFrame
) -> None:
    x = matrix(features, trained)
    quick = dataclasses.replace(CONFIG, bootstrap_resamples=0)
    again = train_churn(transactions.sample(frac=1.0, random_state=7), quick)
    assert np.array_equal(again.booster.inplace_predict(x), trained.booster.inplace_predict(x))
    assert again.data_hash == trained.data_hash
    assert again.metrics == trained.metrics

    reseeded = train_churn(transactions, dataclasses.replace(quick, seed=CONFIG.seed + 1))
    assert not np.array_equal(
        reseeded.booster.inplace_predict(x), trained.booster.inplace_predict(x)
    )


# --- registry -----------------------------------------------------------------------------


def test_registry_round_trip(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    info = registry.register(trained, promoted_by="alice")
    assert info.version.startswith("churn-v1-")
    assert registry.champion("churn") == info
    assert registry.get("churn", info.version) == info
    assert info.feature_names == trained.feature_names
    assert info.metrics == trained.metrics
    assert (info.promoted_by, info.data_hash) == ("alice", trained.data_hash)

    model_text = info.model_path.read_text(encoding="utf-8")
    assert "learner" in json.loads(model_text)
    meta = json.loads((info.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["feature_names"] == list(FEATURE_NAMES + BGNBD_FEATURE_NAMES)
    assert meta["input_features"] == list(FEATURE_NAMES)
    assert (meta["feature_cutoff"], meta["label_end"]) == ("1997-09-30", "1998-06-30")
    assert meta["report"]["dates"]["train_features"] == "1997-04-30"
    assert info.report == trained.report

    # Callers pass the store's features; the scorer derives BG/NBD's as training did.
    sample = features.head(500)
    result = Scorer(registry).score("churn", as_rows(sample))
    assert result.version == info.version
    expected = trained.booster.inplace_predict(matrix(sample, trained))
    assert np.allclose(result.scores, expected, atol=1e-6)


def test_registry_versions_and_promotion(registry: ModelRegistry, trained: TrainedModel) -> None:
    first = registry.register(trained, promoted_by="alice")
    second = registry.register(trained, make_champion=False)
    assert second.version.startswith("churn-v2-")
    assert second.promoted_by is None
    assert registry.champion("churn") == first
    assert [m.version for m in registry.list()] == [first.version, second.version]
    assert registry.list("propensity") == []

    promoted = registry.promote("churn", second.version, by="bob")
    assert promoted.promoted_by == "bob"
    assert registry.champion("churn") == promoted
    assert registry.get("churn", second.version) == promoted

    with pytest.raises(ModelNotFound):
        registry.get("churn", "churn-v9-deadbeef")
    with pytest.raises(ModelNotFound):
        registry.get("churn", "../../etc")
    assert registry.champion("propensity") is None


def test_a_promotion_elsewhere_reaches_a_registry_that_read_the_champion(
    registry: ModelRegistry, trained: TrainedModel
) -> None:
    # A worker's registry caches the champion pointer by the file's identity; a promotion
    # by another process (another registry object here) replaces the file.
    first = registry.register(trained, promoted_by="alice")
    second = registry.register(trained, make_champion=False)
    assert registry.champion_version("churn") == first.version
    ModelRegistry(registry.root).promote("churn", second.version, by="bob")
    assert registry.champion_version("churn") == second.version
    (registry.root / "churn" / "champion.json").unlink()
    assert registry.champion_version("churn") is None


# --- scorer -------------------------------------------------------------------------------


def test_corrupt_model_file_raises_model_corrupt(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    info = registry.register(trained)
    rows = as_rows(features.head(3))
    warm = Scorer(registry)
    before = warm.score("churn", rows).scores

    content = info.model_path.read_bytes()
    info.model_path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ModelCorrupt, match="hash"):
        Scorer(registry).score("churn", rows)
    # Loaded once per version: a scorer that already holds the model keeps using it.
    assert warm.score("churn", rows).scores == before

    # Garbage whose hash was recorded too gets past the checksum; XGBoost rejects it.
    garbage = b'{"learner": [1, 2'
    info.model_path.write_bytes(garbage)
    meta_path = info.path / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["model_sha256"] = hashlib.sha256(garbage).hexdigest()
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelCorrupt, match="not a valid XGBoost JSON model"):
        Scorer(registry).score("churn", rows)


def test_registry_feature_list_must_match_the_booster(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    info = registry.register(trained)
    meta_path = info.path / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["feature_names"][0], meta["feature_names"][1] = (
        meta["feature_names"][1],
        meta["feature_names"][0],
    )
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(FeatureMismatch, match="differ"):
        Scorer(registry).score("churn", as_rows(features.head(1)))


def test_missing_model_or_champion_raises_model_not_found(
    registry: ModelRegistry, trained: TrainedModel
) -> None:
    scorer = Scorer(registry)
    with pytest.raises(ModelNotFound, match="no champion"):
        scorer.score("churn", [])
    registry.register(trained, make_champion=False)
    with pytest.raises(ModelNotFound, match="no champion"):
        scorer.score("churn", [])
    with pytest.raises(ModelNotFound):
        scorer.score("churn", [], version="churn-v7-0123abcd")


def test_missing_feature_key_raises_feature_mismatch(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    registry.register(trained)
    rows = as_rows(features.head(3))
    del rows[1]["monetary_avg"]
    with pytest.raises(FeatureMismatch, match="monetary_avg"):
        Scorer(registry).score("churn", rows)


def test_none_is_scored_as_missing(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    registry.register(trained)
    row = as_rows(features.head(1))[0]
    row["monetary_90d"] = None
    row["recency_days"] = None
    row["extra_key_is_ignored"] = 1.0
    result = Scorer(registry).score("churn", [row])

    frame = pd.DataFrame([{f: np.nan if row[f] is None else row[f] for f in FEATURE_NAMES}])
    assert result.scores == pytest.approx(
        trained.booster.inplace_predict(matrix(frame, trained)).tolist()
    )
    assert 0.0 < result.scores[0] < 1.0
    assert len(result.contributions[0]) == 3


def test_contributions_add_up_to_the_margin_and_are_ordered(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    registry.register(trained)
    sample = features.sample(300, random_state=1)
    rows = as_rows(sample)
    scorer = Scorer(registry)
    full = scorer.score("churn", rows, top_k=len(trained.feature_names))
    top3 = scorer.score("churn", rows, top_k=3)

    dmatrix = xgb.DMatrix(matrix(sample, trained), feature_names=list(trained.feature_names))
    bias = trained.booster.predict(dmatrix, pred_contribs=True)[:, -1]
    margin = trained.booster.predict(dmatrix, output_margin=True)
    totals = np.array([sum(value for _, value in row) for row in full.contributions])
    assert np.allclose(totals + bias, margin, atol=1e-4)

    for everything, top in zip(full.contributions, top3.contributions, strict=True):
        assert {name for name, _ in everything} == set(trained.feature_names)
        magnitudes = [abs(value) for _, value in everything]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert top == everything[:3]
    assert top3.scores == full.scores
    assert scorer.score("churn", rows[:2], top_k=0).contributions == [[], []]


def test_inplace_predict_matches_dmatrix_predict(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    registry.register(trained)
    sample = features.sample(1000, random_state=2)
    result = Scorer(registry).score("churn", as_rows(sample), top_k=0)
    dmatrix = xgb.DMatrix(matrix(sample, trained), feature_names=list(trained.feature_names))
    assert np.array_equal(
        np.asarray(result.scores, dtype=np.float32), trained.booster.predict(dmatrix)
    )
    assert len(result.scores) == 1000


def test_columns_score_like_rows(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    registry.register(trained)
    sample = features.sample(2000, random_state=3)
    scorer = Scorer(registry)
    by_rows = scorer.score("churn", as_rows(sample))
    columns = {name: sample[name].to_numpy() for name in FEATURE_NAMES}
    by_columns = scorer.score("churn", columns | {"unused": np.zeros(len(sample))})
    assert by_columns == by_rows
    assert scorer.score("churn", {n: np.array([]) for n in FEATURE_NAMES}).scores == []

    del columns["age_days"]
    with pytest.raises(FeatureMismatch, match="age_days"):
        scorer.score("churn", columns)
    ragged = {n: np.ones(3) for n in FEATURE_NAMES} | {"age_days": np.ones(2)}
    with pytest.raises(ScoringError, match="one length"):
        scorer.score("churn", ragged)


def test_one_row_scores_like_the_batch(
    registry: ModelRegistry, trained: TrainedModel, features: pd.DataFrame
) -> None:
    """A campaign's customer scored alone (one thread, one DMatrix for the score and the
    reasons) gets the very score and reasons the batch path gives them."""
    registry.register(trained)
    sample = features.sample(5000, random_state=4)
    rows = as_rows(sample)
    for row in rows[::7]:
        row["monetary_90d"] = None  # a missing value takes the trees' default branches
    assert any(row["mean_interpurchase_days"] is None for row in rows)
    scorer = Scorer(registry)
    every = len(trained.feature_names)
    batch = scorer.score("churn", rows, top_k=every)
    for i, row in enumerate(rows):
        alone = scorer.score("churn", [row], top_k=every)
        assert alone.scores == [batch.scores[i]]
        assert alone.contributions == [batch.contributions[i]]
        assert scorer.score("churn", [row]).contributions == [batch.contributions[i][:3]]
        assert scorer.score("churn", [row], top_k=0).scores == [batch.scores[i]]
