"""GC's side of the write lock (see ``gate.protocol``): take the Lease, renew it, wait for every token
service replica's drain ack, release it.

**Why the sweep is safe with distribution's token auth.** Every write (blob upload, manifest PUT,
delete) is authorised by distribution itself from a JWT the token service signed; nothing in between
can hold a request back. So the lock works on tokens:

1. While a replica sees the Lease held (or cannot vouch for its state) it issues no push token
   (``gate.access.decide``: 503 + ``X-Cluster-Registry-Lock``, which the copy engine turns into a
   retry after the lock, Artifact ``Deferred``).
2. A push token lives ``--push-ttl`` seconds at distribution (15 by default; ``gate.tokens`` sets
   ``exp`` so distribution's fixed 60 s leeway is included). Each replica remembers when the last push
   token it issued dies, plus a grace (``gate.service.PUSH_GRACE``, 5 s) for a request authorised in the
   token's last instant to finish writing its manifest (small, bounded) and for clock skew between nodes.
3. A replica acknowledges generation G on its heartbeat Lease only after it has seen G *and* that
   moment has passed. GC sweeps only once every live replica acknowledged (``wait_drained``), so by
   then no token that could write a manifest exists: the manifests the mark phase reads cannot change
   under it. A replica that dies is not waited for once its heartbeat is stale; its tokens are dead by
   then too (the heartbeat's staleness bound, 20 s, exceeds TTL + grace).
4. A long blob upload authorised before the lock may still be streaming during the sweep: its blob is
   not referenced by any manifest yet (the manifest PUT needs a fresh token), so the sweep may remove
   it and the copy engine re-uploads it after the lock (it checks blobs before pushing the manifest,
   and a manifest naming a missing blob is refused, never stored dangling).

The window is thus the drain (at most TTL + grace after the last push token, plus a lock watch's
latency) plus the sweep. To keep the TTL out of it, GC first waits, unlocked and bounded
(``wait_quiet``), until the replicas' heartbeats say their push tokens are dead: only a registry
written to without a pause still pays the drain inside the window.

The renewer is a background thread. ``safe()`` says whether the replicas are certainly still holding
push tokens back: the last renewal that succeeded *started* less than ``duration - margin`` seconds ago
(a replica's hold lasts at least ``duration`` from when it observed that renewal). The sweep is
stopped the moment ``safe()`` turns false.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster_registry.errors import TemporaryError
from cluster_registry.gate.protocol import (
    ANNOTATION_DRAINED,
    ANNOTATION_LAST_WINDOW,
    GATE_LEASE_SECONDS,
    GC_LEASE_SECONDS,
    LABEL_GATE_FOR,
    LeaseView,
    expired_by_clock,
    quiet_in,
    view,
)

log = logging.getLogger(__name__)
DEAD_BY_CLOCK = 300.0  # a heartbeat this stale (by any sane clock) is a gone gate


class LockHeldError(TemporaryError):
    """Another GC run holds the lock."""


class DrainTimeoutError(TemporaryError):
    """Some token service replica did not acknowledge the lock (its push tokens dead) in time."""


class LockLostError(TemporaryError):
    """The lock could not be renewed in time; the sweep must stop."""


def new_generation() -> str:
    host = (os.environ.get("POD_NAME") or socket.gethostname())[:40]
    return f"gc-{host}-{uuid.uuid4().hex[:12]}"


@dataclass
class DrainReport:
    acked: list[str] = field(default_factory=list)
    ignored_dead: list[str] = field(default_factory=list)
    seconds: float = 0.0


class GCLock:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        *,
        duration: int = GC_LEASE_SECONDS,
        margin: float = 4.0,
    ) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.duration, self.margin = namespace, name, duration, margin
        self.generation = new_generation()
        self._lease: Any = None
        self._last_ok = 0.0  # monotonic start of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()
        self.lost = False

    # -- acquire / renew / release -------------------------------------------------------------------
    def acquire(self, wait: float | None = None) -> None:
        """Take the lock; while another run holds it, wait up to ``wait`` seconds (default: two
        lease durations, enough for a dead run's lease to expire) before giving up."""
        deadline = time.monotonic() + (2 * self.duration + 2 if wait is None else wait)
        while True:
            try:
                return self._try_acquire()
            except LockHeldError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _try_acquire(self) -> None:
        started = time.monotonic()
        now = datetime.now(timezone.utc)
        try:
            current = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise TemporaryError(f"cannot read the GC lock Lease: {err.reason}") from err
            current = None
        if current is None:
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(now, transitions=0),
            )
            try:
                self._lease = self.coord.create_namespaced_lease(self.namespace, body)
            except ApiException as err:
                raise LockHeldError("another GC run took the lock first") if err.status == 409 else TemporaryError(
                    f"cannot create the GC lock Lease: {err.reason}"
                ) from err
        else:
            v = view(current)
            if v.holder and not expired_by_clock(v, now):
                raise LockHeldError(f"the GC lock is held by {v.holder}")
            transitions = (current.spec.lease_transitions or 0) + 1 if current.spec else 1
            current.spec = self._spec(now, transitions=transitions)
            try:
                self._lease = self.coord.replace_namespaced_lease(self.name, self.namespace, current)
            except ApiException as err:
                if err.status == 409:
                    raise LockHeldError("another GC run took the lock first") from err
                raise TemporaryError(f"cannot take the GC lock: {err.reason}") from err
        self._last_ok = started
        self._thread = threading.Thread(target=self._renew_loop, name="gc-lock-renew", daemon=True)
        self._thread.start()
        log.info("write lock taken", extra={"lease": self.name, "generation": self.generation})

    def _spec(self, now: datetime, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.generation,
            lease_duration_seconds=self.duration,
            acquire_time=now,
            renew_time=now,
            lease_transitions=transitions,
        )

    def _renew_once(self) -> None:
        started = time.monotonic()
        with self._mu:
            lease = self._lease
            if lease.spec.holder_identity != self.generation:
                raise LockLostError("the GC lock was taken over")
            lease.spec.renew_time = datetime.now(timezone.utc)
            try:
                self._lease = self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
            except ApiException as err:
                if err.status == 409:  # someone else wrote it: re-read and check it is still ours
                    fresh: Any = self.coord.read_namespaced_lease(self.name, self.namespace)
                    if fresh.spec.holder_identity != self.generation:
                        self.lost = True
                        raise LockLostError("the GC lock was taken over") from err
                    self._lease = fresh
                    return self._renew_once_unlocked(started)
                raise
        self._last_ok = started

    def _renew_once_unlocked(self, started: float) -> None:
        lease = self._lease
        lease.spec.renew_time = datetime.now(timezone.utc)
        self._lease = self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        self._last_ok = started

    def _renew_loop(self) -> None:
        interval = self.duration / 3
        while not self._stop.wait(interval):
            try:
                self._renew_once()
                interval = self.duration / 3
            except LockLostError:
                self.lost = True
                log.error("write lock lost")
                return
            except Exception as err:  # noqa: BLE001 - keep trying until safe() says stop
                log.warning("write lock renewal failed; retrying", extra={"error": str(err)})
                interval = 1.0

    def safe(self) -> bool:
        """True while every token service replica certainly still refuses push tokens for this generation."""
        return not self.lost and time.monotonic() - self._last_ok < self.duration - self.margin

    def release(self, window_seconds: float | None = None) -> None:
        """Clear the holder; ``window_seconds`` (how long writes were held off) is recorded on the Lease
        for the token services' metric."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.duration)
        if self.lost or self._lease is None:
            return
        for _ in range(3):
            try:
                with self._mu:
                    lease: Any = self.coord.read_namespaced_lease(self.name, self.namespace)
                    if lease.spec.holder_identity != self.generation:
                        return
                    lease.spec.holder_identity = None
                    lease.spec.renew_time = datetime.now(timezone.utc)
                    if window_seconds is not None:
                        lease.metadata.annotations = {
                            **(lease.metadata.annotations or {}),
                            ANNOTATION_LAST_WINDOW: f"{window_seconds:.3f}",
                        }
                    self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("write lock released", extra={"lease": self.name})
                return
            except ApiException as err:
                log.warning("write lock release failed; retrying", extra={"error": err.reason})
                time.sleep(0.5)
        log.error("write lock not released; it expires by itself", extra={"seconds": self.duration})

    # -- the replicas' drain acks --------------------------------------------------------------------
    def _heartbeats(self) -> list[LeaseView]:
        return [view(lease) for lease in self.coord.list_namespaced_lease(
            self.namespace, label_selector=f"{LABEL_GATE_FOR}={self.name}").items]  # fmt: skip

    def wait_quiet(self, bound: float) -> float:
        """Before the lock, writes going on: wait (at most ``bound`` seconds) until every replica's push
        tokens are dead by its heartbeat's hint, so the drain inside the window finds none alive. A
        registry written to without a pause gets locked after ``bound`` and its drain waits as before.
        Returns the seconds waited."""
        start = time.monotonic()
        while (left := bound - (time.monotonic() - start)) > 0:
            try:
                wait = quiet_in(self._heartbeats(), datetime.now(timezone.utc))
            except ApiException as err:  # only a hint: the drain inside the window is what is safe
                log.warning("cannot read the token service heartbeats; locking now", extra={"error": err.reason})
                break
            if wait <= 0:
                break
            time.sleep(min(wait + 0.05, left))
        return time.monotonic() - start

    def wait_drained(self, timeout: float, poll: float = 0.25) -> DrainReport:
        """Wait until every live replica acknowledged this generation; raise DrainTimeoutError on timeout.

        Dead replicas (heartbeat older than 5 minutes by the clock, or unchanged for a whole heartbeat
        duration while we watch) are not waited for: they self-fence and issue no push tokens.
        """
        start = time.monotonic()
        first_seen: dict[str, tuple[Any, float]] = {}  # name -> (renewTime, monotonic first seen)
        while True:
            if not self.safe():
                raise LockLostError("the GC lock could not be renewed while waiting for the token service replicas")
            now_wall = datetime.now(timezone.utc)
            now = time.monotonic()
            report = DrainReport(seconds=now - start)
            pending: list[str] = []
            for v in self._heartbeats():
                if v.drained == self.generation:
                    report.acked.append(v.name)
                    continue
                seen = first_seen.get(v.name)
                if seen is None or seen[0] != v.renew_time:
                    first_seen[v.name] = seen = (v.renew_time, now)
                unchanged_for = now - seen[1]
                if expired_by_clock(v, now_wall, slack=DEAD_BY_CLOCK) or unchanged_for > max(
                    v.duration, GATE_LEASE_SECONDS
                ):
                    report.ignored_dead.append(v.name)
                    continue
                pending.append(v.name)
            if not pending:
                log.info("token service replicas drained", extra={"acked": report.acked, "dead": report.ignored_dead})
                return report
            if now - start > timeout:
                raise DrainTimeoutError(
                    f"token service replicas did not acknowledge the lock (push tokens dead) within {timeout:.0f}s: {', '.join(pending)}"
                )
            time.sleep(poll)


__all__ = ["GCLock", "DrainReport", "LockHeldError", "LockLostError", "DrainTimeoutError", "ANNOTATION_DRAINED"]
