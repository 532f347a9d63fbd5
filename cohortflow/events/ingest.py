"""Ingest a batch: validate each event, pseudonymise, store once, update features, signal.

Accepted events of a batch are written in one transaction together with the features they
change and the signals they owe running campaigns (the outbox), so a failure leaves none of
them; rejected events are never written. After the commit the relay delivers this batch's
signals at once; what Temporal could not take it delivers later (``events.relay``): a
Temporal outage never loses an event nor the signal it owes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cohortflow.events.identities import KeyMaker, plan_batch
from cohortflow.events.relay import Held, SignalRelay
from cohortflow.events.schema import AnyEvent, Received, parse_event
from cohortflow.events.signals import TemporalStatus
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage import campaigns
from cohortflow.storage.cohorts import touch
from cohortflow.storage.db import Database
from cohortflow.storage.events import EventRecord, insert_events, upsert_identities
from cohortflow.storage.feature_store import update_features
from cohortflow.storage.profiles import merge_profiles, resolve_aliases
from cohortflow.storage.signal_outbox import OwedSignal
from workflows.campaign.messages import CustomerEvent

Status = Literal["accepted", "duplicate", "rejected"]


@dataclass
class EventResult:
    """What happened to one event of a batch, by its position."""

    index: int
    message_id: str | None
    status: Status
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class IngestOutcome:
    """A batch's results; ``temporal`` says whether running campaigns were told."""

    results: list[EventResult]
    signalled: int = 0
    temporal: TemporalStatus = "skipped"

    def count(self, status: Status) -> int:
        """How many events ended with ``status``."""
        return sum(1 for r in self.results if r.status == status)


class Ingestor:
    """Validates, stores and signals batches of events."""

    def __init__(
        self,
        db: Database,
        pseudonymiser: Pseudonymiser,
        relay: SignalRelay | None = None,
    ) -> None:
        """Without a ``relay`` nothing is signalled nor owed (a history import, say)."""
        self._db = db
        self._keys = KeyMaker(pseudonymiser)
        self._relay = relay

    async def ingest(
        self,
        batch: Sequence[Any],
        *,
        now: datetime | None = None,
        sent_at: datetime | None = None,
    ) -> IngestOutcome:
        """Validate every event of ``batch``, store the good ones and report on each.

        ``now`` is the receive time and ``sent_at`` the batch's own ``sentAt``: together they
        correct each event's clock (``events.schema.corrected_timestamp``).
        """
        received = Received(now or datetime.now(UTC), sent_at)
        results, valid = _validate(batch, received)
        events = [event for _, event in valid]
        at = received.at
        async with self._db.transaction() as session:
            stored = await resolve_aliases(session, self._keys.candidates(events))
            plan = plan_batch(events, self._keys, stored)
            await upsert_identities(session, plan.identities, now=at)
            inserted = await insert_events(session, plan.records, now=at)
            grown = await merge_profiles(session, plan.merges, now=at)
            touched = {r.customer_key for r in plan.records if r.message_id in inserted}
            await update_features(session, sorted(touched | grown), now=at)
            await touch(session, sorted(touched | grown), now=at)  # cohorts.refresh
            new = [r for r in plan.records if r.message_id in inserted and r.type == "track"]
            held, owed = Held(), []
            if self._relay is not None:  # a history import owes nothing
                # Only customers who entered a campaign can have one running; most events
                # are other customers', and owe nothing to look up or deliver.
                entered = await campaigns.entered_customers(session, {r.customer_key for r in new})
                # Owed in time order: a campaign hears its customer's events as they happened.
                ordered = sorted(new, key=lambda r: r.occurred_at)
                owed = [_owed(r) for r in ordered if r.customer_key in entered]
                held = await self._relay.owe(session, owed, now=at)
        for index, event in valid:
            status: Status = "accepted" if event.messageId in inserted else "duplicate"
            results.append(EventResult(index, event.messageId, status))
        results.sort(key=lambda r: r.index)
        outcome = IngestOutcome(results)
        if self._relay is not None and owed:
            # Temporal slow or away: the sender is not kept waiting past
            # ``relay.DELIVER_NOW_SECONDS``; what is left, the relay delivers later.
            delivery = await self._relay.deliver_held(held)
            outcome.temporal, outcome.signalled = delivery.temporal, delivery.signalled
        return outcome


def _validate(
    batch: Sequence[Any], received: Received
) -> tuple[list[EventResult], list[tuple[int, AnyEvent]]]:
    """The refused and repeated events' results, and the valid events by position."""
    results: list[EventResult] = []
    valid: list[tuple[int, AnyEvent]] = []
    seen: set[str] = set()
    for index, raw in enumerate(batch):
        parsed = parse_event(raw, received)
        message_id = raw.get("messageId") if isinstance(raw, dict) else None
        if isinstance(parsed, list):
            results.append(
                EventResult(index, _text(message_id), "rejected", _prefixed(index, parsed))
            )
        elif parsed.messageId in seen:
            results.append(EventResult(index, parsed.messageId, "duplicate"))
        else:
            seen.add(parsed.messageId)
            valid.append((index, parsed))
    return results, valid


def _owed(record: EventRecord) -> OwedSignal:
    """The signal a new track event owes its customer's running campaigns."""
    event = CustomerEvent(
        event=record.event,
        occurred_at=record.occurred_at.astimezone(UTC).isoformat(),
        message_id=record.message_id,
        properties=record.properties,
    )
    return OwedSignal(record.message_id, record.customer_key, asdict(event))


def _text(value: Any) -> str | None:
    """A refused event's message id as the answer may echo it: text that encodes."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _prefixed(index: int, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Error paths from the request body's root: ``["batch", index, ...]``."""
    return [{**e, "loc": ["batch", index, *e["loc"]]} for e in errors]
