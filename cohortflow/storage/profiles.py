"""Profile aliases: merging one customer's history into another's (anonymous to known).

A merge moves the merged profile's events to the surviving customer, carries over contact
data it lacks, and drops the merged profile's features and customer row; the caller then
recomputes the survivor's features in the same transaction. The first merge of an alias
wins: an anonymous id, once tied to a customer, stays with them (as Segment's identity
resolution does). Consents and campaign entries of a merged profile stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, rows_per_statement, upsert, utc
from cohortflow.storage.feature_snapshot import mark_changed
from cohortflow.storage.tables import Customer, CustomerFeatures, Event, ProfileAlias


async def resolve_aliases(session: AsyncSession, keys: Iterable[str]) -> dict[str, str]:
    """The customer each of ``keys`` was merged into, for those that were."""
    found: dict[str, str] = {}
    wanted = sorted(set(keys))
    for chunk in chunked(wanted, rows_per_statement(session, 1)):
        result = await session.execute(
            select(ProfileAlias.alias_key, ProfileAlias.customer_key).where(
                ProfileAlias.alias_key.in_(chunk)
            )
        )
        found.update({alias: key for alias, key in result})
    return found


async def merge_profiles(
    session: AsyncSession, merges: Sequence[tuple[str, str]], *, now: datetime | None = None
) -> set[str]:
    """Merge each ``(alias_key, customer_key)`` in order; the customers whose history grew."""
    grown: set[str] = set()
    for alias_key, customer_key in merges:
        if await _merge(session, alias_key, customer_key, now=now):
            grown.add(customer_key)
    return grown


async def _merge(
    session: AsyncSession, alias_key: str, customer_key: str, *, now: datetime | None
) -> bool:
    if alias_key == customer_key:
        return False
    inserted = await session.execute(
        upsert(session, ProfileAlias)
        .on_conflict_do_nothing(index_elements=[ProfileAlias.alias_key])
        .returning(ProfileAlias.alias_key),
        [{"alias_key": alias_key, "customer_key": customer_key, "merged_at": utc(now)}],
    )
    if not inserted.scalars().all():
        return False
    # Aliases that led to the merged profile now lead to the survivor.
    await session.execute(
        update(ProfileAlias)
        .where(ProfileAlias.customer_key == alias_key)
        .values(customer_key=customer_key)
    )
    moved = await session.execute(
        update(Event).where(Event.customer_key == alias_key).values(customer_key=customer_key)
    )
    await _carry_contact(session, alias_key, customer_key)
    await session.execute(
        delete(CustomerFeatures).where(CustomerFeatures.customer_key == alias_key)
    )
    await mark_changed(session, [alias_key])
    return bool(getattr(moved, "rowcount", 0))


async def _carry_contact(session: AsyncSession, alias_key: str, customer_key: str) -> None:
    """Fill the survivor's missing e-mail and time zone from the merged profile; drop it."""
    merged = await session.get(Customer, alias_key)
    if merged is None:
        return
    survivor = await session.get(Customer, customer_key)
    if survivor is not None:
        survivor.email = survivor.email or merged.email
        survivor.timezone = survivor.timezone or merged.timezone
        survivor.attributes = {**merged.attributes, **survivor.attributes}
    await session.delete(merged)
    await session.flush()
