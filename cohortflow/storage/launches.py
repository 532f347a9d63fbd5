"""Launch decisions: what each campaign made of each cohort entry, decided once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, rows_per_statement, upsert, utc
from cohortflow.storage.tables import CampaignEntry, LaunchDecision


async def decisions_for(
    session: AsyncSession, campaign_id: str, seqs: Sequence[int]
) -> dict[int, LaunchDecision]:
    """The decisions already made for these transitions, by transition seq."""
    found: dict[int, LaunchDecision] = {}
    for chunk in chunked(list(seqs), rows_per_statement(session, 1)):
        result = await session.scalars(
            select(LaunchDecision)
            .where(
                LaunchDecision.campaign_id == campaign_id,
                LaunchDecision.transition_seq.in_(chunk),
            )
            .execution_options(populate_existing=True)
        )
        found.update((d.transition_seq, d) for d in result)
    return found


async def previous_entries(
    session: AsyncSession, campaign_id: str, customer_keys: Sequence[str]
) -> dict[str, list[tuple[str, datetime]]]:
    """Entry ids each customer was given in the campaign, launched or only decided, with
    when; oldest first. Every requested key is in the result."""
    keys = list(dict.fromkeys(customer_keys))
    found: dict[str, dict[str, datetime]] = {key: {} for key in keys}
    for chunk in chunked(keys, rows_per_statement(session, 2)):
        launched = await session.execute(
            select(CampaignEntry.customer_key, CampaignEntry.entry_id, CampaignEntry.launched_at)
            .where(CampaignEntry.campaign_id == campaign_id)
            .where(CampaignEntry.customer_key.in_(chunk))
        )
        decided = await session.execute(
            select(LaunchDecision.customer_key, LaunchDecision.entry_id, LaunchDecision.decided_at)
            .where(LaunchDecision.campaign_id == campaign_id)
            .where(LaunchDecision.customer_key.in_(chunk), LaunchDecision.entry_id.is_not(None))
        )
        for key, entry_id, at in [*launched.all(), *decided.all()]:
            if entry_id is not None:
                entries = found[key]
                entries[entry_id] = min(at, entries.get(entry_id, at))
    return {key: sorted(e.items(), key=lambda item: item[1]) for key, e in found.items()}


async def record_decisions(
    session: AsyncSession,
    campaign_id: str,
    decisions: Sequence[Decision],
    *,
    now: datetime | None = None,
) -> dict[int, LaunchDecision]:
    """Store each decision unless one exists for its transition; returns those that hold."""
    at = utc(now)
    rows = [
        {
            "campaign_id": campaign_id,
            "transition_seq": d.transition_seq,
            "customer_key": d.customer_key,
            "entry_id": d.entry_id,
            "reason": d.reason,
            "decided_at": at,
        }
        for d in decisions
    ]
    for chunk in chunked(rows, rows_per_statement(session, 6)):
        await session.execute(
            upsert(session, LaunchDecision).values(list(chunk)).on_conflict_do_nothing()
        )
    return await decisions_for(session, campaign_id, [d.transition_seq for d in decisions])


@dataclass(frozen=True)
class Decision:
    """A verdict of the re-entry rule on one cohort entry (entry_id None: refused)."""

    transition_seq: int
    customer_key: str
    entry_id: str | None
    reason: str


async def mark_launched(
    session: AsyncSession, campaign_id: str, seqs: Sequence[int], *, now: datetime | None = None
) -> None:
    """Note that these decisions' workflow starts were confirmed."""
    for chunk in chunked(list(seqs), rows_per_statement(session, 1)):
        await session.execute(
            update(LaunchDecision)
            .where(
                LaunchDecision.campaign_id == campaign_id,
                LaunchDecision.transition_seq.in_(chunk),
            )
            .values(launched_at=utc(now))
        )


async def decision_counts(
    session: AsyncSession, campaign_id: str, *, up_to_seq: int
) -> tuple[int, int]:
    """(launched, refused) decisions of the campaign for transitions up to ``up_to_seq``."""
    rows = await session.execute(
        select(LaunchDecision.entry_id.is_(None), func.count())
        .where(
            LaunchDecision.campaign_id == campaign_id,
            LaunchDecision.transition_seq <= up_to_seq,
        )
        .group_by(LaunchDecision.entry_id.is_(None))
    )
    counts = {bool(refused): int(n) for refused, n in rows}
    return counts.get(False, 0), counts.get(True, 0)
