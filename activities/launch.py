"""The bulk launcher's activity: launch the campaigns of a page of cohort entries."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from cohortflow.campaigns.launcher import Launcher
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec, parse_spec
from cohortflow.storage import campaigns, cohorts, launches
from cohortflow.storage.db import Database
from workflows.launch import LAUNCH_ACTIVITY, LaunchPage, LaunchPageResult

# Entries read, decided and started together; the cursor is heartbeated after each batch.
READ_BATCH = 100


class LaunchActivities:
    """Launches cohort entries through the idempotent :class:`Launcher`."""

    def __init__(self, client: Client, db: Database, settings: Settings) -> None:
        self._db = db
        self._launcher = Launcher(client, db, settings)
        self._specs: dict[tuple[str, int], CampaignSpec] = {}

    async def _spec(self, campaign_id: str, version: int) -> CampaignSpec:
        cached = self._specs.get((campaign_id, version))
        if cached is None:
            async with self._db.transaction() as session:
                document = await campaigns.get_spec(session, campaign_id, version)
            if document is None:
                raise LookupError(f"no spec {campaign_id!r} v{version}")
            cached = self._specs[(campaign_id, version)] = parse_spec(document)
        return cached

    @activity.defn(name=LAUNCH_ACTIVITY)
    async def launch_entries(self, page: LaunchPage) -> LaunchPageResult:
        """Launch up to ``page.limit`` entries after the cursor; resumes from a heartbeat."""
        spec = await self._spec(page.campaign_id, page.version)
        details = activity.info().heartbeat_details
        # A retried attempt carries on after the last entry the previous one finished.
        cursor = int(details[0]) if details else page.after_seq
        processed = 0
        while processed < page.limit:
            async with self._db.transaction() as session:
                entries = await cohorts.transitions_page(
                    session,
                    page.cohort_id,
                    cohorts.ENTERED,
                    after_seq=cursor,
                    up_to_seq=page.up_to_seq,
                    limit=min(READ_BATCH, page.limit - processed),
                )
            if not entries:
                return await self._result(page, cursor, done=True)
            await self._launcher.launch_transitions(
                spec, page.version, page.cohort_id, [(e.seq, e.customer_key) for e in entries]
            )
            processed += len(entries)
            cursor = entries[-1].seq
            activity.heartbeat(cursor)
        return await self._result(page, cursor, done=False)

    async def _result(self, page: LaunchPage, cursor: int, *, done: bool) -> LaunchPageResult:
        # Counted from the decisions, so entries a crashed attempt launched count too.
        async with self._db.transaction() as session:
            if not done:
                left = await cohorts.count_transitions(
                    session,
                    page.cohort_id,
                    cohorts.ENTERED,
                    after_seq=cursor,
                    up_to_seq=page.up_to_seq,
                )
                done = left == 0
            launched, refused = await launches.decision_counts(
                session, page.campaign_id, up_to_seq=cursor
            )
        return LaunchPageResult(cursor, launched, refused, done)
