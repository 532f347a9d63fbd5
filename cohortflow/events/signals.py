"""Telling running campaigns about their customer's new events: the ``customer_event``
signal, sent to every running campaign of each event's customer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

import structlog
from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError

from cohortflow.campaigns import visibility
from cohortflow.campaigns.visibility import CampaignHandle
from workflows.campaign.contract import SA
from workflows.campaign.messages import CustomerEvent
from workflows.campaign.workflow import CampaignWorkflow

log = structlog.get_logger(__name__)

TemporalStatus = Literal["ok", "unreachable", "skipped"]


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
                await self._signal(handle, event)
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

    async def _signal(self, handle: CampaignHandle, event: CustomerEvent) -> None:
        # One signal; a campaign that closed since it was listed answers NOT_FOUND, which
        # ``visibility.each_running`` counts as done.
        await handle.signal(CampaignWorkflow.customer_event, event)
