"""Consent per customer, channel and purpose. Opt-in: no row means no consent.

``consents`` holds the current state; ``consent_history`` every decision as evidence (who,
when, how, from which source, with which policy version or text), written in the same
transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import chunked, in_list, rows_per_statement, upsert, utc
from cohortflow.storage.tables import Consent, ConsentChange

ConsentRow = tuple[str, str, str, bool]


@dataclass(frozen=True)
class ConsentEvidence:
    """How a consent decision was given: ``how`` (api, cli, import, event, seed, system),
    ``by`` whom (the authenticated identity, or the system that imported it), and the
    policy version or text the customer was shown, when known."""

    how: str
    by: str
    policy_version: str | None = None
    text: str | None = None


SYSTEM = ConsentEvidence(how="system", by="cohortflow")


async def _record(
    session: AsyncSession,
    decisions: Sequence[tuple[ConsentRow, bool]],
    source: str,
    evidence: ConsentEvidence,
    at: datetime,
) -> None:
    """Append each ``((key, channel, purpose, granted), changed)`` to the history."""
    rows = [
        {
            "customer_key": key,
            "channel": channel,
            "purpose": purpose,
            "granted": granted,
            "changed": changed,
            "how": evidence.how,
            "by": evidence.by,
            "source": source,
            "policy_version": evidence.policy_version,
            "text": evidence.text,
            "at": at,
        }
        for (key, channel, purpose, granted), changed in decisions
    ]
    for chunk in chunked(rows, rows_per_statement(session, 11)):
        await session.execute(insert(ConsentChange), list(chunk))


async def history(session: AsyncSession, customer_key: str) -> list[ConsentChange]:
    """Every consent decision of a customer, oldest first."""
    result = await session.scalars(
        select(ConsentChange)
        .where(ConsentChange.customer_key == customer_key)
        .order_by(ConsentChange.at, ConsentChange.id)
    )
    return list(result)


async def set_consent(
    session: AsyncSession,
    customer_key: str,
    channel: str,
    purpose: str,
    granted: bool,
    source: str,
    now: datetime | None = None,
    evidence: ConsentEvidence = SYSTEM,
) -> bool:
    """Record a consent decision, and its evidence; True if the customer's effective
    consent changed.

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
    decision = (customer_key, channel, purpose, granted)
    if inserted.first() is not None:
        await _record(session, [(decision, granted)], source, evidence, updated_at)
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
    changed = updated.first() is not None
    await _record(session, [(decision, changed)], source, evidence, updated_at)
    return changed


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
    evidence: ConsentEvidence = SYSTEM,
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
        moved = [((*pk, granted), before.get(pk, False) != granted) for pk, granted in chunk]
        changed += sum(1 for _, did in moved if did)
        await _record(session, moved, source, evidence, updated_at)
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
