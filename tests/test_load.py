"""Issue 15, parts 7 and 4: a minute of steady load through the API process while campaigns
run (bench/load.py at 50 events/s), and the same with the app database (a private
PostgreSQL cluster) stopped for 12 s mid-run, which found PostgreSQL shutting down answered
500 (now 503) and the API's connection pool exhausted for minutes after the restart (each
request's own signal delivery was cancelled inside its database calls; now it is left to end
in the background)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bench.load import Options, main
from cohortflow.api.app import database_unavailable

# The processes start near 300 MB; their first minute under load grew them by 3 to 30 MB
# here (caches and pools warming up). 100 MB is over three times that: a leak of what each
# of the 3,000 requests handled (its body, parsed events, ORM state: tens of KB) passes it.
RSS_GROWTH_BOUND_MB = 100.0
# A sanity bound only: p99 was 4-7 s on a 2-core machine shared with other work; the
# sender's own timeout is 60 s.
P99_BOUND_MS = 30_000.0


def assert_nothing_lost_or_doubled(figures: dict[str, object]) -> None:
    """Every event stored once, every campaign ended as its spec says, every CRM effect
    once, the audit chain whole, every process still up."""
    assert figures["events_stored"] == figures["events_sent"] == figures["events_answered"]
    assert figures["campaign_states"] == {"completed": figures["campaigns"]}
    assert figures["fallbacks"] == 0, figures["fallback_reasons"]
    assert figures["duplicate_enrolments"] == figures["duplicate_list_adds"] == 0
    ledger = figures["ledger"]
    assert isinstance(ledger, dict)
    assert ledger["set_properties"] == figures["campaigns"]
    assert ledger.get("enroll_sequence", 0) == figures["crm_enrolments"]
    assert ledger.get("add_to_list", 0) == figures["crm_list_adds"]
    assert figures["audit_ok"], figures["audit"]
    assert figures["processes_alive"]


@pytest.mark.devserver
@pytest.mark.timeout(900)
async def test_a_minute_at_fifty_events_a_second() -> None:
    figures = await main(Options(rate=50, seconds=60, campaigns=20))
    assert (figures["errors"], figures["unavailable_503"]) == (0, 0), figures["error_kinds"]
    assert_nothing_lost_or_doubled(figures)
    assert figures["outbox_drained_s"] is not None  # the relay caught up
    assert figures["api_rss_growth_mb"] < RSS_GROWTH_BOUND_MB
    assert figures["worker_rss_growth_mb"] < RSS_GROWTH_BOUND_MB
    assert 0 < figures["p99_ms"] < P99_BOUND_MS


@pytest.mark.devserver
@pytest.mark.timeout(900)
async def test_the_database_away_mid_run_loses_and_doubles_nothing() -> None:
    figures = await main(Options(rate=50, seconds=40, campaigns=20, db_outage=12))
    # During the outage the API answered 503 with Retry-After, never anything else, and the
    # sender's retries of the same events were stored once.
    assert figures["errors"] == 0, figures["error_kinds"]
    outage = figures["db_outage"]
    assert isinstance(outage, dict)
    assert figures["unavailable_503"] > 0
    assert outage["down_at_s"] - 1 <= outage["first_503_s"] <= outage["up_at_s"]
    # And it answers again once the database is back: the pool recovers, not minutes later.
    assert outage["last_503_s"] <= outage["up_at_s"] + 10, outage
    # Campaigns carried on after it (their timers fired while it was away) with no fallback.
    assert_nothing_lost_or_doubled(figures)
    assert figures["outbox_drained_s"] is not None


class PgError(Exception):
    """What asyncpg raises, as far as SQLAlchemy's wrapper reads it."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        # PostgreSQL shutting down, starting up, out of connections: wait and retry.
        (DBAPIError("SELECT 1", None, PgError("57P01")), True),
        (DBAPIError("SELECT 1", None, PgError("57P03")), True),
        (DBAPIError("SELECT 1", None, PgError("53300")), True),
        (DBAPIError("SELECT 1", None, PgError("08006")), True),
        (DBAPIError("SELECT 1", None, asyncpg.CannotConnectNowError("starting up")), True),
        (PoolTimeout("QueuePool limit reached"), True),
        (ConnectionRefusedError(), True),
        # A statement of ours that is wrong stays a 500.
        (IntegrityError("INSERT", None, PgError("23505")), False),
        (DBAPIError("SELECT", None, PgError("42P01")), False),
        (DBAPIError("SELECT", None, Exception("no sqlstate")), False),
    ],
)
def test_which_database_errors_are_unavailability(error: BaseException, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable
