"""The GC write-lock protocol between ``gc`` and the gates, the token service replicas (pure: names,
parsing, expiry rules).

- **The lock**: a ``coordination.k8s.io/v1`` Lease named ``--lock-name`` in the release namespace.
  GC holds it by setting ``spec.holderIdentity`` to a *generation*, a string unique to the run, with a
  short ``leaseDurationSeconds``, and renews ``spec.renewTime`` while it works. Held = a holder is set
  and the lease has not expired; released = holder cleared, or expired (a dead GC frees writes).
- **Expiry as a gate sees it** is measured on the gate's own monotonic clock from the moment the gate
  *observed* the latest renewal (as client-go's leader election does), so clock skew between nodes
  never shortens a hold.
- **The drain ack**: each replica keeps its own heartbeat Lease, labelled
  ``clusterregistry.io/gate-for: <lock name>``, renewed every few seconds; once it has seen generation G
  (so it issues no push token) and every push token it issued before has died at distribution, it
  sets the annotation ``clusterregistry.io/drained: G`` on it. GC waits for that ack from every live one.
- **Push tokens' end** (a hint): each heartbeat carries ``clusterregistry.io/push-tokens-until``, the
  wall time by which every push token the replica issued has died (grace included), written at once
  when a replica that had none alive issues one. GC, after its online mark, waits (bounded) outside
  the lock until those times have passed, so a registry written to just before GC does not spend
  the push-token TTL inside the read-only window. Safety never rests on it: the drain ack does.
- **The last window**: on release GC sets ``clusterregistry.io/last-window-seconds`` on the lock
  Lease to how long writes were held off; the gates export it as a metric (the GC Job is gone by the
  time anything scrapes).
- **Self-fencing**: a replica whose heartbeat could not be renewed for most of its duration, or whose
  view of the lock is stale, issues no push token: GC may already count it as dead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

LOCK_HEADER = "X-Cluster-Registry-Lock"
LABEL_GATE_FOR = "clusterregistry.io/gate-for"
ANNOTATION_DRAINED = "clusterregistry.io/drained"
ANNOTATION_LAST_WINDOW = "clusterregistry.io/last-window-seconds"
ANNOTATION_PUSH_UNTIL = "clusterregistry.io/push-tokens-until"
GC_LEASE_SECONDS = 15  # GC's lock duration; renewed every third of it
GATE_LEASE_SECONDS = 20  # a gate's heartbeat duration; renewed every quarter of it


@dataclass(frozen=True)
class LeaseView:
    """What the protocol needs of a Lease."""

    name: str
    holder: str | None
    renew_time: datetime | None
    duration: int
    resource_version: str = ""
    drained: str | None = None
    last_window: float | None = None  # seconds writes were held off by the last GC run
    push_until: datetime | None = None  # a heartbeat's hint: its push tokens are all dead by then


def _seconds(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def view(lease: Any) -> LeaseView:
    """A LeaseView of a kubernetes-client ``V1Lease`` (or None-safe stand-in)."""
    meta = lease.metadata
    spec = lease.spec
    annotations = (meta.annotations or {}) if meta else {}
    return LeaseView(
        name=meta.name if meta else "",
        holder=(spec.holder_identity or None) if spec else None,
        renew_time=(spec.renew_time or spec.acquire_time) if spec else None,
        duration=int((spec.lease_duration_seconds if spec else None) or GC_LEASE_SECONDS),
        resource_version=(meta.resource_version or "") if meta else "",
        drained=annotations.get(ANNOTATION_DRAINED),
        last_window=_seconds(annotations.get(ANNOTATION_LAST_WINDOW)),
        push_until=_time(annotations.get(ANNOTATION_PUSH_UNTIL)),
    )


def expired_by_clock(lease: LeaseView, now: datetime, slack: float = 0.0) -> bool:
    """Expired judged by wall clocks (renewTime + duration + slack < now); only for GC-side checks."""
    if lease.renew_time is None:
        return True
    return (now - lease.renew_time).total_seconds() > lease.duration + slack


def heartbeat_name(lock_name: str, identity: str) -> str:
    """The gate replica's heartbeat Lease name: DNS-1123, at most 63 characters."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"{lock_name}-gate-{identity}".lower()).strip("-")
    if len(base) <= 63:
        return base
    return f"{base[:50].rstrip('-')}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"


def quiet_in(heartbeats: list[LeaseView], now: datetime) -> float:
    """Seconds until every live replica's push tokens are dead by its own hint (0: now). A heartbeat
    expired by the clock is a gone replica; one without the hint has issued none that it published."""
    ends = [h.push_until for h in heartbeats if h.push_until is not None and not expired_by_clock(h, now)]
    return max([0.0, *((end - now).total_seconds() for end in ends)])
