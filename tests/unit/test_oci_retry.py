from __future__ import annotations

import email.utils
import random

import pytest

from cluster_registry.oci.retry import RetryPolicy, is_retryable_status, parse_retry_after


@pytest.mark.parametrize(
    ("status", "retry"),
    [(429, True), (500, True), (502, True), (503, True), (504, True), (599, True),
     (200, False), (201, False), (400, False), (401, False), (403, False), (404, False), (409, False)],
)
def test_retryable_status(status: int, retry: bool) -> None:
    assert is_retryable_status(status) is retry


def test_backoff_is_bounded_exponential_with_jitter() -> None:
    p = RetryPolicy(attempts=6, base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        delays = [p.delay(retry, rng=rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # jitter spreads over the whole window
        assert len(set(delays)) > 100


def test_retry_after_wins_and_is_capped() -> None:
    p = RetryPolicy(max_retry_after=30)
    assert p.delay(1, retry_after=7) == 7
    assert p.delay(1, retry_after=3600) == 30
    assert p.delay(1, retry_after=-1) == 0


def test_attempts_bound() -> None:
    p = RetryPolicy(attempts=3)
    assert [p.should_retry(a) for a in (1, 2, 3, 4)] == [True, True, False, False]
    assert not RetryPolicy(attempts=1).should_retry(1)


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    http_date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after(http_date, now) == pytest.approx(12, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 100, usegmt=True), now) == 0.0
