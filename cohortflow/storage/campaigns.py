"""Campaigns, their immutable spec versions and the entries launched for them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import canonical_json, in_list, upsert, utc
from cohortflow.storage.tables import Campaign, CampaignEntry, CampaignSpecVersion

CampaignStatus = Literal["active", "paused", "cancelled"]
CAMPAIGN_STATUSES: frozenset[str] = frozenset(get_args(CampaignStatus))


def spec_hash(spec: dict[str, Any]) -> str:
    """The SHA-256 of a spec document's canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


async def save_spec_version(
    session: AsyncSession,
    campaign_id: str,
    spec: dict[str, Any],
    created_by: str,
    *,
    now: datetime | None = None,
) -> tuple[int, bool]:
    """Store ``spec`` as the campaign's next version unless it equals the latest one.

    Specs compare by :func:`spec_hash`, so key order does not matter.
    Returns ``(version, created)``. The first version also creates the campaign, active.
    Concurrent saves for one campaign queue on its row, so versions never collide.
    """
    at = utc(now)
    document = canonical_json(spec)
    digest = spec_hash(spec)
    await session.execute(
        upsert(session, Campaign)
        .values(campaign_id=campaign_id, status="active", latest_version=0, updated_at=at)
        .on_conflict_do_nothing(index_elements=[Campaign.campaign_id])
    )
    latest = (
        await session.execute(
            select(Campaign.latest_version)
            .where(Campaign.campaign_id == campaign_id)
            .with_for_update()
        )
    ).scalar_one()
    if latest > 0:
        latest_digest = await session.scalar(
            select(CampaignSpecVersion.spec_hash).where(
                CampaignSpecVersion.campaign_id == campaign_id,
                CampaignSpecVersion.version == latest,
            )
        )
        if latest_digest == digest:
            return latest, False
    version = latest + 1
    await session.execute(
        insert(CampaignSpecVersion).values(
            campaign_id=campaign_id,
            version=version,
            # Exactly the hashed document, not the caller's dict, which may change later.
            spec=json.loads(document),
            spec_hash=digest,
            created_by=created_by,
            created_at=at,
        )
    )
    await session.execute(
        update(Campaign)
        .where(Campaign.campaign_id == campaign_id)
        .values(latest_version=version, updated_at=at)
    )
    return version, True


async def get_spec(session: AsyncSession, campaign_id: str, version: int) -> dict[str, Any] | None:
    """The spec document of one version, or None."""
    stored = await get_spec_version(session, campaign_id, version)
    return None if stored is None else stored[0]


async def get_spec_version(
    session: AsyncSession, campaign_id: str, version: int
) -> tuple[dict[str, Any], str] | None:
    """The spec document of one version and who applied it, or None."""
    row = (
        await session.execute(
            select(CampaignSpecVersion.spec, CampaignSpecVersion.created_by).where(
                CampaignSpecVersion.campaign_id == campaign_id,
                CampaignSpecVersion.version == version,
            )
        )
    ).first()
    return None if row is None else (row.spec, row.created_by)


async def latest_specs(
    session: AsyncSession, campaign_ids: Collection[str]
) -> dict[str, dict[str, Any]]:
    """The spec document of each campaign's latest version (unknown campaigns left out)."""
    found: dict[str, dict[str, Any]] = {}
    for chunk in in_list(sorted(set(campaign_ids))):
        rows = await session.execute(
            select(CampaignSpecVersion.campaign_id, CampaignSpecVersion.spec)
            .join(Campaign, Campaign.campaign_id == CampaignSpecVersion.campaign_id)
            .where(
                CampaignSpecVersion.campaign_id.in_(chunk),
                CampaignSpecVersion.version == Campaign.latest_version,
            )
        )
        found |= {campaign_id: spec for campaign_id, spec in rows}
    return found


async def campaign_tags(session: AsyncSession, campaign_id: str) -> frozenset[str]:
    """The tags of the campaign's latest version (none for an unknown campaign)."""
    spec = (await latest_specs(session, [campaign_id])).get(campaign_id, {})
    return frozenset(t for t in spec.get("tags", []) if isinstance(t, str))


async def get_campaign(session: AsyncSession, campaign_id: str) -> Campaign | None:
    """The campaign, or None."""
    return await session.get(Campaign, campaign_id)


async def set_campaign_status(
    session: AsyncSession,
    campaign_id: str,
    status: CampaignStatus,
    *,
    now: datetime | None = None,
) -> bool:
    """Set the campaign's status; True if it changed. Unknown campaigns raise LookupError."""
    if status not in CAMPAIGN_STATUSES:
        raise ValueError(f"unknown campaign status {status!r}")
    changed = await session.execute(
        update(Campaign)
        .where(Campaign.campaign_id == campaign_id, Campaign.status != status)
        .values(status=status, updated_at=utc(now))
        .returning(Campaign.campaign_id)
    )
    if changed.first() is not None:
        return True
    exists = await session.scalar(
        select(Campaign.campaign_id).where(Campaign.campaign_id == campaign_id)
    )
    if exists is None:
        raise LookupError(f"no campaign {campaign_id!r}")
    return False


async def record_entry(
    session: AsyncSession,
    *,
    workflow_id: str,
    campaign_id: str,
    customer_key: str,
    entry_id: str,
    cohort_id: str,
    version: int,
    launched_at: datetime | None = None,
) -> bool:
    """Record a launched campaign entry; False if the workflow or the entry already exists.

    A plain ``ON CONFLICT DO NOTHING``, so concurrent launchers of one entry never fail.
    """
    inserted = await session.execute(
        upsert(session, CampaignEntry)
        .values(
            workflow_id=workflow_id,
            campaign_id=campaign_id,
            customer_key=customer_key,
            entry_id=entry_id,
            cohort_id=cohort_id,
            version=version,
            launched_at=utc(launched_at),
        )
        .on_conflict_do_nothing()
        .returning(CampaignEntry.workflow_id)
    )
    return inserted.first() is not None


@dataclass(frozen=True)
class EntryRecord:
    """A campaign entry to record as launched (:func:`record_entry`'s fields)."""

    workflow_id: str
    campaign_id: str
    customer_key: str
    entry_id: str
    cohort_id: str
    version: int


async def record_entries(session: AsyncSession, entries: Sequence[EntryRecord]) -> list[bool]:
    """Record each entry (:func:`record_entry`); for each, whether this call recorded it
    (a second record of one workflow in the same call answers False)."""
    return [await record_entry(session, **asdict(entry)) for entry in entries]


async def entered_customers(session: AsyncSession, customer_keys: Collection[str]) -> set[str]:
    """Those of ``customer_keys`` that ever entered a campaign: only their events can
    concern a running campaign (the launcher records an entry before it starts one)."""
    found: set[str] = set()
    for chunk in in_list(sorted(customer_keys)):
        rows = await session.scalars(
            select(CampaignEntry.customer_key)
            .where(CampaignEntry.customer_key.in_(chunk))
            .distinct()
        )
        found.update(rows)
    return found


async def count_entries(session: AsyncSession, campaign_id: str) -> int:
    """How many entries the campaign has launched."""
    count = await session.scalar(
        select(func.count())
        .select_from(CampaignEntry)
        .where(CampaignEntry.campaign_id == campaign_id)
    )
    return int(count or 0)


async def list_entries(session: AsyncSession, campaign_id: str) -> list[CampaignEntry]:
    """Every entry the campaign launched, oldest first."""
    result = await session.scalars(
        select(CampaignEntry)
        .where(CampaignEntry.campaign_id == campaign_id)
        .order_by(CampaignEntry.launched_at, CampaignEntry.workflow_id)
    )
    return list(result)


async def list_campaigns(session: AsyncSession) -> list[Campaign]:
    """Every campaign, by id."""
    return list(await session.scalars(select(Campaign).order_by(Campaign.campaign_id)))


async def statuses(session: AsyncSession, campaign_ids: Collection[str]) -> dict[str, str]:
    """The status of each of these campaigns that exists."""
    found: dict[str, str] = {}
    for chunk in in_list(list(campaign_ids)):
        rows = await session.execute(
            select(Campaign.campaign_id, Campaign.status).where(Campaign.campaign_id.in_(chunk))
        )
        found |= {campaign_id: status for campaign_id, status in rows}
    return found
