"""The customer's local time: when a wait until a time of day or quiet hours let a campaign on."""

from __future__ import annotations

from datetime import datetime

from temporalio import activity

from cohortflow import schedule
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from workflows.campaign.activity_io import LocalTimeInput, LocalTimeResult
from workflows.campaign.contract import ActivityName


class LocalTimeActivities:
    """Reads customers' time zones and applies local-time rules in them."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @activity.defn(name=ActivityName.PLAN_LOCAL_TIME)
    async def plan_local_time(self, inp: LocalTimeInput) -> LocalTimeResult:
        """The UTC instant a local-time rule (wait until HH:MM, quiet hours) lets a campaign
        on, in the customer's zone (the spec's default when the customer's is unknown).

        Read-only and recorded in history as a local activity's result, so a replay never
        depends on this machine's time zone data.
        """
        async with self._db.transaction() as session:
            name = await customers.timezone_name(session, inp.customer_key)
        tz = schedule.zone(name, inp.default_timezone)
        now = datetime.fromisoformat(inp.now)
        if inp.until:
            at = schedule.next_local_time(now, tz, inp.until)
        elif inp.quiet_start:
            at = schedule.quiet_hours_end(now, tz, inp.quiet_start, inp.quiet_end)
        else:
            at = now
        local = at.astimezone(tz)
        offset = local.utcoffset()
        return LocalTimeResult(
            at=at.isoformat(),
            timezone=tz.key,
            local_at=local.strftime("%Y-%m-%d %H:%M %Z"),
            utc_offset_seconds=int(offset.total_seconds()) if offset is not None else 0,
        )
