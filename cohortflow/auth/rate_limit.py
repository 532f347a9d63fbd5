"""Requests per token: a token bucket each, in this process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cohortflow.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """At most ``rate`` requests a second per key, with bursts up to ``burst``.

    Per process: behind N API processes a token gets N times the rate. That bounds a flood
    from one client, which is the point, without a shared store on every request.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> None:
        """Spend one request of ``key``'s bucket; :class:`RateLimited` when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self._rate
            raise RateLimited(f"too many requests; retry after {wait:.1f} s", retry_after=wait)
        bucket.tokens -= 1.0
