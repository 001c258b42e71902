"""The token service's view of the GC lock: its state machine and drain ack (no I/O, fake clocks)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cluster_registry.gate.protocol import LeaseView, heartbeat_name
from cluster_registry.gate.state import GateState, Lock

WALL = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lease(holder: str | None, renew: datetime = WALL, duration: int = 15) -> LeaseView:
    return LeaseView("gc", holder, renew, duration)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def st(clock: Clock) -> GateState:
    s = GateState(clock=clock, wall=lambda: WALL + timedelta(seconds=clock.t - 1000))
    s.heartbeat_ok(clock.t)
    return s


def test_unsynced_replica_refuses_push_tokens(clock: Clock) -> None:
    s = GateState(clock=clock)
    assert s.status() is Lock.UNKNOWN and not s.synced
    s.observe(None)
    assert s.status() is Lock.UNKNOWN, "no heartbeat yet: GC cannot know of this replica"
    s.heartbeat_ok(clock.t)
    assert s.status() is Lock.FREE


def test_lock_held_until_observed_renewal_expires(st: GateState, clock: Clock) -> None:
    st.observe(lease("gc-1"))
    assert st.status() is Lock.HELD
    assert 1 <= st.retry_after() <= 16
    clock.t += 10
    st.observe(lease("gc-1"))  # re-read, same renewal: the hold still counts from the first sighting
    st.heartbeat_ok(clock.t)
    clock.t += 5.5
    assert st.status() is Lock.FREE, "expired 15 s after the renewal was observed: a dead GC frees writes"


def test_renewals_extend_and_release_frees(st: GateState, clock: Clock) -> None:
    st.observe(lease("gc-1"))
    for i in range(1, 5):
        clock.t += 5
        st.heartbeat_ok(clock.t)
        st.observe(lease("gc-1", WALL + timedelta(seconds=5 * i)))
        assert st.status() is Lock.HELD
    st.observe(lease(None, WALL + timedelta(seconds=25)))
    assert st.status() is Lock.FREE


def test_clock_skew_never_shortens_a_hold(st: GateState, clock: Clock) -> None:
    # The GC's clock runs 40 s behind the gate's: by wall clocks the lease looks expired already.
    st.observe(lease("gc-1", WALL - timedelta(seconds=40)))
    assert st.status() is Lock.HELD


def test_long_dead_lock_is_ignored(st: GateState) -> None:
    st.observe(lease("gc-old", WALL - timedelta(hours=2)))
    assert st.status() is Lock.FREE


def test_stale_watch_or_heartbeat_fails_closed(st: GateState, clock: Clock) -> None:
    st.observe(None)
    assert st.status() is Lock.FREE
    clock.t += 16
    assert st.status() is Lock.UNKNOWN, "heartbeat not renewed: GC may count this replica as dead"
    st.heartbeat_ok(clock.t)
    assert st.status() is Lock.FREE
    clock.t += 46
    st.heartbeat_ok(clock.t)
    assert st.status() is Lock.UNKNOWN, "no news from the watch for too long"
    st.confirm()
    assert st.status() is Lock.FREE


def test_idle_replica_acks_at_once(st: GateState) -> None:
    woken: list[int] = []
    st.on_drained = lambda: woken.append(1)
    st.observe(lease("gc-8"))
    assert woken and st.ack_wanted() == "gc-8"


def test_disabled_lock_always_free(clock: Clock) -> None:
    s = GateState(enabled=False, clock=clock)
    assert s.status() is Lock.FREE and s.synced


def test_heartbeat_name_is_dns_label() -> None:
    assert heartbeat_name("cr-gc", "registry-abc") == "cr-gc-gate-registry-abc"
    long = heartbeat_name("cluster-registry-gc", "x" * 80)
    assert len(long) <= 63 and long == heartbeat_name("cluster-registry-gc", "x" * 80)


def test_last_gc_window_is_read_from_the_lock_lease_and_kept_across_reads(st: GateState) -> None:
    from types import SimpleNamespace

    from cluster_registry.gate.protocol import ANNOTATION_LAST_WINDOW, view

    def v1(annotations: dict[str, str] | None) -> LeaseView:
        meta = SimpleNamespace(name="gc", annotations=annotations, resource_version="1")
        spec = SimpleNamespace(holder_identity=None, renew_time=WALL, acquire_time=None, lease_duration_seconds=15)
        return view(SimpleNamespace(metadata=meta, spec=spec))

    assert st.last_window is None
    st.observe(v1({ANNOTATION_LAST_WINDOW: "2.345"}))
    assert st.last_window == 2.345
    st.observe(v1({ANNOTATION_LAST_WINDOW: "garbage"}))
    st.observe(None)
    assert st.last_window == 2.345, "an unreadable annotation or a deleted Lease keeps the last known window"


def test_push_tokens_delay_the_drain_ack_until_they_died(st: GateState, clock: Clock) -> None:
    st.observe(None)
    assert st.grant_push(20.0) is Lock.FREE
    st.observe(lease("gc-1"))
    assert st.grant_push(20.0) is Lock.HELD, "no push token while GC holds the lock"
    assert st.ack_wanted() is None, "a push token issued before the lock is still alive"
    assert st.drain_in() == pytest.approx(20.0)
    clock.t += 12
    st.observe(lease("gc-1", renew=WALL + timedelta(seconds=12)))  # GC renewed
    assert st.ack_wanted() is None and st.drain_in() == pytest.approx(8.0)
    clock.t += 8
    assert st.ack_wanted() == "gc-1" and st.drain_in() == 0
    st.acknowledged("gc-1")
    assert st.drain_in() is None


def test_a_push_token_issued_longer_ago_than_its_lifetime_does_not_delay_the_ack(st: GateState, clock: Clock) -> None:
    st.observe(None)
    assert st.grant_push(20.0) is Lock.FREE
    clock.t += 20
    st.observe(lease("gc-2", renew=WALL + timedelta(seconds=20)))
    assert st.ack_wanted() == "gc-2" and st.drain_in() == 0, "no push token alive: ack at once"


def test_a_push_token_issued_1s_before_the_lock_is_waited_for(st: GateState, clock: Clock) -> None:
    st.observe(None)
    assert st.grant_push(20.0) is Lock.FREE
    clock.t += 1
    st.observe(lease("gc-3", renew=WALL + timedelta(seconds=1)))
    assert st.ack_wanted() is None and st.drain_in() == pytest.approx(19.0)


def test_the_heartbeat_hint_says_when_push_tokens_die_and_wakes_on_the_first(st: GateState, clock: Clock) -> None:
    woken: list[int] = []
    st.on_busy = lambda: woken.append(1)
    st.observe(None)
    assert st.push_until_wall() == WALL, "none issued: dead now"
    st.grant_push(20.0)
    clock.t += 5
    st.grant_push(20.0)
    assert woken == [1], "published at once only when the replica goes from no live token to one"
    assert st.push_until_wall() == WALL + timedelta(seconds=25)
    clock.t += 21
    assert st.push_until_wall() == WALL + timedelta(seconds=26), "past: now"
    st.heartbeat_ok(clock.t)
    st.confirm()
    assert st.grant_push(20.0) is Lock.FREE
    assert woken == [1, 1]


def test_gc_waits_for_the_latest_push_token_end_of_live_replicas_only() -> None:
    from cluster_registry.gate.protocol import ANNOTATION_PUSH_UNTIL, quiet_in, view
    from types import SimpleNamespace

    def hb(name: str, renew: datetime, until: str | None) -> LeaseView:
        meta = SimpleNamespace(name=name, annotations={ANNOTATION_PUSH_UNTIL: until} if until else None, resource_version="1")
        spec = SimpleNamespace(holder_identity=name, renew_time=renew, acquire_time=None, lease_duration_seconds=20)
        return view(SimpleNamespace(metadata=meta, spec=spec))

    now = WALL + timedelta(seconds=100)
    later = (now + timedelta(seconds=12.5)).isoformat(timespec="milliseconds")
    assert quiet_in([], now) == 0
    assert quiet_in([hb("a", now, later), hb("b", now, WALL.isoformat()), hb("c", now, None)], now) == 12.5
    assert quiet_in([hb("gone", WALL, later)], now) == 0, "a dead replica's hint is not waited for"
    assert quiet_in([hb("a", now, "not a time")], now) == 0
