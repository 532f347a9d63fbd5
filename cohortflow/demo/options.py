"""What the demo runs, how big it is, and its seeded choices (the same on every machine)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path

WINBACK_SPEC = "winback_sensitive"
DRIP_SPEC = "onboarding_drip"
DEMO_AS_OF = date(1998, 6, 30)  # the end of the CDNOW log is the win-back's "now"
CHANNEL, PURPOSE = "email", "marketing"
# About three hours apart around the globe: whatever the hour the demo runs, quiet hours hold
# some customers back and let others through.
DEMO_TIMEZONES = (
    "Pacific/Honolulu",
    "America/Los_Angeles",
    "America/New_York",
    "Europe/London",
    "Asia/Dubai",
    "Asia/Kolkata",
    "Asia/Singapore",
    "Australia/Sydney",
)


@dataclass(frozen=True)
class DemoOptions:
    """How big the demo is and how it behaves."""

    customers: int = 300  # CDNOW customers sampled for the win-back
    signups: int = 60  # new customers signed up through the API for the drip
    timezone: str | None = None  # every customer's zone; None spreads them over DEMO_TIMEZONES
    opt_out_share: float = 0.1
    purchase_share: float = 0.4  # signups who buy while the drip waits for their purchase
    entry_quantile: float = 0.5
    # Every win-back entrant is high risk; the top fifth of them by spend are high value and
    # need an operator's approval, so any sample size shows both paths.
    approval_churn_quantile: float = 0.0
    approval_value_quantile: float = 0.8
    settle_timeout_seconds: float = 600.0
    # A campaign whose wait ends later than this is parked: the demo reports it and moves on.
    parked_after_seconds: float = 60.0


def example_spec(name: str) -> Path:
    """A spec shipped in ``examples/`` (packaged as ``cohortflow/examples/``)."""
    return Path(str(resources.files("cohortflow") / "examples" / f"{name}.yaml"))


def _bucket(salt: str, source_id: str) -> int:
    return int(hashlib.sha256(f"{salt}:{source_id}".encode()).hexdigest()[:8], 16)


def seeded(salt: str, source_id: str, share: float) -> bool:
    """A deterministic ``share`` of ids, independent for each ``salt``."""
    return _bucket(salt, source_id) % 10_000 < share * 10_000


def timezone_for(source_id: str, options: DemoOptions) -> str:
    """The customer's time zone: the one asked for, or a seeded spread around the globe."""
    if options.timezone:
        return options.timezone
    return DEMO_TIMEZONES[_bucket("timezone", source_id) % len(DEMO_TIMEZONES)]
