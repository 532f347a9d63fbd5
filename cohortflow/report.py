"""A campaign's outcome by holdout arm: entered, completed, conversions and the uplift.

Arms and ends come from the audit trail (``variant_assigned``, ``finished``). Conversions
are the customers with the spec's conversion event within its window after they entered,
counted from ingested events (``storage.events.count_events``) when that store exists;
otherwise from the ``converted`` rows campaigns recorded while running, which miss
conversions after a campaign ended, and the report says so.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.spec import parse_duration
from cohortflow.storage.tables import AuditRow, CampaignEntry

Z_95 = 1.959963984540054
CountEvents = Callable[
    [AsyncSession, Sequence[str], str, datetime, datetime], Awaitable[dict[str, int]]
]


@dataclass
class Arm:
    """One arm's counts."""

    entered: int = 0
    completed: int = 0
    converted: int = 0

    @property
    def rate(self) -> float:
        """Conversion rate (0 when nobody entered)."""
        return self.converted / self.entered if self.entered else 0.0


@dataclass
class Uplift:
    """Treatment minus control conversion rate with a 95% interval (Newcombe's method 10)."""

    difference: float
    low: float
    high: float


@dataclass
class CampaignReport:
    """What ``cohortflow campaign report`` prints."""

    campaign_id: str
    entered: int
    states: dict[str, int]
    arms: dict[str, Arm]
    conversion_event: str
    conversion_source: str  # "events" | "audit" | "" (no goal)
    uplift: Uplift | None
    notes: list[str] = field(default_factory=list)


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(x1: int, n1: int, x2: int, n2: int, z: float = Z_95) -> Uplift:
    """p1 - p2 with Newcombe's hybrid score interval: well-behaved at 0 and 1 and with small
    arms, where the textbook Wald interval collapses to a point or leaves [-1, 1]."""
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Uplift(difference, low, high)


def load_count_events() -> CountEvents | None:
    """``storage.events.count_events`` when this build has the event store, else None."""
    try:
        module = importlib.import_module("cohortflow.storage.events")
    except ImportError:
        return None
    found = getattr(module, "count_events", None)
    return cast(CountEvents, found) if callable(found) else None


async def build_report(
    session: AsyncSession,
    campaign_id: str,
    spec: dict[str, Any],
    count_events: CountEvents | None,
) -> CampaignReport:
    """Count a campaign's entries, ends and conversions by arm."""
    entries = list(
        await session.execute(
            select(
                CampaignEntry.workflow_id, CampaignEntry.customer_key, CampaignEntry.launched_at
            ).where(CampaignEntry.campaign_id == campaign_id)
        )
    )
    rows = list(
        await session.execute(
            select(AuditRow.workflow_id, AuditRow.kind, AuditRow.payload).where(
                AuditRow.campaign_id == campaign_id,
                AuditRow.kind.in_(("variant_assigned", "finished", "converted")),
            )
        )
    )
    variant: dict[str, str] = {}
    ended: dict[str, str] = {}
    converted_rows: set[str] = set()
    for workflow_id, kind, payload in rows:
        data = json.loads(payload)
        if kind == "variant_assigned":
            variant[workflow_id] = str(data.get("variant", ""))
        elif kind == "finished":
            ended[workflow_id] = str(data.get("state", ""))
            variant.setdefault(workflow_id, str(data.get("variant") or ""))
        else:
            converted_rows.add(workflow_id)
    notes: list[str] = []
    arms: dict[str, Arm] = {}
    states: dict[str, int] = {}
    for workflow_id, _key, _at in entries:
        arm = arms.setdefault(variant.get(workflow_id) or "unrecorded", Arm())
        arm.entered += 1
        state = ended.get(workflow_id, "running")
        states[state] = states.get(state, 0) + 1
        arm.completed += state == "completed"
    goal = spec.get("conversion") or {}
    event = str(goal.get("event", ""))
    source = ""
    if event:
        converted, source = await _conversions(
            session, entries, event, parse_duration(str(goal.get("window", "P14D"))), count_events
        )
        if source == "audit":
            converted |= converted_rows
            notes.append(
                "conversions from the audit trail (the event store is not available): "
                "only those seen while a campaign ran"
            )
        for workflow_id, _key, _at in entries:
            if workflow_id in converted:
                arms[variant.get(workflow_id) or "unrecorded"].converted += 1
    else:
        notes.append("the spec has no conversion goal: no conversions or uplift")
    uplift = None
    if event and "treatment" in arms and "control" in arms:
        t, c = arms["treatment"], arms["control"]
        uplift = newcombe(t.converted, t.entered, c.converted, c.entered)
    elif event:
        notes.append("uplift needs both a treatment and a control arm")
    return CampaignReport(campaign_id, len(entries), states, arms, event, source, uplift, notes)


async def _conversions(
    session: AsyncSession,
    entries: list[Any],
    event: str,
    window: timedelta,
    count_events: CountEvents | None,
) -> tuple[set[str], str]:
    """Workflows whose customer had ``event`` within ``window`` of entering."""
    if count_events is None:
        return set(), "audit"
    converted: set[str] = set()
    # One query per entry day keeps each customer's window close to their own entry.
    by_day: dict[Any, list[tuple[str, str, datetime]]] = {}
    for workflow_id, key, at in entries:
        by_day.setdefault(at.date(), []).append((workflow_id, key, at))
    for group in by_day.values():
        start = min(at for _, _, at in group)
        end = max(at for _, _, at in group) + window
        counts = await count_events(session, [k for _, k, _ in group], event, start, end)
        converted |= {w for w, k, _ in group if counts.get(k, 0) > 0}
    return converted, "events"


def render(report: CampaignReport) -> list[str]:
    """The report as lines of text."""
    lines = [
        f"campaign {report.campaign_id}: {report.entered} entered",
        "states: " + (", ".join(f"{k} {v}" for k, v in sorted(report.states.items())) or "none"),
    ]
    header = f"{'arm':<12}{'entered':>9}{'completed':>11}{'converted':>11}{'rate':>9}"
    lines.append(header)
    for name, arm in sorted(report.arms.items()):
        lines.append(
            f"{name:<12}{arm.entered:>9}{arm.completed:>11}{arm.converted:>11}{arm.rate:>9.1%}"
        )
    if report.conversion_event:
        lines.append(f"conversion: {report.conversion_event} (from {report.conversion_source})")
    if report.uplift is not None:
        u = report.uplift
        lines.append(
            f"uplift (treatment - control): {u.difference:+.1%} "
            f"(95% CI {u.low:+.1%} to {u.high:+.1%}, Newcombe)"
        )
    lines += [f"note: {n}" for n in report.notes]
    return lines
