"""Heartbeats for activities that may wait: a CRM write waits its turn for a batch and the
CRM's ceiling, so a lost worker is noticed within the heartbeat timeout, not the (longer)
start-to-close timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from temporalio import activity

# Well inside the 30 s heartbeat timeout the workflow schedules CRM calls with.
HEARTBEAT_EVERY = timedelta(seconds=5)


@contextlib.asynccontextmanager
async def heartbeating() -> AsyncIterator[None]:
    """Heartbeat while the block runs: an activity may wait its turn for a batch and the
    CRM's ceiling, and a lost worker is then noticed within the heartbeat timeout."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY.total_seconds())
            activity.heartbeat()

    beater = asyncio.create_task(beat())
    try:
        yield
    finally:
        beater.cancel()
