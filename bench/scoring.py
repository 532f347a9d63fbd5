"""Scoring throughput against raw XGBoost, and the campaign score step's latency.

1. Rows per second of ``Scorer.score`` (the batch path: feature columns in, scores out,
   the hybrid's BG/NBD columns derived on the way) against ``Booster.inplace_predict`` on
   the same rows already laid out as the booster's input matrix, for batches of 1,000,
   10,000 and 100,000 CDNOW customers; with and without top-3 contributions (raw:
   ``predict(pred_contribs=True)``). Each figure is the median over interleaved rounds of
   the best of several calls.
2. Per-customer latency of the campaign's score step on a migrated SQLite database, p50
   and p99 over N distinct customers, interleaved call by call with raw one-row
   ``Booster.inplace_predict`` on the customer's row already laid out (a booster as loaded,
   and one held to one thread) so background load hits all alike:
   - the step's own work, ``ScoringActivities.score``: the feature read (its own read
     transaction), scoring with the champion and its top-3 contributions, the challenger
     lookup; the audit append is not in it;
   - the whole ``score_customer`` activity through Temporal's ``ActivityEnvironment``: the
     above plus the audit append's write transaction (and the environment's own cost).

    python bench/scoring.py [--calls 1000]

Ends with one JSON line: bench, ratio (worst ours/raw rows/s over batches >= 1,000, without
contributions), target (0.8), p50_ms and p99_ms (the step's own work; targets 1 and 5 ms),
raw_one_row_ms (p50), step_p50_ratio (our p50 over raw one row's), the activity's p50 and
p99, and the per-batch figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, this directory comes first on sys.path and this file's name would
    # shadow the scoring package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from temporalio.testing import ActivityEnvironment

from activities.campaign.scoring import ScoringActivities
from cohortflow.storage import customers
from cohortflow.storage.db import Database, migrate
from scoring.bgnbd import BgNbdParams
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, bgnbd_columns, rfm_features
from scoring.registry import ModelInfo, ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, train_model
from workflows.campaign.activity_io import ScoreInput

BATCHES = (1_000, 10_000, 100_000)
TARGET = 0.8
P50_TARGET_MS = 1.0
P99_TARGET_MS = 5.0


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (after one warm-up when there are several).

    The minimum, as timeit advises: on cores shared with other work, slower runs measure
    the neighbours, not the code.
    """
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def booster_matrix(info: ModelInfo, frame: pd.DataFrame) -> np.ndarray:
    """The booster's input matrix for ``frame``, laid out once, outside the timing."""
    base: np.ndarray = frame.loc[:, list(info.inputs)].to_numpy(dtype=np.float32)
    if info.derived is None:
        return base
    d = info.derived
    params = BgNbdParams(d["r"], d["alpha"], d["a"], d["b"], 0.0, 0)
    col = {name: base[:, i] for i, name in enumerate(info.inputs)}
    extra = bgnbd_columns(
        col["frequency"], col["tenure_days"], col["age_days"], params, d["horizon_days"]
    )
    joined: np.ndarray = np.ascontiguousarray(np.hstack([base, extra.astype(np.float32)]))
    return joined


def raw_contributions(booster: xgb.Booster, matrix: np.ndarray, names: list[str]) -> Any:
    """XGBoost's own SHAP path, DMatrix construction included (ours builds its input too)."""
    return booster.predict(xgb.DMatrix(matrix, feature_names=names), pred_contribs=True)


def throughput(registry: ModelRegistry, population: pd.DataFrame) -> list[dict[str, Any]]:
    scorer = Scorer(registry)
    info = scorer.model("churn")
    booster = xgb.Booster(model_file=str(info.model_path))
    results = []
    for n in BATCHES:
        frame = population.iloc[:n]
        columns = {name: frame[name].to_numpy() for name in info.inputs}
        matrix = booster_matrix(info, frame)
        repeats = max(3, min(30, 300_000 // n))
        # Interleave ours and raw so background load hits both alike.
        raw_t, ours_t = [], []
        for _ in range(3):
            raw_t.append(best_time(partial(booster.inplace_predict, matrix), repeats))
            ours_t.append(
                best_time(
                    partial(scorer.score, "churn", columns, version=info.version, top_k=0),
                    repeats,
                )
            )
        # SHAP values cost ~50 times a prediction: few timed calls keep the bench short.
        contrib_repeats = max(1, 10_000 // n)
        raw_c, ours_c = [], []
        for _ in range(2):
            raw_c.append(
                best_time(
                    partial(raw_contributions, booster, matrix, list(info.feature_names)),
                    contrib_repeats,
                )
            )
            ours_c.append(
                best_time(
                    partial(scorer.score, "churn", columns, version=info.version, top_k=3),
                    contrib_repeats,
                )
            )
        raw, ours = statistics.median(raw_t), statistics.median(ours_t)
        raw_contrib, ours_contrib = statistics.median(raw_c), statistics.median(ours_c)
        results.append(
            {
                "batch": n,
                "raw_rows_per_s": round(n / raw),
                "ours_rows_per_s": round(n / ours),
                "ratio": round(raw / ours, 3),
                "raw_contrib_rows_per_s": round(n / raw_contrib),
                "ours_contrib_rows_per_s": round(n / ours_contrib),
                "ratio_contrib": round(raw_contrib / ours_contrib, 3),
            }
        )
        print(
            f"batch {n:>7}: raw {n / raw:>12,.0f} rows/s  ours {n / ours:>12,.0f} rows/s  "
            f"ratio {raw / ours:.3f} | with contributions: raw {n / raw_contrib:>10,.0f}  "
            f"ours {n / ours_contrib:>10,.0f}  ratio {raw_contrib / ours_contrib:.3f}",
            flush=True,
        )
    return results


async def latency(
    registry: ModelRegistry, population: pd.DataFrame, calls: int
) -> dict[str, list[float]]:
    """Milliseconds per call for ``calls`` distinct customers: the score step's own work
    (``step``), the whole activity (``activity``) and raw one-row predictions."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await migrate(url)
        db = Database(url)
        keys = [f"c_{i:038d}" for i in range(calls)]
        frame = population.iloc[:calls].loc[:, list(FEATURE_NAMES)]
        rows = [
            {k: None if pd.isna(v) else float(v) for k, v in r.items()}
            for r in frame.to_dict("records")
        ]
        now = datetime.now(UTC)
        async with db.transaction() as session:
            await customers.upsert_customers(
                session, [customers.CustomerRecord(k, k, None) for k in keys]
            )
            await customers.upsert_features(
                session, [(k, r, now) for k, r in zip(keys, rows, strict=True)]
            )
        scorer = Scorer(registry)
        activities = ScoringActivities(db, scorer)
        env = ActivityEnvironment()
        info = scorer.model("churn")
        booster = xgb.Booster(model_file=str(info.model_path))
        one_thread = xgb.Booster(model_file=str(info.model_path))
        one_thread.set_param({"nthread": 1})
        matrix = booster_matrix(info, population.iloc[:calls])
        timings: dict[str, list[float]] = {
            "step": [],
            "activity": [],
            "raw": [],
            "raw_one_thread": [],
        }

        async def timed(name: str, call: Callable[[], Awaitable[object]]) -> None:
            started = time.perf_counter()
            await call()
            timings[name].append((time.perf_counter() - started) * 1000)

        def raw(name: str, b: xgb.Booster, row: np.ndarray) -> None:
            started = time.perf_counter()
            b.inplace_predict(row)
            timings[name].append((time.perf_counter() - started) * 1000)

        try:
            # One warm-up of each: the first call loads the model and the activity's imports.
            warm = ScoreInput("bench-warm", "score", "bench", keys[:1], ["churn"])
            await env.run(activities.score_customer, warm)
            for i, key in enumerate(keys):
                inp = ScoreInput(f"bench-{i}", "score", "bench", [key], ["churn"])
                row = matrix[i : i + 1]
                raw("raw", booster, row)
                raw("raw_one_thread", one_thread, row)
                await timed("step", partial(activities.score, inp, datetime.now(UTC)))
                await timed("activity", partial(env.run, activities.score_customer, inp))
        finally:
            await db.dispose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="customers scored")
    args = parser.parse_args()

    started = time.perf_counter()
    transactions = load_transactions()
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        info = registry.register(
            train_model(transactions, TrainConfig(bootstrap_resamples=0)), promoted_by="bench"
        )
        print(f"trained {info.version} in {time.perf_counter() - started:.1f} s", flush=True)
        # 100,000 rows: the 23,570 customers' features now, resampled with a seed.
        features = rfm_features(transactions, date(1998, 6, 30))
        picks = np.random.default_rng(0).integers(0, len(features), max(BATCHES))
        population = features.iloc[picks].reset_index(drop=True)

        batches = throughput(registry, population)
        timings = asyncio.run(latency(registry, population, args.calls))
    p50 = {name: float(np.percentile(t, 50)) for name, t in timings.items()}
    p99 = {name: float(np.percentile(t, 99)) for name, t in timings.items()}
    for name, t in timings.items():
        print(f"{name:>15} over {len(t)} calls: p50 {p50[name]:.3f} ms, p99 {p99[name]:.3f} ms")
    ratio = min(b["ratio"] for b in batches if b["batch"] >= 1_000)
    result = {
        "bench": "scoring",
        "ratio": ratio,
        "target": TARGET,
        "p50_ms": round(p50["step"], 3),
        "p99_ms": round(p99["step"], 3),
        "p50_target_ms": P50_TARGET_MS,
        "p99_target_ms": P99_TARGET_MS,
        "raw_one_row_ms": round(p50["raw"], 3),
        "raw_one_row_p99_ms": round(p99["raw"], 3),
        "raw_one_row_one_thread_ms": round(p50["raw_one_thread"], 3),
        "step_p50_ratio": round(p50["step"] / p50["raw"], 2),
        "step_p50_ratio_one_thread": round(p50["step"] / p50["raw_one_thread"], 2),
        "activity_p50_ms": round(p50["activity"], 3),
        "activity_p99_ms": round(p99["activity"], 3),
        "ratio_contrib": min(b["ratio_contrib"] for b in batches),
        "calls": len(timings["step"]),
        "batches": batches,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
