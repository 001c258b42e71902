"""Leader election's pure core: who may take or keep a Lease, and whether a Lease is held."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster_registry.leader import Decision, LeaseRecord, decide, held_at

T0 = dt.datetime(2027, 1, 15, 8, 0, 0, tzinfo=dt.timezone.utc)


def rec(holder: str, duration: float = 15, renew: dt.datetime | None = T0) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration=duration, renew_time=renew, acquire_time=T0, transitions=0, version="1")


@pytest.mark.parametrize(
    ("record", "seen_for", "decision"),
    [
        (None, 0, Decision.ACQUIRE),  # no Lease yet
        (rec(""), 0, Decision.ACQUIRE),  # released
        (rec("me"), 100, Decision.RENEW),  # ours, even if we were slow
        (rec("other"), 0, Decision.WAIT),
        (rec("other"), 14.9, Decision.WAIT),
        (rec("other"), 15.1, Decision.ACQUIRE),  # not renewed for longer than its duration
        (rec("other", duration=60), 30, Decision.WAIT),
    ],
)
def test_decide(record: LeaseRecord | None, seen_for: float, decision: Decision) -> None:
    assert decide(record, "me", seen_for) is decision


def test_record_key_changes_on_renewal_only() -> None:
    a = rec("x")
    assert a.key == rec("x").key
    assert a.key != rec("x", renew=T0 + dt.timedelta(seconds=2)).key
    assert a.key != rec("y").key


@pytest.mark.parametrize(
    ("record", "at", "held"),
    [
        (None, T0, False),
        (rec(""), T0, False),
        (rec("gc", renew=None), T0, False),
        (rec("gc"), T0 + dt.timedelta(seconds=14), True),
        (rec("gc"), T0 + dt.timedelta(seconds=15), False),
    ],
)
def test_held_at(record: LeaseRecord | None, at: dt.datetime, held: bool) -> None:
    assert held_at(record, at) is held
