"""The demo job: CDNOW customers through a real win-back campaign on the embedded stack.

Loads the shipped transaction log, computes RFM features, trains and registers a churn
model, stores a deterministic sample of customers with seeded consent, evaluates a cohort
whose thresholds are quantiles of the sample, and launches one campaign per entrant.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from temporalio.client import Client

from cohortflow.ids import Pseudonymiser
from cohortflow.launcher import Entry, Launcher
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec, load_spec_file
from cohortflow.storage import campaigns, consent, customers
from cohortflow.storage.db import Database
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, rfm_features
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, train_churn
from workflows.messages import SUMMARY_STATES, CampaignState

DEMO_COHORT = "demo_lapsing"
DEMO_AS_OF = date(1998, 6, 30)  # the end of the log is the demo's "now"
CHANNEL, PURPOSE = "email", "marketing"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    """How big the demo is and how it behaves."""

    customers: int = 300
    wait_seconds: float = 5.0
    opt_out_share: float = 0.1
    entry_quantile: float = 0.5
    # Every entrant is high risk (the churn test keeps the rule honest if the cohort changes);
    # the top fifth of them by spend are high value and need an operator's approval.
    approval_churn_quantile: float = 0.0
    approval_value_quantile: float = 0.8
    settle_timeout_seconds: float = 600.0


@dataclass
class Prepared:
    """What the data step produced: the spec version to launch and who enters."""

    spec: CampaignSpec
    version: int
    entrants: list[str]
    model_version: str
    trained: bool
    sample_size: int


@dataclass
class DemoSummary:
    """The demo's outcome, counted from Temporal visibility."""

    counts: dict[str, int]
    entered: int
    launched_new: int
    already_launched: int
    campaign_id: str
    version: int
    model_version: str
    wall_seconds: float
    temporal_address: str
    namespace: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object: one key per state, ``entered`` and where to look."""
        return {
            **self.counts,
            "entered": self.entered,
            "launched_new": self.launched_new,
            "already_launched": self.already_launched,
            "campaign_id": self.campaign_id,
            "campaign_version": self.version,
            "model_version": self.model_version,
            "wall_seconds": round(self.wall_seconds, 2),
            "temporal_address": self.temporal_address,
            "namespace": self.namespace,
            **self.extra,
        }


def demo_spec_path() -> Path:
    """The shipped demo campaign spec."""
    return Path(str(resources.files("cohortflow") / "examples" / "demo_winback.yaml"))


def sample_customers(customer_ids: list[str], n: int) -> list[str]:
    """A deterministic sample: the same ids on every machine for the same n."""
    ranked = sorted(customer_ids, key=lambda c: hashlib.sha256(f"demo:{c}".encode()).digest())
    return sorted(ranked[:n])


def opted_out(customer_id: str, share: float) -> bool:
    """A seeded share of demo customers has opted out of e-mail marketing."""
    bucket = int(hashlib.sha256(f"optout:{customer_id}".encode()).hexdigest()[:8], 16)
    return bucket % 10_000 < share * 10_000


def with_thresholds(spec: CampaignSpec, churn: float, monetary: float, wait: float) -> CampaignSpec:
    """The demo spec with the route thresholds and the wait set for this sample."""
    document = spec.model_dump(mode="json", exclude_defaults=False)
    for step in document["steps"]:
        if step["id"] == "route":
            for comparison in step["rules"][0]["all"]:
                is_score = comparison["score"] is not None
                comparison["value"] = round(churn if is_score else monetary, 4)
        if step["type"] == "wait":
            step["duration"] = f"PT{wait:g}S"
    return CampaignSpec.model_validate(document)


async def prepare(
    settings: Settings, db: Database, options: DemoOptions, progress: Progress
) -> Prepared:
    """Data, model, customers, consent, cohort and spec: everything before launching."""
    progress("loading the CDNOW transaction log")
    transactions = await asyncio.to_thread(load_transactions)
    registry = ModelRegistry(settings.resolved_models_dir)
    champion = registry.champion("churn")
    trained = champion is None
    if champion is None:
        progress("training the churn model (XGBoost)")
        # The bootstrap intervals belong to `cohortflow model train`; the demo needs the model.
        config = TrainConfig(bootstrap_resamples=0)
        model = await asyncio.to_thread(train_churn, transactions, config, progress)
        champion = registry.register(model, promoted_by="demo", make_champion=True)
    progress(f"champion churn model {champion.version}")

    features = await asyncio.to_thread(rfm_features, transactions, DEMO_AS_OF)
    sample = sample_customers(list(features.index.astype(str)), options.customers)
    frame = features.loc[sample, list(FEATURE_NAMES)]
    rows: list[dict[str, float | None]] = [
        {k: (None if pd.isna(v) else float(v)) for k, v in r.items()}
        for r in frame.to_dict(orient="records")
    ]
    scores = np.asarray(Scorer(registry).score("churn", rows).scores, dtype=float)

    pseudonymiser = Pseudonymiser.from_settings(settings)
    keys = [pseudonymiser.customer_key(c) for c in sample]
    as_of = datetime.combine(DEMO_AS_OF, datetime.min.time(), tzinfo=UTC)
    progress(f"storing {len(sample)} customers, their features and consent")
    async with db.transaction() as session:
        known = {k for k in keys if await customers.get_customer(session, k) is not None}
        await customers.upsert_customers(
            session,
            [
                customers.CustomerRecord(
                    customer_key=k,
                    source_id=c,
                    email=f"customer{c}@example.com",
                    timezone="America/New_York",
                    attributes={"source": "cdnow"},
                )
                for k, c in zip(keys, sample, strict=True)
            ],
        )
        await customers.upsert_features(
            session, [(k, row, as_of) for k, row in zip(keys, rows, strict=True)]
        )
        # Seed consent only for customers new to this store, so an operator's change sticks.
        await consent.bulk_set_consent(
            session,
            [
                (k, CHANNEL, PURPOSE, not opted_out(c, options.opt_out_share))
                for k, c in zip(keys, sample, strict=True)
                if k not in known
            ],
            source="demo-seed",
        )

    entry_cut = float(np.quantile(scores, options.entry_quantile))
    entering = scores >= entry_cut
    entrants = [k for k, inside in zip(keys, entering, strict=True) if inside]
    monetary = frame["monetary_total"].to_numpy(dtype=float)[entering]
    spec = with_thresholds(
        load_spec_file(demo_spec_path()),
        churn=float(np.quantile(scores[entering], options.approval_churn_quantile)),
        monetary=float(np.nanquantile(monetary, options.approval_value_quantile)),
        wait=options.wait_seconds,
    )
    async with db.transaction() as session:
        version, _ = await campaigns.save_spec_version(
            session, spec.campaign_id, spec.model_dump(mode="json"), created_by="demo"
        )
    progress(
        f"cohort {DEMO_COHORT}: {len(entrants)} of {len(sample)} customers have churn ≥ "
        f"{entry_cut:.3f} (the {options.entry_quantile:.0%} quantile); spec v{version}"
    )
    return Prepared(
        spec=spec,
        version=version,
        entrants=entrants,
        model_version=champion.version,
        trained=trained,
        sample_size=len(sample),
    )


async def launch_all(
    launcher: Launcher,
    prepared: Prepared,
    advance: Callable[[], None],
    concurrency: int = 16,
) -> int:
    """Launch every entrant, a bounded number at a time; returns how many were new."""
    gate = asyncio.Semaphore(concurrency)
    new = 0

    async def one(key: str) -> None:
        nonlocal new
        async with gate:
            if await launcher.launch(prepared.spec, prepared.version, Entry(key, DEMO_COHORT)):
                new += 1
            advance()

    await asyncio.gather(*(one(k) for k in prepared.entrants))
    return new


async def count_states(client: Client, campaign_id: str) -> tuple[dict[str, int], int]:
    """Per-state counts and the total, from Temporal visibility."""
    base = f'CampaignId = "{campaign_id}"'
    total = (await client.count_workflows(base)).count
    counts = {}
    for state in SUMMARY_STATES:
        query = f'{base} AND CampaignState = "{state.value}"'
        counts[state.value] = (await client.count_workflows(query)).count
    return counts, total


async def wait_until_settled(
    client: Client, campaign_id: str, expected: int, limit_seconds: float, on_poll: Progress
) -> tuple[dict[str, int], int]:
    """Poll visibility until every campaign is terminal or awaiting approval."""
    deadline = time.monotonic() + limit_seconds
    settled_states = {s.value for s in SUMMARY_STATES if s.terminal} | {
        CampaignState.AWAITING_APPROVAL.value
    }
    while True:
        counts, total = await count_states(client, campaign_id)
        settled = sum(v for k, v in counts.items() if k in settled_states)
        on_poll(f"{settled}/{max(total, expected)} settled")
        if total >= expected and settled == total:
            return counts, total
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {settled} of {total} campaigns settled in {limit_seconds:.0f}s"
            )
        await asyncio.sleep(1.0)
