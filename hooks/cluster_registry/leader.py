"""Leader election (and plain locks) over a ``coordination.k8s.io/v1`` Lease.

* Pure core: :class:`LeaseRecord` and :func:`decide` (may this identity take or keep the Lease?),
  :func:`held_at` (is a Lease held at a wall-clock time, for readers such as the token service).
* :class:`LeaseLock`: one Lease, synchronous (the kubernetes client is): ``try_acquire_or_renew``,
  ``release``, ``read``. Writes use the Lease's resourceVersion, so two contenders never both win.
* :class:`LeaderElector`: asyncio loop that waits for the Lease, runs a coroutine while it holds
  it, renews it, and cancels the coroutine as soon as leadership is lost (before the Lease can
  expire for the others: ``renew_deadline < lease_duration``). Releases the Lease on shutdown so a
  standby takes over at once.

Expiry of someone else's Lease is judged as client-go does: by how long *this* process has seen the
record unchanged (monotonic clock), not by comparing another machine's ``renewTime`` with ours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a Lease's spec that election needs. ``version`` is the resourceVersion."""

    holder: str
    duration: float
    renew_time: dt.datetime | None
    acquire_time: dt.datetime | None
    transitions: int
    version: str

    @property
    def key(self) -> tuple[str, str | None, str]:
        """Changes whenever the holder writes the Lease (a renewal or a takeover)."""
        return (self.holder, self.renew_time.isoformat() if self.renew_time else None, self.version)


class Decision(str, enum.Enum):
    RENEW = "renew"  # we hold it: write a new renewTime
    ACQUIRE = "acquire"  # free, released or expired: take it
    WAIT = "wait"  # someone else holds it


def decide(record: LeaseRecord | None, identity: str, unchanged_for: float) -> Decision:
    """What ``identity`` may do with the Lease, given how long it has seen ``record`` unchanged."""
    if record is None or not record.holder:
        return Decision.ACQUIRE
    if record.holder == identity:
        return Decision.RENEW
    if unchanged_for > record.duration:
        return Decision.ACQUIRE
    return Decision.WAIT


def held_at(record: LeaseRecord | None, now: dt.datetime) -> bool:
    """Whether a Lease is held at wall-clock ``now`` (holder set and ``renewTime + duration`` ahead)."""
    if record is None or not record.holder or record.renew_time is None:
        return False
    return now < record.renew_time + dt.timedelta(seconds=record.duration)


def default_identity() -> str:
    """``<pod or host name>_<random>``: unique per process, readable in ``kubectl get lease``."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _microtime(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Result(str, enum.Enum):
    HELD = "held"  # this identity holds the Lease now
    OTHER = "other"  # someone else holds it
    ERROR = "error"  # the API could not be reached or refused: unknown


class LeaseLock:
    """One Lease in one namespace, taken and renewed by ``identity``. Synchronous."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str | None = None,
        duration: float = 15.0,
    ) -> None:
        self.api: Any = client.CoordinationV1Api(api)  # Any: bodies are plain dicts
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.duration = duration
        # (connect, read): a renewal that hangs must fail well before the Lease could expire
        self.timeout = (min(5.0, duration / 3), max(1.0, duration / 3))
        self._seen: tuple[str, str | None, str] | None = None
        self._seen_at = time.monotonic()

    def read(self) -> LeaseRecord | None:
        """The Lease as stored, or None when it does not exist."""
        try:
            lease: Any = self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        spec = lease.spec
        return LeaseRecord(
            holder=spec.holder_identity or "",
            duration=float(spec.lease_duration_seconds or self.duration),
            renew_time=spec.renew_time,
            acquire_time=spec.acquire_time,
            transitions=int(spec.lease_transitions or 0),
            version=str(lease.metadata.resource_version or ""),
        )

    def _observe(self, record: LeaseRecord | None) -> float:
        key = record.key if record else None
        if key != self._seen:
            self._seen, self._seen_at = key, time.monotonic()
        return time.monotonic() - self._seen_at

    def try_acquire_or_renew(self) -> Result:
        """Take or renew the Lease if allowed; never raises for API trouble (returns ERROR)."""
        try:
            record = self.read()
            decision = decide(record, self.identity, self._observe(record))
            if decision is Decision.WAIT:
                return Result.OTHER
            now = _utcnow()
            spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.duration),
                "renewTime": _microtime(now),
                "acquireTime": _microtime(
                    record.acquire_time if decision is Decision.RENEW and record and record.acquire_time else now
                ),
                "leaseTransitions": (record.transitions if record else 0)
                + (1 if decision is Decision.ACQUIRE and record is not None and record.holder else 0),
            }
            meta: dict[str, object] = {"name": self.name, "namespace": self.namespace}
            if record is None:
                self.api.create_namespaced_lease(
                    self.namespace, {"metadata": meta, "spec": spec}, _request_timeout=self.timeout
                )
            else:
                meta["resourceVersion"] = record.version
                self.api.replace_namespaced_lease(
                    self.name, self.namespace, {"metadata": meta, "spec": spec}, _request_timeout=self.timeout
                )
            if decision is Decision.ACQUIRE:
                log.info("lease acquired", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity})
            return Result.HELD
        except ApiException as err:
            if err.status == 409:  # someone else wrote first
                return Result.OTHER
            log.warning("lease %s/%s: API error %s", self.namespace, self.name, err.status)
            return Result.ERROR
        except Exception as err:  # noqa: BLE001 - connection errors of every kind
            log.warning("lease %s/%s: %s", self.namespace, self.name, type(err).__name__)
            return Result.ERROR

    def release(self) -> None:
        """Give the Lease up if this identity holds it (best effort)."""
        try:
            record = self.read()
            if record is None or record.holder != self.identity:
                return
            spec = {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "renewTime": _microtime(_utcnow()),
                "leaseTransitions": record.transitions,
            }
            meta = {"name": self.name, "namespace": self.namespace, "resourceVersion": record.version}
            self.api.replace_namespaced_lease(
                self.name, self.namespace, {"metadata": meta, "spec": spec}, _request_timeout=self.timeout
            )
            log.info("lease released", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity})
        except Exception as err:  # noqa: BLE001
            log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, type(err).__name__)


class LeaderElector:
    """Run a coroutine only while holding a Lease (asyncio)."""

    def __init__(self, lock: LeaseLock, *, renew_deadline: float = 10.0, retry_period: float = 2.0) -> None:
        if renew_deadline >= lock.duration:
            raise ValueError("renew_deadline must be shorter than the lease duration")
        self.lock = lock
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.is_leader = False
        self.last_contact = 0.0  # monotonic time of the last answer from the API (health checks)

    async def _attempt(self) -> Result:
        try:  # belt and braces over the request timeout: never wait longer than the renew deadline
            result = await asyncio.wait_for(asyncio.to_thread(self.lock.try_acquire_or_renew), self.renew_deadline)
        except asyncio.TimeoutError:
            log.warning("lease %s/%s: no answer within %.0fs", self.lock.namespace, self.lock.name, self.renew_deadline)
            return Result.ERROR
        if result is not Result.ERROR:
            self.last_contact = time.monotonic()
        return result

    async def run(self, work: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Until ``stop`` is set: wait for the Lease, run ``work()`` while held, cancel it when lost.

        If ``work`` returns or raises while leading, the Lease is released and ``run`` returns (or
        re-raises), so the process exits and restarts rather than leading without working.
        """
        ident = self.lock.identity
        while not stop.is_set():
            while await self._attempt() is not Result.HELD:
                if await _wait(stop, self.retry_period):
                    return
            self.is_leader = True
            log.info("leading", extra={"identity": ident})
            task = asyncio.ensure_future(work())
            last_renew = time.monotonic()
            lost = False
            try:
                while True:
                    stopper = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait({task, stopper}, timeout=self.retry_period, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if task in done or stop.is_set():
                        break
                    result = await self._attempt()
                    if result is Result.HELD:
                        last_renew = time.monotonic()
                    elif result is Result.OTHER or time.monotonic() - last_renew > self.renew_deadline:
                        log.warning("leadership lost", extra={"identity": ident, "why": result.value})
                        lost = True
                        break
            finally:
                self.is_leader = False
                if not task.done():
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, Exception):  # noqa: BLE001
                        pass
                if not lost:
                    await asyncio.to_thread(self.lock.release)
            if not lost:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                return


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False
