"""Per-customer features from the customer's own event log.

The values of :data:`scoring.features.FEATURE_NAMES` follow ``scoring.features.rfm_features``
exactly (purchases on one day count as one purchase day), so the churn model scores from
them; they are computed as of the day of the customer's latest event, which depends only on
the events and not on the order they arrived in. That is what makes the incremental update
(recompute each customer a batch touched, from their events) equal a full recompute.

Beyond the model's inputs: ``events_total``, ``events_30d``, ``count:<event>`` and
``days_since:<event>`` (days from the last event of that name to ``as_of``). Day counts
grow with time; the cohort evaluator ages them to its own clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from scoring.features import FEATURE_NAMES, RECENT_WINDOW_DAYS

PURCHASE = "purchase"
ACTIVITY_WINDOW_DAYS = 30
# Feature keys whose value grows by one a day while nothing happens (aged by evaluators).
DAY_COUNTERS: tuple[str, ...] = ("recency_days", "age_days")
DAYS_SINCE_PREFIX = "days_since:"
COUNT_PREFIX = "count:"


@dataclass(frozen=True)
class FeatureEvent:
    """The parts of a stored event that features read."""

    type: str
    event: str
    occurred_at: datetime
    properties: Mapping[str, Any]


def as_of_instant(day: date) -> datetime:
    """The instant stored as ``as_of`` for features computed as of ``day`` (its midnight UTC)."""
    return datetime.combine(day, time(), tzinfo=UTC)


def compute_features(events: Iterable[FeatureEvent]) -> tuple[dict[str, float | None], date]:
    """Features of one customer and the day they are as of; raises ValueError without events.

    Only ``track`` events count (an ``identify`` is not behaviour).
    """
    purchase_days: dict[date, tuple[float, float]] = {}
    last_by_event: dict[str, date] = {}
    count_by_event: dict[str, int] = {}
    days: list[date] = []
    for e in events:
        if e.type != "track":
            continue
        day = e.occurred_at.astimezone(UTC).date()
        days.append(day)
        last_by_event[e.event] = max(day, last_by_event.get(e.event, day))
        count_by_event[e.event] = count_by_event.get(e.event, 0) + 1
        if e.event == PURCHASE:
            amount, items = purchase_days.get(day, (0.0, 0.0))
            purchase_days[day] = (
                amount + float(e.properties.get("amount", 0.0)),
                items + float(e.properties.get("quantity", 1)),
            )
    if not days:
        raise ValueError("no track events")
    as_of = max(days)
    features: dict[str, float | None] = dict.fromkeys(FEATURE_NAMES)
    features |= _rfm(purchase_days, as_of)
    features["events_total"] = float(len(days))
    window_start = as_of - timedelta(days=ACTIVITY_WINDOW_DAYS)
    features["events_30d"] = float(sum(1 for d in days if d > window_start))
    for name in sorted(count_by_event):
        features[COUNT_PREFIX + name] = float(count_by_event[name])
        features[DAYS_SINCE_PREFIX + name] = float((as_of - last_by_event[name]).days)
    return features, as_of


def _rfm(purchase_days: Mapping[date, tuple[float, float]], as_of: date) -> dict[str, float | None]:
    """``rfm_features`` for one customer; all None (missing) without a purchase."""
    if not purchase_days:
        return {}
    first, last = min(purchase_days), max(purchase_days)
    total = sum(amount for amount, _ in purchase_days.values())
    recent_start = as_of - timedelta(days=RECENT_WINDOW_DAYS)
    recent = [amount for day, (amount, _) in purchase_days.items() if day > recent_start]
    frequency = len(purchase_days) - 1
    tenure = (last - first).days
    return {
        "recency_days": float((as_of - last).days),
        "frequency": float(frequency),
        "tenure_days": float(tenure),
        "age_days": float((as_of - first).days),
        "monetary_total": total,
        "monetary_avg": total / len(purchase_days),
        "cds_total": sum(items for _, items in purchase_days.values()),
        "purchases_90d": float(len(recent)),
        "monetary_90d": float(sum(recent)),
        "mean_interpurchase_days": tenure / frequency if frequency else math.nan,
    }
