"""Deciding every pending approval that matches a filter, each through its own campaign.

Each request goes through :meth:`Controls.decide`, so it gets the same checks as a single
decision (role, scope, four eyes in the workflow's validator) and its own audit row. What
is decided leaves the pending queue, so running the same bulk decision again after an
interruption decides only what is left: nothing is decided twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cohortflow.auth.identity import Identity
from cohortflow.campaigns.controls import Controls
from cohortflow.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from cohortflow.spec import parse_duration
from cohortflow.storage.tables import Approval

# Seconds before each new try of a request Temporal answered as too busy or unavailable.
UNAVAILABLE_BACKOFF = (1.0, 2.0, 4.0, 8.0)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ApprovalFilter:
    """Which pending approvals a bulk decision covers; unset fields match everything.

    ``score`` with ``min_score``/``max_score`` bounds one model's score (inclusive);
    ``older_than`` keeps requests waiting at least that long.
    """

    campaign_id: str | None = None
    cohort_id: str | None = None
    score: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    older_than: timedelta | None = None

    def __post_init__(self) -> None:
        bounded = self.min_score is not None or self.max_score is not None
        if bounded and not self.score:
            raise Invalid("score: name the score that min_score/max_score bound", field="score")

    def matches(self, row: Approval, cohort_of: Mapping[str, str], now: datetime) -> bool:
        """Whether ``row`` falls inside the filter (``cohort_of``: campaign → entry cohort)."""
        if self.cohort_id is not None and cohort_of.get(row.campaign_id) != self.cohort_id:
            return False
        if self.older_than is not None and now - row.requested_at < self.older_than:
            return False
        if not self.score:
            return True
        value = row.scores.get(self.score)
        if not isinstance(value, int | float):
            return False
        low = self.min_score if self.min_score is not None else float("-inf")
        high = self.max_score if self.max_score is not None else float("inf")
        return low <= value <= high


def waiting_at_least(text: str | None) -> timedelta | None:
    """The ``older_than`` filter from its ISO-8601 text (empty: none); a bad one names it."""
    if not text or not text.strip():
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise Invalid(f"older_than: {exc}", field="older_than") from exc


@dataclass
class BulkSummary:
    """What a bulk decision did, request by request."""

    matched: int = 0
    decided: int = 0  # approved or rejected as asked (an approval may still await others)
    refused: int = 0  # refused by validation: role, scope, four eyes
    already_decided: int = 0  # decided, expired or withdrawn meanwhile
    refusals: dict[str, int] = field(default_factory=dict)  # reason → how many

    def count(self, outcome: str, reason: str = "") -> None:
        """Add one request's outcome."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        if reason:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1


async def matching(
    controls: Controls, identity: Identity, criteria: ApprovalFilter
) -> list[Approval]:
    """The pending approvals ``criteria`` selects, the soonest to expire first."""
    rows = await controls.list_approvals(identity, "pending", criteria.campaign_id)
    cohort_of = await controls.entry_cohorts({r.campaign_id for r in rows})
    now = datetime.now(UTC)
    chosen = [r for r in rows if criteria.matches(r, cohort_of, now)]
    return sorted(chosen, key=lambda r: (r.expires_at, r.approval_id))


async def decide_all(
    controls: Controls,
    identity: Identity,
    rows: list[Approval],
    *,
    approve: bool,
    reason: str,
    concurrency: int = 16,
    progress: Progress | None = None,
) -> BulkSummary:
    """Decide each of ``rows`` through its campaign's ``decide`` update, ``concurrency`` at
    a time. A request Temporal answers as too busy or unavailable is sent again after 1, 2,
    4 and 8 s (one that had landed is then refused as decided: nothing is decided twice);
    still unavailable, it stops the run (raised). Everything else is counted per request."""
    summary = BulkSummary(matched=len(rows))
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(row: Approval) -> None:
        nonlocal done
        async with gate:
            try:
                await _decide_one(controls, row, identity, approve, reason)
                summary.count("decided")
            except (Conflict, NotFound):
                summary.count("already_decided")
            except (Forbidden, Invalid) as exc:
                summary.count("refused", exc.message)
        done += 1
        if progress is not None:
            progress(done, len(rows))

    await asyncio.gather(*(one(r) for r in rows))
    return summary


async def _decide_one(
    controls: Controls, row: Approval, identity: Identity, approve: bool, reason: str
) -> None:
    for delay in (*UNAVAILABLE_BACKOFF, None):
        try:
            await controls.decide(
                row.approval_id, approve=approve, identity=identity, reason=reason
            )
            return
        except Unavailable:
            if delay is None:
                raise
            await asyncio.sleep(delay)
