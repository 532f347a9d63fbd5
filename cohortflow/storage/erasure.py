"""Erasing one customer's personal data from our store, and the legal hold that forbids it.

What goes: the raw id mapping and contact details (``customers``: the source id becomes a
tombstone, e-mail, time zone and attributes are cleared), what the events carried (their
properties and raw payloads; message ids, which sources often build from user ids, are
replaced by their hash), the anonymous ids merged into the customer, the consent texts shown,
and their features, cohort memberships and owed signals. What stays is pseudonymous: the
customer key, the audit chain (which therefore still verifies), consent decisions, cohort
transitions, approvals and the CRM ledger. Every consent is revoked, so no campaign writes to
the customer again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import utc
from cohortflow.storage.feature_snapshot import mark_changed
from cohortflow.storage.tables import (
    CohortMember,
    CohortRefresh,
    Consent,
    ConsentChange,
    Customer,
    CustomerFeatures,
    Event,
    ProfileAlias,
    SignalOutbox,
)


@dataclass(frozen=True)
class Erased:
    """How many rows an erasure touched, per kind, for its audit row."""

    events: int
    aliases: int
    consent_texts: int
    consents_revoked: int
    memberships: int


def erased_message_id(message_id: str) -> str:
    """What an erased event's message id becomes: its hash, unique like the id, while the
    id itself (sources often build it from a user id) is gone."""
    return "erased:" + hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:48]


async def erase_customer(
    session: AsyncSession, customer_key: str, *, now: datetime | None = None
) -> Erased:
    """Erase ``customer_key``'s personal data in the caller's transaction (see the module's
    docstring for what goes and what stays). Repeating it changes nothing more."""
    at = utc(now)
    await session.execute(
        update(Customer)
        .where(Customer.customer_key == customer_key)
        .values(
            source_id=f"erased:{customer_key}",
            email=None,
            timezone=None,
            attributes={},
            erased_at=func.coalesce(Customer.erased_at, at),
        )
    )
    events = await _erase_events(session, customer_key)
    aliases = await session.execute(
        delete(ProfileAlias).where(ProfileAlias.customer_key == customer_key)
    )
    texts = await session.execute(
        update(ConsentChange)
        .where(ConsentChange.customer_key == customer_key, ConsentChange.text.is_not(None))
        .values(text=None)
    )
    revoked = await session.execute(
        update(Consent)
        .where(Consent.customer_key == customer_key, Consent.granted.is_(True))
        .values(granted=False, source="erasure", updated_at=at)
    )
    members = await session.execute(
        delete(CohortMember).where(CohortMember.customer_key == customer_key)
    )
    for table in (CustomerFeatures, CohortRefresh, SignalOutbox):
        await session.execute(delete(table).where(table.customer_key == customer_key))
    await mark_changed(session, [customer_key])
    return Erased(
        events,
        aliases.rowcount or 0,  # type: ignore[attr-defined]
        texts.rowcount or 0,  # type: ignore[attr-defined]
        revoked.rowcount or 0,  # type: ignore[attr-defined]
        members.rowcount or 0,  # type: ignore[attr-defined]
    )


async def _erase_events(session: AsyncSession, customer_key: str) -> int:
    """Clear what each event carried and hash its message id; how many there were."""
    ids = (
        await session.scalars(
            select(Event.message_id).where(
                Event.customer_key == customer_key, Event.message_id.not_like("erased:%")
            )
        )
    ).all()
    for message_id in ids:
        await session.execute(
            update(Event)
            .where(Event.message_id == message_id)
            .values(message_id=erased_message_id(message_id), properties={}, raw=None)
        )
    return len(ids)


async def set_legal_hold(session: AsyncSession, customer_key: str, reason: str | None) -> bool:
    """Put the customer under a legal hold for ``reason`` (None lifts it); False when there
    is no such customer."""
    result = await session.execute(
        update(Customer).where(Customer.customer_key == customer_key).values(legal_hold=reason)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
