"""Consent per customer, channel and purpose. Opt-in: no row means no consent."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, in_list, rows_per_statement, upsert, utc
from cohortflow.storage.tables import Consent

ConsentRow = tuple[str, str, str, bool]


async def set_consent(
    session: AsyncSession,
    customer_key: str,
    channel: str,
    purpose: str,
    granted: bool,
    source: str,
    now: datetime | None = None,
) -> bool:
    """Record a consent decision; True if the customer's effective consent changed.

    Without a row consent counts as not granted, so a first refusal is stored (with its
    source) but is no change. Repeating the current value leaves the row, and its
    ``updated_at``, untouched.
    """
    updated_at = utc(now)
    inserted = await session.execute(
        upsert(session, Consent)
        .values(
            customer_key=customer_key,
            channel=channel,
            purpose=purpose,
            granted=granted,
            source=source,
            updated_at=updated_at,
        )
        .on_conflict_do_nothing(
            index_elements=[Consent.customer_key, Consent.channel, Consent.purpose]
        )
        .returning(Consent.customer_key)
    )
    if inserted.first() is not None:
        return granted
    # The conditional UPDATE locks the row and re-checks it, so of two concurrent
    # transactions making the same change only one reports it.
    updated = await session.execute(
        update(Consent)
        .where(
            Consent.customer_key == customer_key,
            Consent.channel == channel,
            Consent.purpose == purpose,
            Consent.granted != granted,
        )
        .values(granted=granted, source=source, updated_at=updated_at)
        .returning(Consent.customer_key)
    )
    return updated.first() is not None


async def has_consent(session: AsyncSession, customer_key: str, channel: str, purpose: str) -> bool:
    """True only if consent for this channel and purpose is recorded as granted."""
    granted = await session.scalar(
        select(Consent.granted).where(
            Consent.customer_key == customer_key,
            Consent.channel == channel,
            Consent.purpose == purpose,
        )
    )
    return bool(granted)


async def bulk_set_consent(
    session: AsyncSession,
    rows: Sequence[ConsentRow],
    source: str,
    *,
    now: datetime | None = None,
) -> int:
    """Record many ``(customer_key, channel, purpose, granted)`` decisions at once.

    Same rules as :func:`set_consent`; the last decision for a (customer, channel, purpose)
    wins. Returns how many of those effective consents changed.
    """
    updated_at = utc(now)
    latest = {(key, channel, purpose): granted for key, channel, purpose, granted in rows}
    items = list(latest.items())
    changed = 0
    for chunk in chunked(items, rows_per_statement(session, 6)):
        keys = {key for (key, _, _), _ in chunk}
        stored = await session.execute(
            select(Consent.customer_key, Consent.channel, Consent.purpose, Consent.granted).where(
                Consent.customer_key.in_(keys)
            )
        )
        before = {(key, channel, purpose): granted for key, channel, purpose, granted in stored}
        changed += sum(1 for pk, granted in chunk if before.get(pk, False) != granted)
        stmt = upsert(session, Consent).values(
            [
                {
                    "customer_key": key,
                    "channel": channel,
                    "purpose": purpose,
                    "granted": granted,
                    "source": source,
                    "updated_at": updated_at,
                }
                for (key, channel, purpose), granted in chunk
            ]
        )
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[Consent.customer_key, Consent.channel, Consent.purpose],
                set_={
                    "granted": stmt.excluded.granted,
                    "source": stmt.excluded.source,
                    "updated_at": stmt.excluded.updated_at,
                },
                where=Consent.granted != stmt.excluded.granted,
            )
        )
    return changed


async def granted_many(
    session: AsyncSession, wanted: Collection[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Which of these (customer key, channel, purpose) are recorded as granted."""
    # By the key's index alone (row-value IN lists defeat PostgreSQL's planner), the rest
    # compared here: a customer has a handful of consent rows.
    found: set[tuple[str, str, str]] = set()
    for chunk in in_list(sorted({key for key, _, _ in wanted})):
        rows = await session.execute(
            select(Consent.customer_key, Consent.channel, Consent.purpose).where(
                Consent.customer_key.in_(chunk), Consent.granted.is_(True)
            )
        )
        found |= {(k, c, p) for k, c, p in rows if (k, c, p) in wanted}
    return found
