"""Many concurrent callers' database work in one transaction: group commit.

A CRM write touches the database twice (the gate before the CRM call, the record after it),
a few statements each, and every one of them runs under locks every process shares (the
customer's, the audit chain's); a launch records its entry before it starts the workflow.
One at a time each costs more than the call it guards, and on SQLite the writers queue for
the one write lock: at a CRM's batch ceiling (a thousand records a second), or a burst of
launches, the database is the bottleneck. So concurrent callers hand their item to a
``GroupCommit`` and await their own result, and its sender runs everything that arrived
within ``linger`` as one transaction. Idle, an item waits at most ``linger`` (20 ms by
default, small beside the call it guards); a transaction that fails fails each of its
items, whose callers retry (Temporal, for activities).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, TypeVar

from opentelemetry import context
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.observability import batch_span
from cohortflow.storage.db import Database

_I = TypeVar("_I")
_R = TypeVar("_R")

RunMany = Callable[[AsyncSession, Sequence[_I]], Awaitable[list[_R]]]


@dataclass
class _Waiting(Generic[_I, _R]):
    item: _I
    result: asyncio.Future[_R]
    # The submitting activity's trace, which the shared transaction joins.
    trace: context.Context = field(default_factory=context.get_current)


class GroupCommit(Generic[_I, _R]):
    """Runs items that arrive together through ``run_many`` in one transaction."""

    def __init__(
        self,
        db: Database,
        run_many: RunMany[_I, _R],
        *,
        linger: timedelta = timedelta(milliseconds=20),
        max_items: int = 500,
    ) -> None:
        self._db = db
        self._run_many = run_many
        self._linger = linger.total_seconds()
        self._max_items = max_items
        self._waiting: list[_Waiting[_I, _R]] = []
        self._full = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: _I) -> _R:
        """Run ``item`` with whatever else arrives meanwhile; its own result."""
        waiting = _Waiting[_I, _R](item, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if len(self._waiting) >= self._max_items:
            self._full.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await waiting.result

    async def aclose(self) -> None:
        """Stop the sender; items still waiting are failed."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        _fail(self._waiting, RuntimeError("the group commit was closed"))

    async def _send(self) -> None:
        while self._waiting:
            if len(self._waiting) < self._max_items:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger)
            batch = self._waiting[: self._max_items]
            del self._waiting[: len(batch)]
            live = [w for w in batch if not w.result.done()]
            if not live:
                continue
            try:
                with batch_span("group commit", [w.trace for w in live]):
                    async with self._db.transaction() as session:
                        results = await self._run_many(session, [w.item for w in live])
            except Exception as exc:
                _fail(live, exc)
                continue
            for waiting, result in zip(live, results, strict=True):
                if not waiting.result.done():
                    waiting.result.set_result(result)


def _fail(batch: Sequence[_Waiting[_I, _R]], error: Exception) -> None:
    for waiting in batch:
        if not waiting.result.done():
            waiting.result.set_exception(error)
