"""Telling running campaigns what happened to their customer: ``customer_event`` for a new
event, ``consent_changed`` for a consent change, sent to every running campaign of the
customer in the order given (the order the outbox owed them)."""

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
from workflows.campaign.messages import ConsentChanged, CustomerEvent
from workflows.campaign.workflow import CampaignWorkflow

log = structlog.get_logger(__name__)

# ok: Temporal took the signals; unreachable: it did not (they stay owed); skipped: none were
# owed; queued: owed behind the customer's earlier signals, which the relay delivers first.
TemporalStatus = Literal["ok", "unreachable", "skipped", "queued"]
CampaignSignal = CustomerEvent | ConsentChanged


class Signaller(Protocol):
    """Tells running campaigns what happened to their customer."""

    async def __call__(self, signals: Sequence[tuple[str, CampaignSignal]]) -> int | None:
        """Signal each (customer key, message), a customer's in the order given; how many
        signals, or None if Temporal is down."""


class TemporalSignaller:
    """Signals each message to every running workflow of its customer.

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
            log.warning("temporal unreachable; signals stay owed", error=str(exc))
            return None
        return self._client

    async def __call__(self, signals: Sequence[tuple[str, CampaignSignal]]) -> int | None:
        """Signal every running campaign of each message's customer, a customer's messages
        in the order given."""
        if not signals:
            return 0
        client = await self._get_client()
        if client is None:
            return None
        by_customer: dict[str, list[CampaignSignal]] = {}
        for key, message in signals:
            by_customer.setdefault(key, []).append(message)

        async def send(handle: CampaignHandle, execution: WorkflowExecution) -> int:
            # One at a time: a campaign hears its customer's messages in the order owed.
            customer = execution.typed_search_attributes.get(SA.CUSTOMER_KEY) or ""
            for message in by_customer.get(customer, []):
                await self._signal(handle, message)
            return len(by_customer.get(customer, []))

        sent = 0
        try:
            for chunk in visibility.chunks(sorted(by_customer)):
                query = visibility.running(visibility.one_of(SA.CUSTOMER_KEY, chunk))
                sent += await visibility.each_running(client, query, send)
        except (RPCError, RuntimeError) as exc:
            log.warning("signalling campaigns failed", error=str(exc))
            self._client = None
            return None
        return sent

    async def _signal(self, handle: CampaignHandle, message: CampaignSignal) -> None:
        # One signal; a campaign that closed since it was listed answers NOT_FOUND, which
        # ``visibility.each_running`` counts as done.
        if isinstance(message, ConsentChanged):
            await handle.signal(CampaignWorkflow.consent_changed, message)
        else:
            await handle.signal(CampaignWorkflow.customer_event, message)
