"""The win-back half of the demo: CDNOW customers through ``examples/winback_sensitive.yaml``.

Loads the shipped transaction log, trains and registers a churn model if there is none,
stores a deterministic sample of customers with their features, time zones and seeded
consent, and defines the entry cohort: customers who have spent and whose churn score is at
least the sample's median. The product's evaluator then decides who is in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from cohortflow.demo.launching import Launch, save_version
from cohortflow.demo.options import (
    CHANNEL,
    DEMO_AS_OF,
    PURPOSE,
    WINBACK_SPEC,
    DemoOptions,
    example_spec,
    seeded,
    timezone_for,
)
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec, load_spec_file
from cohortflow.storage import consent, customers
from cohortflow.storage.db import Database
from scoring.cdnow import load_transactions
from scoring.features import FEATURE_NAMES, rfm_features
from scoring.registry import ModelRegistry
from scoring.scorer import Scorer
from scoring.train import TrainConfig, train_churn

Progress = Callable[[str], None]
ROUTE_STEP = "route"


@dataclass
class WinbackLaunch(Launch):
    """The win-back's launch, with where its model and customers came from."""

    model_version: str = ""
    trained: bool = False
    sample_size: int = 0


def at_risk_cohort(cohort_id: str, churn_at_least: float) -> dict[str, Any]:
    """The win-back's entry cohort: paying customers likely to lapse."""
    # Rounded down: the customer at the cut, scored again by the evaluator, stays in.
    cut = math.floor(churn_at_least * 1e6) / 1e6
    return {
        "cohort_id": cohort_id,
        "name": "lapsing paying customers",
        "description": "Spent before, churn score in the riskier half of the demo's sample.",
        "rule": {
            "all": [
                {"score": "churn", "op": ">=", "value": cut},
                {"feature": "monetary_total", "op": ">", "value": 0},
            ]
        },
    }


def sample_customers(customer_ids: list[str], n: int) -> list[str]:
    """A deterministic sample: the same ids on every machine for the same n."""
    ranked = sorted(customer_ids, key=lambda c: hashlib.sha256(f"demo:{c}".encode()).digest())
    return sorted(ranked[:n])


def with_thresholds(spec: CampaignSpec, churn: float, monetary: float) -> CampaignSpec:
    """The spec with its approval route's thresholds set for this sample."""
    document = spec.model_dump(mode="json", exclude_defaults=False)
    for step in document["steps"]:
        if step["id"] == ROUTE_STEP:
            for comparison in step["rules"][0]["all"]:
                is_score = comparison["score"] is not None
                comparison["value"] = round(churn if is_score else monetary, 4)
    return CampaignSpec.model_validate(document)


async def prepare_winback(
    settings: Settings, db: Database, options: DemoOptions, progress: Progress
) -> WinbackLaunch:
    """Data, model, customers, consent, entry cohort and spec version of the win-back."""
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
    # The log's end is the win-back's "now": its features are stored as true today (the log
    # shifted to end today), so the campaign, which reads them as of its own day, sees them
    # as the model was trained to.
    as_of = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), tzinfo=UTC)
    progress(f"storing {len(sample)} CDNOW customers, their features and consent")
    async with db.transaction() as session:
        known = {k for k in keys if await customers.get_customer(session, k) is not None}
        await customers.upsert_customers(
            session,
            [
                customers.CustomerRecord(
                    customer_key=k,
                    source_id=c,
                    email=f"customer{c}@example.com",
                    timezone=timezone_for(c, options),
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
                (k, CHANNEL, PURPOSE, not seeded("optout", c, options.opt_out_share))
                for k, c in zip(keys, sample, strict=True)
                if k not in known
            ],
            source="demo-seed",
            evidence=consent.ConsentEvidence(how="seed", by="demo"),
        )

    entry_cut = float(np.quantile(scores, options.entry_quantile))
    entering = scores >= entry_cut
    monetary = frame["monetary_total"].to_numpy(dtype=float)[entering]
    spec = with_thresholds(
        load_spec_file(example_spec(WINBACK_SPEC)),
        churn=float(np.quantile(scores[entering], options.approval_churn_quantile)),
        monetary=float(np.nanquantile(monetary, options.approval_value_quantile)),
    )
    version = await save_version(db, spec)
    progress(
        f"cohort {spec.entry_cohort}: churn ≥ {entry_cut:.3f} (the sample's "
        f"{options.entry_quantile:.0%} quantile) and spent before; {spec.campaign_id} v{version}"
    )
    return WinbackLaunch(
        spec=spec,
        version=version,
        cohort=at_risk_cohort(spec.entry_cohort, entry_cut),
        model_version=champion.version,
        trained=trained,
        sample_size=len(sample),
    )
