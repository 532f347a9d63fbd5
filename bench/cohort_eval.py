"""Cohort evaluation at millions of customers, against the same rule as one DuckDB query.

The population is a feature snapshot as ``storage.feature_snapshot`` writes it (Parquet, one
column per feature), generated straight by DuckDB and registered in a fresh database:
writing millions of feature rows through SQL and exporting them takes longer than the
evaluation it prepares, and is not what is measured. Then, in the same run:

- ours: the product path's membership (``cohortflow.cohorts.evaluator.membership``): the
  rule compiled to one DuckDB query over the snapshot (``cohorts.compiled``), the customers
  changed since it through the numpy interpreter;
- baseline: what a user would write instead, the same rule (as of the same day, missing
  values matching nothing) as one DuckDB query over the same file, keys fetched;
- incremental: 10,000 customers' features rewritten through the operational copy, then
  ``evaluate`` for just them (stored entries and exits included);
- after changes: the full membership again, now the snapshot plus those 10,000 rows.

    python -m bench.cohort_eval                          # 1M customers
    python -m bench.cohort_eval --customers 10000000     # the issue's figure

Ends with one JSON line: bench, ratio (baseline time / ours, target >= 0.8), target,
peak_rss_mb (target < 4096), ours_s, baseline_s, customers, incremental_s and the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from cohortflow.cohorts.evaluator import evaluate, membership
from cohortflow.cohorts.rules import parse_cohort
from cohortflow.events.features import as_of_instant
from cohortflow.storage import cohorts, customers, feature_snapshot
from cohortflow.storage.db import Database, migrate

TARGET_RATIO = 0.8
RSS_TARGET_MB = 4096
TODAY = date(2026, 1, 1)
NOW = as_of_instant(TODAY)
SPAN_DAYS = 730
CHANGED = 10_000
COHORT = {
    "cohort_id": "bench_lapsing_valuable",
    "name": "Lapsing valuable customers",
    "rule": {
        "all": [
            {"feature": "recency_days", "op": ">=", "value": 60},
            {"feature": "monetary_total", "op": ">=", "value": 100},
            {
                "any": [
                    {"feature": "frequency", "op": ">=", "value": 2},
                    {"feature": "count:email_open", "op": ">=", "value": 3},
                ]
            },
            {"not": {"feature": "events_30d", "op": ">", "value": 5}},
        ]
    },
}
# Stored feature -> DuckDB expression drawing it (NULL: no purchase, so no RFM features).
_BUYER = "h % 5 <> 0"
_DRAWS = {
    "recency_days": f"CASE WHEN {_BUYER} THEN floor(random() * 300) END",
    "frequency": f"CASE WHEN {_BUYER} THEN floor(random() * 6) END",
    "monetary_total": f"CASE WHEN {_BUYER} THEN round(exp(3 + random() * 3), 2) END",
    "age_days": f"CASE WHEN {_BUYER} THEN floor(300 + random() * 400) END",
    "count:email_open": "CASE WHEN h % 3 <> 0 THEN floor(random() * 8) END",
    "count:page_view": "floor(1 + random() * 20)",
    "events_total": "floor(1 + random() * 30)",
    "events_30d": "floor(random() * 10)",
}


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_population(path: Path, count: int, seed: int) -> list[str]:
    """The snapshot file of ``count`` customers; returns the feature names by column."""
    names = sorted(_DRAWS)
    columns = ", ".join(f"{_DRAWS[n]}::DOUBLE AS f{i}" for i, n in enumerate(names))
    first_day = (TODAY - date(1970, 1, 1)).days - SPAN_DAYS
    with duckdb.connect() as con:
        con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
        con.execute(
            f"COPY (SELECT printf('k%039d', i) AS customer_key,"
            f" ({first_day} + floor(random() * {SPAN_DAYS}))::INTEGER AS as_of_day,"
            f" false AS has_recent, NULL::VARCHAR AS recent, {columns}"
            f" FROM (SELECT i, hash(i + {seed}) AS h FROM range({count}) t(i)))"
            f" TO '{path}' (FORMAT parquet)"
        )
    return names


def baseline(path: Path, names: list[str]) -> set[str]:
    """The rule as a user would write it in DuckDB over the snapshot, as of the same day:
    day counts aged, passed windows zero, a comparison with a missing value false."""
    c = {n: f"f{i}" for i, n in enumerate(names)}
    elapsed = f"({(TODAY - date(1970, 1, 1)).days} - as_of_day)"
    query = f"""
        SELECT customer_key FROM read_parquet('{path}')
        WHERE coalesce({c["recency_days"]} + {elapsed} >= 60, false)
          AND coalesce({c["monetary_total"]} >= 100, false)
          AND (coalesce({c["frequency"]} >= 2, false)
               OR coalesce({c["count:email_open"]} >= 3, false))
          AND NOT coalesce(
              CASE WHEN {elapsed} >= 30 THEN 0 ELSE {c["events_30d"]} END > 5, false)
    """
    with duckdb.connect() as con:
        # Keys fetched as one array, the fastest way out of DuckDB: so is ours.
        return set(con.execute(query).fetchnumpy()["customer_key"].tolist())


async def _change(db: Database, path: Path, names: list[str], seed: int) -> list[str]:
    """Rewrite ``CHANGED`` customers' features through the operational copy."""
    with duckdb.connect() as con:
        count = con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchone()
    total = int(count[0]) if count else 0
    rng = np.random.default_rng(seed)
    picked = sorted({f"k{int(i):039d}" for i in rng.choice(total, min(CHANGED, total), False)})
    rows = [
        (
            key,
            {
                "recency_days": float(rng.integers(0, 300)),
                "frequency": float(rng.integers(0, 6)),
                "monetary_total": float(rng.uniform(20, 400)),
                "count:email_open": float(rng.integers(0, 8)),
                "events_30d": float(rng.integers(0, 10)),
            },
            as_of_instant(TODAY - timedelta(days=int(rng.integers(0, 60)))),
        )
        for key in picked
    ]
    async with db.transaction() as session:
        await customers.upsert_features(session, rows)
    return picked


def _timed(timings: dict[str, list[float]], name: str, started: float) -> None:
    timings.setdefault(name, []).append(time.perf_counter() - started)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, time each path ``args.repeat`` times, check they agree; the figures."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    url = args.database_url or f"sqlite+aiosqlite:///{workdir}/bench.db"
    await migrate(url)
    db = Database(url)
    snapshots = workdir / "snapshots"
    snapshots.mkdir()
    timings: dict[str, list[float]] = {}
    try:
        started = time.perf_counter()
        snapshot_id = uuid.uuid4().hex
        path = snapshots / f"{snapshot_id}.parquet"
        names = await asyncio.to_thread(_write_population, path, args.customers, args.seed)
        await feature_snapshot.register(
            db, snapshots, snapshot_id, args.customers, names, through=None
        )
        setup = time.perf_counter() - started
        print(f"population: {args.customers} customers, {setup:.1f} s", file=sys.stderr)
        definition = parse_cohort(COHORT)
        async with db.transaction() as session:
            await cohorts.save_cohort(session, definition.cohort_id, COHORT)
        members: set[str] = set()
        expected: set[str] = set()
        for _ in range(args.repeat):
            t = time.perf_counter()
            members = await membership(db, definition, NOW, snapshots=snapshots)
            _timed(timings, "ours_s", t)
            t = time.perf_counter()
            expected = await asyncio.to_thread(baseline, path, names)
            _timed(timings, "baseline_s", t)
            if members != expected:
                raise SystemExit(f"members differ: ours {len(members)}, baseline {len(expected)}")
        changed = await _change(db, path, names, args.seed)
        t = time.perf_counter()
        incremental = await evaluate(db, definition, NOW, keys=changed, snapshots=snapshots)
        _timed(timings, "incremental_s", t)
        t = time.perf_counter()
        after = await membership(db, definition, NOW, snapshots=snapshots)
        _timed(timings, "after_changes_s", t)
        entered = set(incremental.diff.entered)
        if after - members - entered or entered - after:
            raise SystemExit("the incremental and the full evaluation disagree")
    finally:
        await db.dispose()
        shutil.rmtree(workdir, ignore_errors=True)
    figures = {name: float(np.median(values)) for name, values in timings.items()}
    ratio = figures["baseline_s"] / figures["ours_s"]
    print(
        f"cohort of {len(members)} / {args.customers} customers\n"
        f"  ours (membership from the snapshot):       {figures['ours_s']:.2f} s\n"
        f"  baseline (one DuckDB query, same file):    {figures['baseline_s']:.2f} s\n"
        f"  incremental ({len(changed)} changed, stored):    {figures['incremental_s']:.2f} s\n"
        f"  full again, snapshot + {len(changed)} changes:  {figures['after_changes_s']:.2f} s\n"
        f"  ratio baseline/ours: {ratio:.2f} (target >= {TARGET_RATIO}), "
        f"peak RSS {peak_rss_mb():.0f} MB (target < {RSS_TARGET_MB})",
        file=sys.stderr,
    )
    return {
        "bench": "cohort_eval",
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_target_mb": RSS_TARGET_MB,
        **{k: round(v, 3) for k, v in figures.items()},
        "customers": args.customers,
        "members": len(members),
        "changed": len(changed),
        "incremental_target_s": 1.0,
        "setup_s": round(setup, 1),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
