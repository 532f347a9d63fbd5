"""Cohort evaluation over a synthetic population, against a vectorised pandas baseline.

Both compute the membership of the same cohort over the same stored features, in the same
run, and must agree. Ours is the product path (``cohortflow.cohorts.evaluator.evaluate``):
the database extracts only the features the rule names, numpy applies the rule, and the
difference with the stored members is computed (the steady-state figure: nothing changed)
and, the first time, stored as entries (the cold figure). The baseline reads every feature
vector, parses the JSON in Python, builds a DataFrame and applies the same rule with pandas.

    python -m bench.cohort_eval                        # 200k customers, about 2 minutes
    python -m bench.cohort_eval --customers 1000000    # the full figure (10M events)

Ends with one JSON line: bench, ratio (baseline time / our time, target >= 0.5),
peak_rss_mb (target < 4096) and the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, text

from cohortflow.cohorts.evaluator import evaluate, membership
from cohortflow.cohorts.rules import parse_cohort
from cohortflow.events.synth import SPAN_DAYS, START, generate, store
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage import cohorts
from cohortflow.storage.db import Database, migrate

TARGET_RATIO = 0.5
RSS_TARGET_MB = 4096
NOW = datetime.combine(START, datetime.min.time(), tzinfo=UTC) + timedelta(days=SPAN_DAYS)
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


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline_frame(connection: Connection) -> pd.DataFrame:
    rows = connection.execute(
        text("SELECT customer_key, features, as_of FROM customer_features")
    ).all()
    records = [json.loads(f) if isinstance(f, str) else f for _, f, _ in rows]
    frame = pd.DataFrame.from_records(
        records,
        columns=["recency_days", "monetary_total", "frequency", "count:email_open", "events_30d"],
    ).astype("float64")
    frame["customer_key"] = [r[0] for r in rows]
    frame["as_of"] = pd.to_datetime([r[2] for r in rows], utc=True)
    return frame


async def baseline(db: Database) -> set[str]:
    """The same membership, computed the pandas way from whole feature vectors."""
    async with db.engine.connect() as connection:
        frame = await connection.run_sync(_baseline_frame)
    aged = (pd.Timestamp(NOW.date(), tz="UTC") - frame["as_of"].dt.normalize()).dt.days
    recency = frame["recency_days"] + aged
    mask = (
        (recency >= 60)
        & (frame["monetary_total"] >= 100)
        & ((frame["frequency"] >= 2) | (frame["count:email_open"] >= 3))
        & ~(frame["events_30d"] > 5)
    )
    return set(frame.loc[mask.to_numpy(), "customer_key"])


def _events(args: argparse.Namespace) -> int:
    return int(args.events or 10 * args.customers)


def _synth(url: str, customers: int, events: int, seed: int) -> None:
    """Generate and store the population (run in a child process)."""

    async def run() -> None:
        db = Database(url)
        try:
            data = generate(customers, events or 10 * customers, seed)
            await store(db, data, Pseudonymiser(b"bench-key-0123456789"), with_events=False)
        finally:
            await db.dispose()

    asyncio.run(run())


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = None if args.database_url else tempfile.mkdtemp(prefix="bench-cohort-")
    url = args.database_url or f"sqlite+aiosqlite:///{workdir}/bench.db"
    await migrate(url)
    db = Database(url)
    try:
        started = time.perf_counter()
        # In a child process, so this process's peak memory is the evaluations' alone.
        child = multiprocessing.get_context("spawn").Process(
            target=_synth, args=(url, args.customers, args.events, args.seed)
        )
        child.start()
        await asyncio.to_thread(child.join)
        if child.exitcode != 0:
            raise SystemExit(f"synth failed with exit code {child.exitcode}")
        setup = time.perf_counter() - started
        print(
            f"synth: {args.customers} customers, ~{_events(args)} events, {setup:.1f} s",
            file=sys.stderr,
        )
        definition = parse_cohort(COHORT)
        async with db.transaction() as session:
            await cohorts.save_cohort(session, definition.cohort_id, COHORT)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        cold = await evaluate(db, definition, NOW)
        timings["ours_cold_s"] = time.perf_counter() - t
        ours_steady: list[float] = []
        ours_compute: list[float] = []
        base: list[float] = []
        members: set[str] = set()
        expected: set[str] = set()
        for _ in range(args.repeat):
            t = time.perf_counter()
            steady = await evaluate(db, definition, NOW)
            ours_steady.append(time.perf_counter() - t)
            assert not steady.diff.entered and not steady.diff.exited
            t = time.perf_counter()
            members = await membership(db, definition, NOW)
            ours_compute.append(time.perf_counter() - t)
            t = time.perf_counter()
            expected = await baseline(db)
            base.append(time.perf_counter() - t)
        if members != expected or len(cold.diff.entered) != len(members):
            raise SystemExit(f"memberships differ: ours {len(members)}, baseline {len(expected)}")
        timings |= {
            "ours_s": float(np.median(ours_steady)),
            "ours_membership_only_s": float(np.median(ours_compute)),
            "baseline_s": float(np.median(base)),
        }
    finally:
        await db.dispose()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = timings["baseline_s"] / timings["ours_s"]
    print(
        f"cohort of {len(members)} / {args.customers} customers on {db.dialect}\n"
        f"  ours (steady evaluation, diff included): {timings['ours_s']:.2f} s\n"
        f"  ours (membership only):                  {timings['ours_membership_only_s']:.2f} s\n"
        f"  ours (first evaluation, stores entries): {timings['ours_cold_s']:.2f} s\n"
        f"  baseline (pandas over parsed JSON):      {timings['baseline_s']:.2f} s\n"
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
        "customers": args.customers,
        "events": _events(args),
        "members": len(members),
        "dialect": db.dialect,
        **{k: round(v, 3) for k, v in timings.items()},
        "setup_s": round(setup, 1),
        "synth_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=0, help="default: 10 per customer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
