"""Model quality on the real CDNOW log: BG/NBD, the baselines, the report, drift, challengers."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scoring import bgnbd
from scoring.cdnow import load_transactions
from scoring.drift import DEFAULT_THRESHOLD, SCORE, champion_drift, psi
from scoring.features import BGNBD_FEATURE_NAMES, FEATURE_NAMES, rfm_features
from scoring.registry import ModelRegistry
from scoring.scorer import ModelCorrupt, Scorer
from scoring.train import (
    LeakageError,
    QualityReport,
    TrainConfig,
    TrainedModel,
    assert_time_split,
    build_snapshot,
    train_model,
)
from tests.test_scoring import matrix

CHURN = TrainConfig.for_model("churn")
PROPENSITY = TrainConfig.for_model("propensity")


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return load_transactions()


@pytest.fixture(scope="module")
def churn(transactions: pd.DataFrame) -> TrainedModel:
    return train_model(transactions, CHURN)


@pytest.fixture(scope="module")
def propensity(transactions: pd.DataFrame) -> TrainedModel:
    return train_model(transactions, PROPENSITY)


def store_rows(frame: pd.DataFrame) -> list[dict[str, float | None]]:
    """Rows as the feature store returns them: NaN stored as None."""
    return [
        {k: None if pd.isna(v) else float(v) for k, v in row.items()}
        for row in frame.loc[:, list(FEATURE_NAMES)].to_dict("records")
    ]


# --- BG/NBD -------------------------------------------------------------------------------


def simulate_bgnbd(
    rng: np.random.Generator, n: int, params: tuple[float, float, float, float], big_t: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw customers from the BG/NBD process; returns x, t_x, T and purchases in (T, 2T]."""
    r, alpha, a, b = params
    lam = rng.gamma(r, 1.0 / alpha, n)
    p = rng.beta(a, b, n)
    xs, txs, future = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        t, alive = 0.0, True
        while alive:
            t += rng.exponential(1.0 / lam[i])
            if t > 2 * big_t:
                break
            if t <= big_t:
                xs[i] += 1
                txs[i] = t
            else:
                future[i] += 1
            alive = rng.random() >= p[i]
    return xs, txs, np.full(n, big_t), future


def test_bgnbd_recovers_simulated_parameters_and_predicts_the_holdout() -> None:
    truth = (0.5, 4.0, 0.7, 2.5)
    x, t_x, big_t, future = simulate_bgnbd(np.random.default_rng(3), 6000, truth, 39.0)
    fitted = bgnbd.fit(x, t_x, big_t)
    assert [fitted.r, fitted.alpha, fitted.a, fitted.b] == pytest.approx(truth, rel=0.25)

    expected = bgnbd.expected_purchases(fitted, x, t_x, big_t, 39.0)
    assert expected.sum() == pytest.approx(future.sum(), rel=0.08)
    p_buy = bgnbd.p_purchase(fitted, x, t_x, big_t, 39.0)
    assert p_buy.mean() == pytest.approx((future > 0).mean(), abs=0.02)
    # P(at least one) can never exceed P(alive), nor the expected count; ignoring future
    # dropout can only add purchases.
    p_buy2, alive, if_alive = bgnbd.serving_summaries(fitted, x, t_x, big_t, 39.0)
    assert np.array_equal(p_buy, p_buy2)
    assert np.array_equal(alive, bgnbd.p_alive(fitted, x, t_x, big_t))
    assert (p_buy <= alive + 1e-12).all()
    assert (p_buy <= expected + 1e-12).all()
    assert (expected <= if_alive + 1e-9).all()


def test_bgnbd_on_cdnow_is_near_the_published_estimates(transactions: pd.DataFrame) -> None:
    # FHL 2005 on the 1/10 sample: r=0.243, alpha=4.414, a=0.793, b=2.426 (weeks).
    features = rfm_features(transactions, date(1997, 9, 30))
    weeks = bgnbd.DAYS_PER_WEEK
    fitted = bgnbd.fit(
        features["frequency"], features["tenure_days"] / weeks, features["age_days"] / weeks
    )
    published = [0.243, 4.414, 0.793, 2.426]
    assert [fitted.r, fitted.alpha, fitted.a, fitted.b] == pytest.approx(published, rel=0.15)


def test_bgnbd_rejects_inconsistent_summaries() -> None:
    params = bgnbd.BgNbdParams(0.24, 4.4, 0.79, 2.4, 0.0, 0)
    with pytest.raises(ValueError, match="t_x <= T"):
        bgnbd.p_alive(params, [1.0], [5.0], [3.0])


# --- time split ---------------------------------------------------------------------------


def test_no_training_label_falls_after_the_test_feature_cutoff(
    transactions: pd.DataFrame,
) -> None:
    test = build_snapshot(transactions, date(1997, 9, 30), date(1998, 6, 30), "no_purchase")
    train = build_snapshot(transactions, date(1997, 4, 30), date(1997, 9, 30), "no_purchase")
    assert_time_split(train, test)
    assert train.label_rows["date"].max() <= pd.Timestamp("1997-09-30")

    leaky = build_snapshot(transactions, date(1997, 4, 30), date(1997, 12, 31), "no_purchase")
    with pytest.raises(LeakageError, match="past the test feature cut-off"):
        assert_time_split(leaky, test)
    with pytest.raises(ValueError, match="train_label_end <= feature_cutoff"):
        TrainConfig(train_label_end=date(1997, 12, 31))


def test_labels_follow_the_event(transactions: pd.DataFrame) -> None:
    churn = build_snapshot(transactions, date(1997, 9, 30), date(1998, 6, 30), "no_purchase")
    buys = build_snapshot(transactions, date(1997, 9, 30), date(1998, 6, 30), "purchase")
    assert (churn.labels + buys.labels == 1).all()
    # Customer 00001 bought once, on 1997-01-01, and never again.
    assert (churn.labels["00001"], buys.labels["00001"]) == (1, 0)


# --- the quality report -------------------------------------------------------------------


def test_churn_beats_bgnbd_on_auroc_and_brier_with_bootstrap_intervals(
    churn: TrainedModel,
) -> None:
    report = churn.report
    assert report is not None
    ours, bg, rfm = (report.metrics[k] for k in ("model", "bgnbd", "rfm"))
    # BG/NBD on its own data is strong: about 0.76 AUROC for "buys again".
    assert 0.75 < bg["auroc"] < 0.78
    assert ours["auroc"] >= bg["auroc"]
    assert ours["brier"] < bg["brier"]
    auroc, brier = report.auroc_diff_vs_bgnbd, report.brier_diff_vs_bgnbd
    assert auroc.estimate == pytest.approx(ours["auroc"] - bg["auroc"])
    assert brier.estimate == pytest.approx(ours["brier"] - bg["brier"])
    assert auroc.resamples == brier.resamples == 500
    assert auroc.low is not None and auroc.high is not None
    assert brier.low is not None and brier.high is not None
    assert 0.0 < auroc.low <= auroc.estimate <= auroc.high
    assert brier.low <= brier.estimate <= brier.high < 0.0
    # Every baseline is evaluated on the same customers.
    assert ours["base_rate"] == bg["base_rate"] == rfm["base_rate"]
    assert 0.74 < rfm["auroc"] < ours["auroc"] + 0.01


def test_report_names_every_date_and_round_trips(churn: TrainedModel) -> None:
    report = churn.report
    assert report is not None
    assert report.dates == {
        "train_features": "1997-04-30",
        "train_labels_from": "1997-05-01",
        "train_labels_to": "1997-09-30",
        "test_features": "1997-09-30",
        "test_labels_from": "1997-10-01",
        "test_labels_to": "1998-06-30",
        "train_snapshots": "1997-03-31, 1997-04-30, 1997-05-30",
    }
    text = report.to_text()
    for value in report.dates.values():
        assert value in text
    for title in ("ours (hybrid)", "BG/NBD", "RFM heuristic", "95% CI", "calibration"):
        assert title in text
    assert QualityReport.from_dict(json.loads(report.to_json())) == report
    # The BG/NBD features carry the hybrid: they hold most of the gain.
    gain = dict(report.feature_gain)
    assert sum(gain.values()) == pytest.approx(1.0)
    assert sum(gain[name] for name in BGNBD_FEATURE_NAMES) > 0.5


def test_calibration_tables_count_every_test_customer(churn: TrainedModel) -> None:
    assert churn.report is not None
    for metrics in churn.report.metrics.values():
        assert sum(n for _, _, n in metrics["calibration"]) == churn.n_test
    # Ours is calibrated within 0.07 in every bin holding at least 500 customers (trained on
    # one snapshot it was within 0.05 here, and off by 0.13 on later splits: see below).
    for predicted, observed, n in churn.report.metrics["model"]["calibration"]:
        if n >= 500:
            assert abs(predicted - observed) < 0.07


@pytest.mark.parametrize(
    "split",
    [
        (date(1997, 7, 31), date(1997, 12, 31), date(1998, 6, 30)),
        (date(1997, 8, 31), date(1998, 1, 31), date(1998, 6, 30)),
    ],
    ids=["1997-12", "1998-01"],
)
def test_churn_calibration_holds_on_later_splits(
    transactions: pd.DataFrame, split: tuple[date, date, date]
) -> None:
    """Splits where the churn model trained on one snapshot only tied BG/NBD on Brier (the
    interval of the difference straddled zero) and was off by up to 0.13 in a bin."""
    train_features, test_features, test_labels = split
    config = TrainConfig.for_model(
        "churn",
        train_feature_cutoff=train_features,
        train_label_end=test_features,
        feature_cutoff=test_features,
        label_end=test_labels,
        bootstrap_resamples=200,
    )
    report = train_model(transactions, config).report
    assert report is not None
    brier = report.brier_diff_vs_bgnbd
    assert brier.high is not None and brier.high < 0.0
    assert report.metrics["model"]["auroc"] > report.metrics["bgnbd"]["auroc"]
    for predicted, observed, n in report.metrics["model"]["calibration"]:
        if n >= 500:
            assert abs(predicted - observed) < 0.07


def test_propensity_predicts_buying_within_90_days(
    propensity: TrainedModel, churn: TrainedModel
) -> None:
    report = propensity.report
    assert report is not None
    assert report.event == "purchase"
    assert (report.dates["test_features"], report.dates["test_labels_to"]) == (
        "1997-09-30",
        "1997-12-29",
    )
    # Equal training and test horizons: the base rates agree and calibration transfers.
    assert report.train_base_rate == pytest.approx(report.metrics["model"]["base_rate"], abs=0.01)
    ours, bg = report.metrics["model"], report.metrics["bgnbd"]
    assert ours["auroc"] > 0.75
    assert ours["brier"] < bg["brier"]
    assert ours["precision_at_10pct"] > 3 * ours["base_rate"]

    # Propensity scores buying, churn scores not buying: they disagree in direction.
    features = rfm_features(load_transactions(), date(1997, 9, 30)).sample(2000, random_state=5)
    corr = np.corrcoef(
        churn.booster.inplace_predict(matrix(features, churn)),
        propensity.booster.inplace_predict(matrix(features, propensity)),
    )[0, 1]
    assert corr < -0.5


def test_training_is_seeded(transactions: pd.DataFrame, churn: TrainedModel) -> None:
    quick = dataclasses.replace(CHURN, bootstrap_resamples=20)
    first = train_model(transactions, quick)
    again = train_model(transactions, quick)
    assert first.report == again.report
    assert first.metrics == churn.metrics


# --- registry: challenger -----------------------------------------------------------------


def test_one_challenger_that_is_never_the_champion(tmp_path: Path, churn: TrainedModel) -> None:
    registry = ModelRegistry(tmp_path / "models")
    champion = registry.register(churn, promoted_by="alice")
    other = registry.register(churn, make_champion=False)
    assert registry.challenger_version("churn") is None
    with pytest.raises(ValueError, match="champion"):
        registry.set_challenger("churn", champion.version, by="bob")

    registry.set_challenger("churn", other.version, by="bob")
    assert registry.challenger_version("churn") == other.version
    assert Scorer(registry).challenger_version("churn") == other.version

    # Promoting the challenger makes it the one champion and ends its shadow role.
    registry.promote("churn", other.version, by="carol")
    assert registry.champion_version("churn") == other.version
    assert registry.challenger_version("churn") is None
    assert registry.clear_challenger("churn") is False


# --- drift --------------------------------------------------------------------------------


def test_psi_is_zero_on_the_reference_and_grows_with_shift() -> None:
    values = np.random.default_rng(0).normal(size=20_000)
    edges = np.quantile(values, np.linspace(0, 1, 11)[1:-1])
    reference = {"edges": edges.tolist(), "proportions": [0.1] * 10 + [0.0]}
    assert psi(reference, values) == pytest.approx(0.0, abs=1e-3)
    assert psi(reference, values + 0.1) < 0.1 < psi(reference, values + 0.5)
    # Values going missing land in the missing bin and count as drift.
    missing = values.copy()
    missing[:5000] = np.nan
    assert psi(reference, missing) > DEFAULT_THRESHOLD


def test_drift_flags_shifted_features_on_real_data(tmp_path: Path, churn: TrainedModel) -> None:
    registry = ModelRegistry(tmp_path / "models")
    registry.register(churn, promoted_by="tests")
    current = rfm_features(load_transactions(), date(1997, 9, 30))

    same = champion_drift(registry, "churn", store_rows(current))
    assert same.flagged == []
    assert max(row.psi for row in same.rows) < 0.01
    assert [row.name for row in same.rows] == [*FEATURE_NAMES, SCORE]

    shifted = current.copy()
    shifted["recency_days"] += 120
    shifted["monetary_total"] *= 3
    report = champion_drift(registry, "churn", store_rows(shifted))
    assert {"recency_days", "monetary_total"} <= set(report.flagged)
    assert "cds_total" not in report.flagged
    # Nine months of silence moves the churn scores too.
    assert SCORE in report.flagged
    assert report.to_dict()["flagged"] == report.flagged


def test_drift_needs_a_readable_champion(tmp_path: Path, churn: TrainedModel) -> None:
    registry = ModelRegistry(tmp_path / "models")
    info = registry.register(churn)
    info.model_path.write_text("{}", encoding="utf-8")
    rows = store_rows(rfm_features(load_transactions(), date(1997, 9, 30)).head(100))
    with pytest.raises(ModelCorrupt):
        champion_drift(registry, "churn", rows)
