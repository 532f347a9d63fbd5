"""Incremental cohort evaluation: customers touched by new events are re-evaluated within
seconds, in every cohort evaluated at least once, through the same path as a full
evaluation (stored transitions, exit signals, idempotent launches).

Ingestion queues each touched customer in the transaction that stored the events
(``storage.cohorts.touch``); the refresher takes a page of them, evaluates those customers
in each cohort, then dequeues them as of when it took them, so a customer touched again
meanwhile is evaluated again. A refresher that dies mid-page leaves its page queued; the
evaluation is idempotent (a second one stores no transition), so repeating it is harmless.
Time alone (an aged feature crossing a threshold) changes membership too: the cohort's
schedule runs the full evaluation for that (``cohorts.schedules``).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from cohortflow.cohorts.service import CohortService
from cohortflow.storage import cohorts as cohort_store

log = structlog.get_logger(__name__)

PAGE = 1_000


class CohortRefresher:
    """Re-evaluates queued customers in every cohort."""

    def __init__(self, service: CohortService, *, page: int = PAGE) -> None:
        self._service = service
        self._page = page

    async def refresh_once(self) -> int:
        """Re-evaluate one page of queued customers; how many it held."""
        async with self._service.db.transaction() as session:
            claimed = await cohort_store.touched(session, self._page)
            cohort_ids = await cohort_store.evaluated_cohorts(session)
        if not claimed:
            return 0
        keys = [key for key, _ in claimed]
        for cohort_id in cohort_ids:
            report = await self._service.evaluate(cohort_id, keys=keys)
            diff = report.evaluation.diff
            if diff.entered or diff.exited:
                log.info(
                    "cohort refreshed",
                    cohort_id=cohort_id,
                    entered=len(diff.entered),
                    exited=len(diff.exited),
                    temporal=report.temporal,
                )
        async with self._service.db.transaction() as session:
            await cohort_store.refreshed(session, claimed)
        return len(claimed)

    async def run(self, stop: asyncio.Event, *, interval: float = 1.0) -> None:
        """Refresh every ``interval`` seconds (at once again while pages are full) until
        ``stop``; a failed round is logged and retried."""
        while not stop.is_set():
            try:
                while await self.refresh_once() == self._page and not stop.is_set():
                    pass
            except Exception as exc:  # the page stays queued; the next round retries it
                log.warning("cohort refresh failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
