"""Retry policy: which failures are retried and how long to wait (pure; time passed in)."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504}) | frozenset(range(505, 600))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter.

    ``attempts`` counts every try (1 = no retry). The wait before retry *n* (1-based) is uniform in
    ``[0, min(max_delay, base_delay * 2**(n-1))]``, or the server's ``Retry-After`` when given
    (capped at ``max_retry_after``; a longer demand fails the call as temporary at once).
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        cap = min(self.max_delay, self.base_delay * (2 ** max(retry - 1, 0)))
        return (rng or random).uniform(0, cap)

    def should_retry(self, attempt: int) -> bool:
        """After failed try number ``attempt`` (1-based), is there another?"""
        return attempt < self.attempts


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (epoch seconds): delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
