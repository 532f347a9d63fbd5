"""Local-time rules in the customer's time zone: a wait until a time of day, quiet hours.

Pure functions over aware datetimes with ``zoneinfo``, so daylight-saving changes come out
right: 08:00 in New York is 12:00 UTC in summer and 13:00 UTC in winter. The campaign
workflow never calls these directly (time zone data is read from disk and may differ between
machines); the ``plan_local_time`` activity does, and the history records its answer.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone(name: str, default: str = "UTC") -> ZoneInfo:
    """The named zone, or ``default`` when the name is empty or unknown."""
    for candidate in (name, default, "UTC"):
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    raise AssertionError("UTC is always available")


def clock(text: str) -> time:
    """``HH:MM`` as a time of day."""
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def next_local_time(now: datetime, tz: ZoneInfo, at: str) -> datetime:
    """The first instant after ``now`` whose local time in ``tz`` is ``at`` (HH:MM), in UTC.

    Dates step in local calendar days, not 24-hour blocks, so a DST change in between does
    not shift the local time. A local time that does not exist that day (the spring-forward
    gap) resolves to the instant just after the gap.
    """
    local = now.astimezone(tz)
    target = clock(at)
    day = local.date()
    for _ in range(3):
        candidate = datetime.combine(day, target, tzinfo=tz)
        # Round-tripping through UTC normalises a time inside the gap to a real instant.
        instant = candidate.astimezone(ZoneInfo("UTC"))
        if instant > now:
            return instant
        day += timedelta(days=1)
    raise AssertionError("a local time of day recurs within three days")


def in_quiet_hours(now: datetime, tz: ZoneInfo, start: str, end: str) -> bool:
    """Whether ``now`` falls in the window [start, end) of local time; it may wrap midnight."""
    local = now.astimezone(tz).time().replace(tzinfo=None)
    begin, finish = clock(start), clock(end)
    if begin < finish:
        return begin <= local < finish
    return local >= begin or local < finish


def quiet_hours_end(now: datetime, tz: ZoneInfo, start: str, end: str) -> datetime:
    """When an outbound action due at ``now`` may go: ``now``, or when quiet hours end."""
    if not in_quiet_hours(now, tz, start, end):
        return now
    return next_local_time(now, tz, end)
