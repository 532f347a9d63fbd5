"""Per-customer features from the customer's own event log.

The values of :data:`scoring.features.FEATURE_NAMES` follow ``scoring.features.rfm_features``
exactly (purchases on one day count as one purchase day), so the churn model scores from
them; they are computed as of the day of the customer's latest event, which depends only on
the events and not on the order they arrived in. That is what makes the incremental update
(recompute each customer a batch touched, from their events) equal a full recompute.

Beyond the model's inputs: ``events_total``, ``events_30d``, ``count:<event>`` and
``days_since:<event>`` (days from the last event of that name to ``as_of``).

Stored features are true on the day of the customer's latest event, and every reader needs
them true on its own day: :func:`features_as_of` is that one step, used by the campaign's
score step, preview and (per row where a window moves) the cohort evaluator. Day counts grow
by the days elapsed; windowed counts are re-counted from the per-day activity of the longest
window, stored beside the features (:class:`RecentDays`): no event after ``as_of`` exists,
so a window ending later holds a subset of those days.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from cohortflow.events.rollup import Rollup, tally
from scoring.features import FEATURE_NAMES, RECENT_WINDOW_DAYS

ACTIVITY_WINDOW_DAYS = 30
# Feature keys whose value grows by one a day while nothing happens (aged by evaluators).
DAY_COUNTERS: tuple[str, ...] = ("recency_days", "age_days")
DAYS_SINCE_PREFIX = "days_since:"
# The windowed features and their windows in days: what ``windowed`` re-counts.
WINDOWS: dict[str, int] = {
    "events_30d": ACTIVITY_WINDOW_DAYS,
    "purchases_90d": RECENT_WINDOW_DAYS,
    "monetary_90d": RECENT_WINDOW_DAYS,
}
COUNT_PREFIX = "count:"


@dataclass(frozen=True)
class FeatureEvent:
    """The parts of a stored event that features read."""

    type: str
    event: str
    occurred_at: datetime
    properties: Mapping[str, Any]


@dataclass(frozen=True)
class RecentDays:
    """A customer's activity per UTC day in the windows before ``as_of``: purchase days
    (amount, items) in the last :data:`RECENT_WINDOW_DAYS`, track events per day in the last
    :data:`ACTIVITY_WINDOW_DAYS`. Stored as JSON (:meth:`to_json`) beside the features."""

    purchases: dict[date, tuple[float, float]] = field(default_factory=dict)
    events: dict[date, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The stored form: ISO days as keys."""
        return {
            "purchases": {d.isoformat(): list(v) for d, v in sorted(self.purchases.items())},
            "events": {d.isoformat(): n for d, n in sorted(self.events.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecentDays:
        """Read :meth:`to_json`'s form back."""
        purchases = data.get("purchases") or {}
        events = data.get("events") or {}
        return cls(
            {date.fromisoformat(d): (float(v[0]), float(v[1])) for d, v in purchases.items()},
            {date.fromisoformat(d): int(n) for d, n in events.items()},
        )


def aged(name: str) -> bool:
    """Whether feature ``name`` counts days up to ``as_of`` (it grows one a day)."""
    return name in DAY_COUNTERS or name.startswith(DAYS_SINCE_PREFIX)


def features_as_of(
    stored: Mapping[str, float | None], as_of: date, recent: RecentDays | None, at: date
) -> dict[str, float | None]:
    """The features of a customer as of day ``at``, from those stored as of ``as_of``.

    Day counts grow by the days between; ``purchases_90d``, ``monetary_90d`` and
    ``events_30d`` are re-counted over the window ending ``at`` from ``recent``. Without
    ``recent`` (rows stored before it was kept, or bulk-generated ones) a window that has
    passed entirely is zero and one still partly open keeps its stored value.
    """
    elapsed = (at - as_of).days
    if elapsed < 0:
        raise ValueError(f"features as of {as_of} cannot be read as of the earlier {at}")
    features = dict(stored)
    if elapsed == 0:
        return features
    for name, value in stored.items():
        if value is not None and aged(name):
            features[name] = value + elapsed
    features |= windowed(stored, recent, at, elapsed)
    return features


def windowed(
    stored: Mapping[str, float | None], recent: RecentDays | None, at: date, elapsed: int
) -> dict[str, float | None]:
    """The windowed features over the windows ending ``at``, ``elapsed`` days after the
    stored ones' (see :func:`features_as_of`)."""
    found: dict[str, float | None] = {}
    if stored.get("events_30d") is not None:
        if elapsed >= ACTIVITY_WINDOW_DAYS:
            found["events_30d"] = 0.0
        elif recent is not None:
            start = at - timedelta(days=ACTIVITY_WINDOW_DAYS)
            found["events_30d"] = float(sum(n for d, n in recent.events.items() if d > start))
    if stored.get("purchases_90d") is None:  # no purchase ever: the RFM features are missing
        return found
    if elapsed >= RECENT_WINDOW_DAYS:
        found["purchases_90d"], found["monetary_90d"] = 0.0, 0.0
    elif recent is not None:
        start = at - timedelta(days=RECENT_WINDOW_DAYS)
        kept = [amount for d, (amount, _) in recent.purchases.items() if d > start]
        found["purchases_90d"], found["monetary_90d"] = float(len(kept)), float(sum(kept))
    return found


def as_of_instant(day: date) -> datetime:
    """The instant stored as ``as_of`` for features computed as of ``day`` (its midnight UTC)."""
    return datetime.combine(day, time(), tzinfo=UTC)


@dataclass(frozen=True)
class ComputedFeatures:
    """One customer's features, the day they are true on, and the days that re-window them."""

    features: dict[str, float | None]
    as_of: date
    recent: RecentDays


def compute_features(
    events: Iterable[FeatureEvent], rollup: Rollup | None = None
) -> ComputedFeatures:
    """Features of one customer as of the day of their latest event, starting from the
    ``rollup`` of their purged events if any; raises ValueError without events.

    Only ``track`` events count (an ``identify`` is not behaviour).
    """
    found = tally(events, rollup)
    days, purchase_days = found.days, found.purchase_days
    ends = [*days, *([rollup.last_day] if rollup and rollup.last_day else [])]
    if not ends:
        raise ValueError("no track events")
    as_of = max(ends)
    features: dict[str, float | None] = dict.fromkeys(FEATURE_NAMES)
    features |= _rfm(purchase_days, as_of, rollup or Rollup())
    features["events_total"] = float(len(days) + (rollup.track_events if rollup else 0))
    window_start = as_of - timedelta(days=ACTIVITY_WINDOW_DAYS)
    features["events_30d"] = float(sum(1 for d in days if d > window_start))
    for name in sorted(found.counts):
        features[COUNT_PREFIX + name] = float(found.counts[name])
        features[DAYS_SINCE_PREFIX + name] = float((as_of - found.last_days[name]).days)
    return ComputedFeatures(features, as_of, _recent(purchase_days, days, as_of))


def _recent(
    purchase_days: Mapping[date, tuple[float, float]], days: list[date], as_of: date
) -> RecentDays:
    purchase_start = as_of - timedelta(days=RECENT_WINDOW_DAYS)
    event_start = as_of - timedelta(days=ACTIVITY_WINDOW_DAYS)
    events: dict[date, int] = {}
    for day in days:
        if day > event_start:
            events[day] = events.get(day, 0) + 1
    return RecentDays(
        {d: v for d, v in purchase_days.items() if d > purchase_start},
        events,
    )


def _rfm(
    purchase_days: Mapping[date, tuple[float, float]], as_of: date, rollup: Rollup
) -> dict[str, float | None]:
    """``rfm_features`` for one customer over their events and the rollup of those purged;
    all None (missing) without a purchase."""
    count = len(purchase_days) + rollup.purchase_days
    if not count:
        return {}
    ends = [*purchase_days, *(d for d in (rollup.first_purchase, rollup.last_purchase) if d)]
    first, last = min(ends), max(ends)
    total = sum(amount for amount, _ in purchase_days.values()) + rollup.monetary_total
    items = sum(i for _, i in purchase_days.values()) + rollup.items_total
    recent_start = as_of - timedelta(days=RECENT_WINDOW_DAYS)
    recent = [amount for day, (amount, _) in purchase_days.items() if day > recent_start]
    frequency = count - 1
    tenure = (last - first).days
    return {
        "recency_days": float((as_of - last).days),
        "frequency": float(frequency),
        "tenure_days": float(tenure),
        "age_days": float((as_of - first).days),
        "monetary_total": total,
        "monetary_avg": total / count,
        "cds_total": items,
        "purchases_90d": float(len(recent)),
        "monetary_90d": float(sum(recent)),
        "mean_interpurchase_days": tenure / frequency if frequency else math.nan,
    }
