"""Store a demo campaign's spec version and launch its entrants, a bounded number at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from cohortflow.campaigns.launcher import Entry, Launcher
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns
from cohortflow.storage.db import Database


@dataclass
class Launch:
    """A campaign spec version and the customers entering its cohort."""

    spec: CampaignSpec
    version: int
    entrants: list[str]

    @property
    def campaign_id(self) -> str:
        """The campaign these entrants start."""
        return self.spec.campaign_id


async def save_version(db: Database, spec: CampaignSpec) -> int:
    """The spec's version in the store: a new one only when the spec changed."""
    async with db.transaction() as session:
        version, _ = await campaigns.save_spec_version(
            session, spec.campaign_id, spec.model_dump(mode="json"), created_by="demo"
        )
    return version


async def launch_all(
    launcher: Launcher,
    launch: Launch,
    advance: Callable[[], None],
    concurrency: int = 16,
) -> int:
    """Launch every entrant of ``launch``; returns how many were new."""
    gate = asyncio.Semaphore(concurrency)
    new = 0

    async def one(key: str) -> None:
        nonlocal new
        async with gate:
            entry = Entry(key, launch.spec.entry_cohort)
            if await launcher.launch(launch.spec, launch.version, entry):
                new += 1
            advance()

    await asyncio.gather(*(one(k) for k in launch.entrants))
    return new
