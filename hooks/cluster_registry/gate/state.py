"""The token service's in-memory view of the write lock, of the push tokens it issued and its drain
ack (no I/O).

Fed by the Lease watch (``observe``/``confirm``) and the heartbeat (``heartbeat_ok``); read on
every push-token request (``grant_push``). Thread-safe: the watch and the heartbeat run in threads.
A replica is *drained* for a lock generation once it has seen the lock and every push token it
issued before has expired at distribution (``push_until``, which includes a grace for requests
authorised just before expiry and for clock skew between nodes).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Callable

from cluster_registry.gate.protocol import GATE_LEASE_SECONDS, LeaseView, expired_by_clock

STALE_BY_CLOCK = 300.0  # a lock whose renewTime is this far past expiry by the wall clock is ignored


class Lock(str, Enum):
    FREE = "free"
    HELD = "held"  # GC holds the lock: no push token (503, X-Cluster-Registry-Lock: gc)
    UNKNOWN = "unknown"  # cannot vouch for the lock's state: no push token either (fail closed)


class GateState:
    def __init__(
        self,
        *,
        enabled: bool = True,
        stale_after: float = 45.0,
        heartbeat_fence: float | None = GATE_LEASE_SECONDS - 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.enabled = enabled
        self.stale_after = stale_after
        self.heartbeat_fence = heartbeat_fence  # None: no heartbeat (no drain acks) expected
        self.clock, self.wall = clock, wall
        self._mu = threading.Lock()
        self.holder: str | None = None
        self.renew: datetime | None = None
        self.duration = 0
        self.observed_at = 0.0
        self.confirmed_at: float | None = None
        self.heartbeat_at: float | None = None
        self.push_until = 0.0  # monotonic: the last push token issued is dead at distribution by then
        self.acked: str | None = None
        self.last_window: float | None = None  # the last GC run's read-only window (the lock Lease's annotation)
        self.on_drained: Callable[[], None] = lambda: None
        self.on_busy: Callable[[], None] = lambda: None  # a push token issued while none was alive

    # -- fed by the watch and the heartbeat ---------------------------------------------------------
    def observe(self, lease: LeaseView | None) -> None:
        """A fresh read of the lock Lease (None: it does not exist)."""
        now = self.clock()
        with self._mu:
            holder = lease.holder if lease else None
            if lease and holder and expired_by_clock(lease, self.wall(), slack=STALE_BY_CLOCK):
                holder = None  # left behind by a GC that died long ago
            renew = lease.renew_time if lease else None
            if (holder, renew) != (self.holder, self.renew):
                self.observed_at = now
            self.holder, self.renew = holder, renew
            self.duration = lease.duration if lease else 0
            if lease and lease.last_window is not None:
                self.last_window = lease.last_window
            self.confirmed_at = now
            drained = self._drained_locked(now)
        if drained:
            self.on_drained()

    def confirm(self) -> None:
        """The watch is healthy (a bookmark, or a watch that ended cleanly) and saw no change."""
        with self._mu:
            self.confirmed_at = self.clock()

    def heartbeat_ok(self, started: float) -> None:
        with self._mu:
            self.heartbeat_at = started

    # -- read per request ---------------------------------------------------------------------------
    def _status_locked(self, now: float) -> Lock:
        if not self.enabled:
            return Lock.FREE
        if self.holder and now < self.observed_at + self.duration:
            return Lock.HELD
        if self.confirmed_at is None or now - self.confirmed_at > self.stale_after:
            return Lock.UNKNOWN
        if self.heartbeat_fence is not None and (
            self.heartbeat_at is None or now - self.heartbeat_at > self.heartbeat_fence
        ):
            return Lock.UNKNOWN
        return Lock.FREE

    def status(self) -> Lock:
        with self._mu:
            return self._status_locked(self.clock())

    def retry_after(self) -> int:
        """Seconds a refused writer should wait: the rest of the current hold, at least 1."""
        with self._mu:
            left = self.observed_at + self.duration - self.clock()
        return max(1, min(60, int(left) + 1))

    def grant_push(self, lifetime: float) -> Lock:
        """Record a push token living ``lifetime`` seconds (grace included) if the lock is free;
        otherwise say why not."""
        with self._mu:
            now = self.clock()
            st = self._status_locked(now)
            busy = st is Lock.FREE and self.push_until <= now
            if st is Lock.FREE:
                self.push_until = max(self.push_until, now + lifetime)
        if busy:
            self.on_busy()
        return st

    def push_until_wall(self) -> datetime:
        """The wall time by which every push token issued so far has died (now, if none is alive):
        the heartbeat's hint for GC to lock in a quiet moment."""
        with self._mu:
            left = max(0.0, self.push_until - self.clock())
        return self.wall() + timedelta(seconds=left)

    def drain_in(self) -> float | None:
        """Seconds until this replica may acknowledge the held lock (0: now), None when not held."""
        with self._mu:
            now = self.clock()
            if not self.holder or now >= self.observed_at + self.duration or self.acked == self.holder:
                return None  # nothing to ack
            return max(0.0, self.push_until - now)

    # -- the drain ack ------------------------------------------------------------------------------
    def _drained_locked(self, now: float) -> bool:
        return bool(self.holder) and now >= self.push_until and self.acked != self.holder and (
            now < self.observed_at + self.duration
        )

    def ack_wanted(self) -> str | None:
        """The generation to acknowledge now (held, every push token dead, not yet acked), if any."""
        with self._mu:
            if self._drained_locked(self.clock()):
                return self.holder
            return None

    def acknowledged(self, generation: str) -> None:
        with self._mu:
            self.acked = generation

    @property
    def synced(self) -> bool:
        with self._mu:
            return not self.enabled or self.confirmed_at is not None
