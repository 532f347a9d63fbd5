"""A campaign's outcome by holdout arm: entered, completed, conversions and the uplift.

Arms and ends come from the audit trail (``variant_assigned``, ``finished``). Conversions
are the customers with the spec's conversion event within its window after they entered,
counted from ingested events (``storage.events.count_events``), so a conversion after the
campaign ended counts too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.spec import parse_duration
from cohortflow.storage import audit, campaigns, events
from cohortflow.storage.tables import CampaignEntry
from workflows.campaign.contract import AuditKind, CampaignState

Z_95 = 1.959963984540054


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
    conversion_event: str  # "" when the spec has no conversion goal
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


async def build_report(
    session: AsyncSession, campaign_id: str, spec: dict[str, Any]
) -> CampaignReport:
    """Count a campaign's entries, ends and conversions by arm."""
    entries = await campaigns.list_entries(session, campaign_id)
    variant, ended = await _arms_and_ends(session, campaign_id)
    notes: list[str] = []
    arms: dict[str, Arm] = {}
    states: dict[str, int] = {}
    for entry in entries:
        arm = arms.setdefault(variant.get(entry.workflow_id) or "unrecorded", Arm())
        arm.entered += 1
        state = ended.get(entry.workflow_id, "running")
        states[state] = states.get(state, 0) + 1
        arm.completed += state == CampaignState.COMPLETED
    goal = spec.get("conversion") or {}
    event = str(goal.get("event", ""))
    if event:
        window = parse_duration(str(goal.get("window", "P14D")))
        converted = await _conversions(session, entries, event, window)
        for entry in entries:
            if entry.workflow_id in converted:
                arms[variant.get(entry.workflow_id) or "unrecorded"].converted += 1
    else:
        notes.append("the spec has no conversion goal: no conversions or uplift")
    uplift = None
    if event and "treatment" in arms and "control" in arms:
        t, c = arms["treatment"], arms["control"]
        uplift = newcombe(t.converted, t.entered, c.converted, c.entered)
    elif event:
        notes.append("uplift needs both a treatment and a control arm")
    return CampaignReport(campaign_id, len(entries), states, arms, event, uplift, notes)


async def _arms_and_ends(
    session: AsyncSession, campaign_id: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Each workflow's arm and end state, by workflow id, from the audit trail."""
    rows = await audit.audit_for_campaign(
        session, campaign_id, (AuditKind.VARIANT_ASSIGNED, AuditKind.FINISHED)
    )
    variant: dict[str, str] = {}
    ended: dict[str, str] = {}
    for row in rows:
        data = json.loads(row.payload)
        if row.kind == AuditKind.VARIANT_ASSIGNED:
            variant[row.workflow_id] = str(data.get("variant", ""))
        else:
            ended[row.workflow_id] = str(data.get("state", ""))
            # Runs from before the arm had its own row carry it only in their end row.
            variant.setdefault(row.workflow_id, str(data.get("variant") or ""))
    return variant, ended


async def _conversions(
    session: AsyncSession, entries: list[CampaignEntry], event: str, window: timedelta
) -> set[str]:
    """Workflows whose customer had ``event`` within ``window`` of entering."""
    converted: set[str] = set()
    # One query per entry day keeps each customer's window close to their own entry.
    by_day: dict[date, list[CampaignEntry]] = {}
    for entry in entries:
        by_day.setdefault(entry.launched_at.date(), []).append(entry)
    for group in by_day.values():
        start = min(e.launched_at for e in group)
        end = max(e.launched_at for e in group) + window
        counts = await events.count_events(
            session, [e.customer_key for e in group], event, start, end
        )
        converted |= {e.workflow_id for e in group if counts.get(e.customer_key, 0) > 0}
    return converted


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
        lines.append(f"conversion: {report.conversion_event} (from events)")
    if report.uplift is not None:
        u = report.uplift
        lines.append(
            f"uplift (treatment - control): {u.difference:+.1%} "
            f"(95% CI {u.low:+.1%} to {u.high:+.1%}, Newcombe)"
        )
    lines += [f"note: {n}" for n in report.notes]
    return lines
