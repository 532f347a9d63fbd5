"""Writes from concurrent campaigns coalesced into batch calls, under the CRM's ceiling.

Every CRM activity of a worker process hands its record to one ``CrmBatcher`` and awaits that
record's own outcome. Records of one kind (contact upserts; additions to, or removals from,
one list) queue together; a queue is sent when it holds a full batch, or ``linger`` after its
first record arrived, and only once the shared ceiling has a slot, so while campaigns wait
for a slot their records gather into fuller batches. Idle, a write waits at most ``linger``;
at the ceiling, every request carries as many records as the CRM takes. Sequence enrolments
cannot batch (HubSpot enrols one contact per call): they go one per call, under the same
ceiling.

A short rate limit (``CrmRetryAfter`` of a few seconds) holds every queue of the process and
the batch is sent again; a whole batch the CRM refuses is split and each record sent alone,
so only the record at fault fails. Other failures reach each waiting activity as its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from opentelemetry import context

from cohortflow import metrics
from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmConnector,
    CrmError,
    CrmRejected,
    CrmRetryAfter,
    Membership,
    RecordOutcome,
)
from cohortflow.observability import batch_span

# A rate limit shorter than this is waited out inside the batcher; a longer one is the
# waiting activities' to retry (Temporal then waits exactly as long, durably).
MAX_HOLD_SECONDS = 20.0

_T = TypeVar("_T")
Record = ContactWrite | Membership


@dataclass
class _Waiting:
    record: Record
    outcome: asyncio.Future[RecordOutcome]
    # The submitting activity's trace, which the batch's call joins (see ``batch_span``).
    trace: context.Context = field(default_factory=context.get_current)


@dataclass
class _Queue:
    """Records of one kind waiting for a call."""

    waiting: list[_Waiting] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task[None] | None = None


@dataclass
class BatcherStats:
    """What the batcher sent, for benches and metrics."""

    requests: int = 0
    records: int = 0
    rate_limited: int = 0


class CrmBatcher:
    """Coalesces one process's CRM writes into batch calls under the shared ceiling."""

    def __init__(self, connector: CrmConnector, *, linger: timedelta) -> None:
        self.connector = connector
        self._linger = linger.total_seconds()
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._alone_tasks: set[asyncio.Task[None]] = set()
        self._held_until = 0.0
        self.stats = BatcherStats()

    async def upsert(self, write: ContactWrite) -> RecordOutcome:
        """Set a contact's properties, in the next batch of upserts."""
        return await self._submit(("upsert", ""), write)

    async def add_to_list(self, member: Membership) -> RecordOutcome:
        """Add a contact to a list, in the next batch for that list."""
        return await self._submit(("list_add", member.target_id), member)

    async def remove_from_list(self, member: Membership) -> RecordOutcome:
        """Remove a contact from a list, in the next batch for that list."""
        return await self._submit(("list_remove", member.target_id), member)

    async def enroll(self, enrolment: Membership) -> RecordOutcome:
        """Enrol a contact in a sequence: one call of its own."""
        return await self._alone(lambda: self.connector.enroll(enrolment))

    async def unenroll(self, enrolment: Membership) -> RecordOutcome:
        """Take a contact out of a sequence: one call of its own."""
        return await self._alone(lambda: self.connector.unenroll(enrolment))

    async def read_contact(self, contact_key: str) -> ContactState | None:
        """Read a contact back (after an ambiguous failure): one call of its own."""
        return await self._alone(lambda: self.connector.read_contact(contact_key))

    async def aclose(self) -> None:
        """Stop the senders; records still waiting fail as unavailable."""
        for queue in self._queues.values():
            if queue.sender is not None:
                queue.sender.cancel()
        await self.connector.aclose()

    # ------------------------------------------------------------------ sending

    def _batch_size(self, kind: tuple[str, str]) -> int:
        if kind[0] == "upsert":
            return self.connector.max_batch
        return self.connector.max_list_batch

    async def _submit(self, kind: tuple[str, str], record: Record) -> RecordOutcome:
        queue = self._queues.setdefault(kind, _Queue())
        waiting = _Waiting(record, asyncio.get_running_loop().create_future())
        queue.waiting.append(waiting)
        if len(queue.waiting) >= self._batch_size(kind):
            queue.full.set()
        if queue.sender is None or queue.sender.done():
            queue.sender = asyncio.create_task(self._send_queue(kind, queue))
        return await waiting.outcome

    async def _send_queue(self, kind: tuple[str, str], queue: _Queue) -> None:
        """Send the queue's records, a batch per call, until it is empty. Whatever stops it
        (the database behind the ceiling failing) fails the records waiting, never hangs them.
        """
        try:
            await self._drain(kind, queue)
        except Exception as exc:
            _fail(queue.waiting, exc)
            queue.waiting.clear()
            raise

    async def _drain(self, kind: tuple[str, str], queue: _Queue) -> None:
        size = self._batch_size(kind)
        while queue.waiting:
            if len(queue.waiting) < size:
                queue.full.clear()
                # Linger: concurrent campaigns join this batch meanwhile.
                await _wait_for(queue.full.wait(), self._linger)
            await self._slot()
            batch = queue.waiting[:size]
            del queue.waiting[: len(batch)]
            live = [w for w in batch if not w.outcome.done()]  # an activity may have gone
            if live:
                await self._send_batch(kind, live, queue)

    async def _send_batch(
        self, kind: tuple[str, str], batch: list[_Waiting], queue: _Queue
    ) -> None:
        try:
            with batch_span(f"CRM batch {kind[0]}", [w.trace for w in batch]):
                outcomes = await self._call(kind, [w.record for w in batch])
        except CrmRetryAfter as exc:
            if self._hold(exc):
                queue.waiting[:0] = batch  # first in line once the hold is over
                return
            _fail(batch, exc)
        except CrmRejected as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # The CRM refused the whole batch: send each record alone to find the one at fault.
            for waiting in batch:
                task = asyncio.create_task(self._send_alone(kind, waiting))
                self._alone_tasks.add(task)
                task.add_done_callback(self._alone_tasks.discard)
        except CrmError as exc:
            _fail(batch, exc)
        else:
            self.stats.records += len(batch)
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if not waiting.outcome.done():
                    waiting.outcome.set_result(outcome)

    async def _send_alone(self, kind: tuple[str, str], waiting: _Waiting) -> None:
        try:
            outcome = await self._alone(lambda: self._call(kind, [waiting.record]))
        except CrmError as exc:
            _fail([waiting], exc)
        else:
            if not waiting.outcome.done():
                waiting.outcome.set_result(outcome[0])

    async def _call(self, kind: tuple[str, str], records: Sequence[Record]) -> list[RecordOutcome]:
        operation, target = kind
        self.stats.requests += 1
        metrics.count(
            "cohortflow_crm_records",
            "Records sent to the CRM",
            {"operation": operation},
            len(records),
        )
        if operation == "upsert":
            writes = [r for r in records if isinstance(r, ContactWrite)]
            return await self.connector.upsert_contacts(writes)
        members = [r for r in records if isinstance(r, Membership)]
        if operation == "list_add":
            return await self.connector.add_to_list(target, members)
        return await self.connector.remove_from_list(target, members)

    async def _alone(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """One call under the ceiling, waiting out short rate limits."""
        while True:
            await self._slot()
            try:
                return await call()
            except CrmRetryAfter as exc:
                if not self._hold(exc):
                    raise

    async def _slot(self) -> None:
        """Wait out a rate-limit hold (the connector then takes a slot under the shared
        ceiling for each request it sends)."""
        # Polled, not an Event: a hold may be extended while we sleep, and ends by time alone.
        while (held := self._held_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(held)

    def _hold(self, exc: CrmRetryAfter) -> bool:
        """Hold every queue for a short rate limit; False for one too long to wait here."""
        self.stats.rate_limited += 1
        metrics.count(
            "cohortflow_crm_rate_limited", "CRM answers that asked to slow down (429)", {}
        )
        if exc.seconds > MAX_HOLD_SECONDS:
            return False
        self._held_until = max(self._held_until, time.monotonic() + exc.seconds)
        return True


async def _wait_for(awaitable: Awaitable[object], seconds: float) -> None:
    """Wait for ``awaitable`` at most ``seconds``; a timeout is not an error here."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, seconds)


def _fail(batch: list[_Waiting], error: Exception) -> None:
    for waiting in batch:
        if not waiting.outcome.done():
            waiting.outcome.set_exception(error)
