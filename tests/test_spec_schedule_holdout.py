"""Local-time rules across daylight-saving changes, the holdout draw's share per score band,
and the uplift interval the report prints."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from cohortflow.campaigns.report import newcombe, wilson
from cohortflow.schedule import in_quiet_hours, next_local_time, quiet_hours_end
from workflows.campaign.interpreter import holdout_variant, score_band

NEW_YORK = ZoneInfo("America/New_York")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Winter (EST, UTC-5): 08:00 local is 13:00 UTC.
        ("2026-03-07T12:00:00", "2026-03-07T13:00:00"),
        # The night clocks spring forward (2026-03-08 02:00 EST -> 03:00 EDT): 12:00 UTC.
        ("2026-03-08T06:00:00", "2026-03-08T12:00:00"),
        # Just after 08:00 local before the change: the next 08:00 is after it, in EDT.
        ("2026-03-07T13:30:00", "2026-03-08T12:00:00"),
        # The night clocks fall back (2026-11-01 02:00 EDT -> 01:00 EST): 13:00 UTC.
        ("2026-11-01T04:30:00", "2026-11-01T13:00:00"),
    ],
)
def test_the_next_local_time_follows_daylight_saving(now: str, expected: str) -> None:
    assert next_local_time(utc(now), NEW_YORK, "08:00") == utc(expected)


def test_a_local_time_inside_the_spring_forward_gap_resolves_after_the_gap() -> None:
    # 02:30 does not exist in New York on 2026-03-08: it resolves to 03:30 EDT (07:30 UTC).
    assert next_local_time(utc("2026-03-08T05:00:00"), NEW_YORK, "02:30") == utc(
        "2026-03-08T07:30:00"
    )


def test_quiet_hours_that_wrap_midnight_end_at_their_local_end_across_a_dst_change() -> None:
    # 00:30 EDT on the night clocks fall back, inside 21:00-08:00: opens at 08:00 EST.
    now = utc("2026-11-01T04:30:00")
    assert in_quiet_hours(now, NEW_YORK, "21:00", "08:00")
    assert quiet_hours_end(now, NEW_YORK, "21:00", "08:00") == utc("2026-11-01T13:00:00")
    # 12:00 local is outside: the action goes now.
    noon = utc("2026-11-01T17:00:00")
    assert not in_quiet_hours(noon, NEW_YORK, "21:00", "08:00")
    assert quiet_hours_end(noon, NEW_YORK, "21:00", "08:00") == noon


def test_quiet_hours_within_one_day() -> None:
    now = utc("2026-06-01T13:30:00")  # 09:30 EDT
    assert in_quiet_hours(now, NEW_YORK, "09:00", "10:00")
    assert quiet_hours_end(now, NEW_YORK, "09:00", "10:00") == utc("2026-06-01T14:00:00")
    assert not in_quiet_hours(utc("2026-06-01T14:00:00"), NEW_YORK, "09:00", "10:00")


@pytest.mark.parametrize("percent", [5.0, 10.0, 33.0, 50.0])
def test_ten_thousand_assignments_hold_the_share_in_every_score_band(percent: float) -> None:
    # Keys shaped like the real ones: "c_" + hex of an HMAC-SHA256 of the source id.
    keys = [f"c_{hashlib.sha256(f'customer-{i}'.encode()).hexdigest()[:24]}" for i in range(10_000)]
    bands = [score_band(((i * 7919) % 10_000) / 10_000, [0.3, 0.7]) for i in range(10_000)]
    arms = [
        holdout_variant("winback", key, percent, band)
        for key, band in zip(keys, bands, strict=True)
    ]
    share = 100 * arms.count("control") / len(arms)
    assert abs(share - percent) <= 1.5, share
    for band in {"b0", "b1", "b2"}:
        in_band = [a for a, b in zip(arms, bands, strict=True) if b == band]
        # About 3,000-4,000 per band: the same bound with the band's larger sampling error.
        assert abs(100 * in_band.count("control") / len(in_band) - percent) <= 2.5


def test_the_draw_is_deterministic_and_zero_percent_holds_nobody_out() -> None:
    assert holdout_variant("c", "k", 10, "b1") == holdout_variant("c", "k", 10, "b1")
    assert {holdout_variant("c", f"k{i}", 0) for i in range(1000)} == {"treatment"}
    assert score_band(0.29, [0.3, 0.7]) == "b0"
    assert score_band(0.3, [0.3, 0.7]) == "b1"
    assert score_band(0.95, [0.3, 0.7]) == "b2"


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, example (56/70 vs 48/80), method 10.
    uplift = newcombe(56, 70, 48, 80)
    assert uplift.difference == pytest.approx(0.2)
    assert uplift.low == pytest.approx(0.0524, abs=5e-4)
    assert uplift.high == pytest.approx(0.3339, abs=5e-4)
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=5e-4)
