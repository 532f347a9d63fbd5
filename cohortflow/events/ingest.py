"""Ingest a batch: validate each event, pseudonymise, store once, update features, signal.

Accepted events of a batch are written in one transaction together with the features they
change, so a failure leaves neither; rejected events are never written. Running campaigns
are told about new events after the commit: a Temporal outage never loses an event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError

from cohortflow.campaigns import visibility
from cohortflow.campaigns.visibility import CampaignHandle
from cohortflow.events.schema import CONTACT_TRAITS, IdentifyEvent, TrackEvent, parse_event
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage.db import Database
from cohortflow.storage.events import EventRecord, IdentityRecord, insert_events, upsert_identities
from cohortflow.storage.feature_store import update_features
from workflows.campaign.contract import SA
from workflows.campaign.messages import CustomerEvent
from workflows.campaign.workflow import CampaignWorkflow

log = structlog.get_logger(__name__)

Status = Literal["accepted", "duplicate", "rejected"]
TemporalStatus = Literal["ok", "unreachable", "skipped"]


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


class Signaller(Protocol):
    """Tells running campaigns about new events of their customer."""

    async def __call__(self, events: Sequence[tuple[str, CustomerEvent]]) -> int | None:
        """Signal each (customer key, event); how many signals, or None if Temporal is down."""


class TemporalSignaller:
    """Signals ``customer_event`` to every running workflow of the event's customer.

    Connects lazily and, after a failed connect, waits ``retry_seconds`` before trying again
    so an outage does not slow every batch down by a connect timeout.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[Client]], *, retry_seconds: float = 30.0
    ) -> None:
        self._connect = connect
        self._client: Client | None = None
        self._failed_at: float | None = None
        self._retry_seconds = retry_seconds

    async def _get_client(self) -> Client | None:
        if self._client is not None:
            return self._client
        if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_seconds:
            return None
        try:
            self._client = await self._connect()
        except (RuntimeError, OSError) as exc:
            self._failed_at = time.monotonic()
            log.warning(
                "temporal unreachable; events stored, campaigns not signalled", error=str(exc)
            )
            return None
        return self._client

    async def __call__(self, events: Sequence[tuple[str, CustomerEvent]]) -> int | None:
        """Signal every running campaign of each event's customer, events in time order."""
        if not events:
            return 0
        client = await self._get_client()
        if client is None:
            return None
        by_customer: dict[str, list[CustomerEvent]] = {}
        for key, event in sorted(events, key=lambda item: item[1].occurred_at):
            by_customer.setdefault(key, []).append(event)

        async def send(handle: CampaignHandle, execution: WorkflowExecution) -> int:
            # In time order, one at a time: a campaign sees its customer's events in order.
            customer = execution.typed_search_attributes.get(SA.CUSTOMER_KEY) or ""
            for event in by_customer.get(customer, []):
                await handle.signal(CampaignWorkflow.customer_event, event)
            return len(by_customer.get(customer, []))

        sent = 0
        try:
            for chunk in visibility.chunks(sorted(by_customer)):
                query = visibility.running(visibility.one_of(SA.CUSTOMER_KEY, chunk))
                sent += await visibility.each_running(client, query, send)
        except (RPCError, RuntimeError) as exc:
            log.warning("signalling customer events failed", error=str(exc))
            self._client = None
            return None
        return sent


class Ingestor:
    """Validates, stores and signals batches of events."""

    def __init__(
        self,
        db: Database,
        pseudonymiser: Pseudonymiser,
        signaller: Signaller | None = None,
    ) -> None:
        self._db = db
        self._pseudonymiser = pseudonymiser
        self._signaller = signaller

    async def ingest(self, batch: Sequence[Any], *, now: datetime | None = None) -> IngestOutcome:
        """Validate every event of ``batch``, store the good ones and report on each."""
        results: list[EventResult] = []
        valid: list[tuple[int, TrackEvent | IdentifyEvent]] = []
        seen: set[str] = set()
        for index, raw in enumerate(batch):
            parsed = parse_event(raw)
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
        records, identities = self._records(valid)
        async with self._db.transaction() as session:
            await upsert_identities(session, identities, now=now)
            inserted = await insert_events(session, records, now=now)
            touched = sorted({r.customer_key for r in records if r.message_id in inserted})
            await update_features(session, touched, now=now)
        for index, event in valid:
            status: Status = "accepted" if event.messageId in inserted else "duplicate"
            results.append(EventResult(index, event.messageId, status))
        results.sort(key=lambda r: r.index)
        outcome = IngestOutcome(results)
        new_events = [
            (
                r.customer_key,
                CustomerEvent(
                    event=r.event,
                    occurred_at=r.occurred_at.astimezone(UTC).isoformat(),
                    message_id=r.message_id,
                    properties=r.properties,
                ),
            )
            for r in records
            if r.message_id in inserted and r.type == "track"
        ]
        if self._signaller is not None and new_events:
            signalled = await self._signaller(new_events)
            outcome.temporal = "unreachable" if signalled is None else "ok"
            outcome.signalled = signalled or 0
        return outcome

    def _records(
        self, valid: Sequence[tuple[int, TrackEvent | IdentifyEvent]]
    ) -> tuple[list[EventRecord], list[IdentityRecord]]:
        records: list[EventRecord] = []
        identities: list[IdentityRecord] = []
        for _, event in valid:
            key = self._pseudonymiser.customer_key(event.userId)
            if isinstance(event, TrackEvent):
                identities.append(IdentityRecord(key, event.userId))
                records.append(
                    EventRecord(
                        event.messageId,
                        key,
                        "track",
                        event.event,
                        event.timestamp,
                        event.properties,
                    )
                )
            else:
                traits = event.traits
                identities.append(
                    IdentityRecord(
                        key,
                        event.userId,
                        email=traits.get("email"),
                        timezone=traits.get("timezone"),
                        attributes={k: v for k, v in traits.items() if k not in CONTACT_TRAITS},
                    )
                )
                # The log keeps that an identify happened, never its contact traits.
                records.append(
                    EventRecord(event.messageId, key, "identify", "identify", event.timestamp)
                )
        return records, identities


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _prefixed(index: int, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Error paths from the request body's root: ``["batch", index, ...]``."""
    return [{**e, "loc": ["batch", index, *e["loc"]]} for e in errors]
