"""What purged events leave behind: the per-customer totals the features still need.

Retention deletes events older than its cutoff (``storage.retention``), but a customer's
lifetime features (purchase days, first purchase, spend, items, event counts, the last day
of each event) reach back to their first event. Before events go, they are folded into the
customer's :class:`Rollup`, and :func:`~cohortflow.events.features.compute_features` starts
from it: the features after a purge equal those the whole log would give, as long as every
window (90 days at most) lies inside the period kept, which the minimum retention ensures.
Events are purged by whole UTC days, so no purchase day is split between the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date
from typing import Any

PURCHASE = "purchase"


@dataclass(frozen=True)
class Rollup:
    """Totals of one customer's purged ``track`` events."""

    purchase_days: int = 0
    first_purchase: date | None = None
    last_purchase: date | None = None
    monetary_total: float = 0.0
    items_total: float = 0.0
    track_events: int = 0
    last_day: date | None = None
    counts: dict[str, int] = field(default_factory=dict)
    last_days: dict[str, date] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The stored form (ISO days)."""
        return {
            "purchase_days": self.purchase_days,
            "first_purchase": _iso(self.first_purchase),
            "last_purchase": _iso(self.last_purchase),
            "monetary_total": self.monetary_total,
            "items_total": self.items_total,
            "track_events": self.track_events,
            "last_day": _iso(self.last_day),
            "counts": dict(sorted(self.counts.items())),
            "last_days": {k: v.isoformat() for k, v in sorted(self.last_days.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollup:
        """Read :meth:`to_json`'s form back."""
        return cls(
            int(data["purchase_days"]),
            _day(data["first_purchase"]),
            _day(data["last_purchase"]),
            float(data["monetary_total"]),
            float(data["items_total"]),
            int(data["track_events"]),
            _day(data["last_day"]),
            {k: int(v) for k, v in data["counts"].items()},
            {k: date.fromisoformat(v) for k, v in data["last_days"].items()},
        )


def _iso(day: date | None) -> str | None:
    return None if day is None else day.isoformat()


def _day(text: str | None) -> date | None:
    return None if text is None else date.fromisoformat(text)


def _earliest(a: date | None, b: date) -> date:
    return b if a is None else min(a, b)


def _latest(a: date | None, b: date) -> date:
    return b if a is None else max(a, b)


@dataclass(frozen=True)
class Tally:
    """One pass over ``track`` events: their days in order, each purchase day's (amount,
    items), and per event name its count and last day, on top of a rollup's."""

    days: list[date]
    purchase_days: dict[date, tuple[float, float]]
    counts: dict[str, int]
    last_days: dict[str, date]


def tally(events: Iterable[Any], rollup: Rollup | None = None) -> Tally:
    """Tally ``events`` (``FeatureEvent``-shaped: type, event, occurred_at, properties); the
    one reading of events that the features and the rollups share."""
    found = Tally(
        [], {}, dict(rollup.counts) if rollup else {}, dict(rollup.last_days) if rollup else {}
    )
    for e in events:
        if e.type != "track":
            continue
        day = e.occurred_at.astimezone(UTC).date()
        found.days.append(day)
        found.counts[e.event] = found.counts.get(e.event, 0) + 1
        found.last_days[e.event] = _latest(found.last_days.get(e.event), day)
        if e.event == PURCHASE:
            amount, items = found.purchase_days.get(day, (0.0, 0.0))
            found.purchase_days[day] = (
                amount + float(e.properties.get("amount", 0.0)),
                items + float(e.properties.get("quantity", 1)),
            )
    return found


def fold(rollup: Rollup | None, events: Iterable[Any]) -> Rollup:
    """``rollup`` with ``events`` added; only ``track`` events count, as in the features."""
    folded = rollup or Rollup()
    t = tally(events, folded)
    folded = replace(
        folded,
        track_events=folded.track_events + len(t.days),
        last_day=max([*t.days, *([folded.last_day] if folded.last_day else [])], default=None),
        counts=t.counts,
        last_days=t.last_days,
    )
    days = t.purchase_days
    if not days:
        return folded
    return replace(
        folded,
        purchase_days=folded.purchase_days + len(days),
        first_purchase=_earliest(folded.first_purchase, min(days)),
        last_purchase=_latest(folded.last_purchase, max(days)),
        monetary_total=folded.monetary_total + sum(a for a, _ in days.values()),
        items_total=folded.items_total + sum(i for _, i in days.values()),
    )
