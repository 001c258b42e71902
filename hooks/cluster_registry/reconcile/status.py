"""The artifact reconciler's pure core: Artifact status, conditions, Events, backoff and planning.

No I/O and no clock: every function takes ``now`` (seconds since the epoch) and, where jitter is
needed, a random number in [0, 1). The adapters in :mod:`.artifacts` feed them.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Iterable
from typing import Any, Literal, Mapping, cast

from cluster_registry import reference
from cluster_registry.api import ArtifactStatus, Condition, Phase
from cluster_registry.errors import ClusterRegistryError, InvalidReferenceError

READY = "Ready"


def timestamp(now: float) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def parse_timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def set_condition(
    conditions: list[Condition] | None,
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: float,
    generation: int | None = None,
) -> list[Condition]:
    """``conditions`` with ``type_`` set; ``lastTransitionTime`` moves only when the status changes."""
    out = [dict(c) for c in conditions or []]
    old = next((c for c in out if c.get("type") == type_), None)
    new: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message}
    new["lastTransitionTime"] = (
        old["lastTransitionTime"]
        if old is not None and old.get("status") == status and old.get("lastTransitionTime")
        else timestamp(now)
    )
    if generation is not None:
        new["observedGeneration"] = generation
    if old is None:
        out.append(new)
    else:
        out[out.index(old)] = new
    return [Condition(**c) for c in out]  # type: ignore[typeddict-item]


def condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


# --- the Artifact as the reconciler sees it --------------------------------------------------------


@dataclass(frozen=True)
class ArtifactView:
    """The fields of an Artifact object the reconciler acts on."""

    namespace: str
    name: str
    uid: str
    generation: int
    source: str
    pull_secrets: tuple[str, ...]
    status: Mapping[str, Any] = field(default_factory=dict)
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "")

    @property
    def observed(self) -> bool:
        """Whether the status describes the current spec."""
        return self.status.get("observedGeneration") == self.generation


def view(obj: Mapping[str, Any]) -> ArtifactView:
    """Extract an :class:`ArtifactView` from an Artifact object (a dict from the API)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    secrets = spec.get("pullSecrets") or []
    return ArtifactView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0),
        source=str(spec.get("sourceArtifact") or ""),
        pull_secrets=tuple(str(s) for s in secrets if isinstance(s, str) and s),
        status=dict(obj.get("status") or {}),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


# An Artifact or Component annotated with a registry host is reconciled only by the installation
# pushing to that host (several installations in one cluster, e.g. a test cluster); unannotated
# objects belong to every installation (the normal case: one per cluster).
ANNOTATION_REGISTRY = "clusterregistry.io/registry"


def claimed_elsewhere(obj: Mapping[str, Any], registry_host: str | None) -> bool:
    """Whether ``obj`` is annotated for another installation than the one at ``registry_host``."""
    claim = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_REGISTRY)
    return bool(claim) and claim != registry_host


def destination(source: str, registry_host: str) -> str:
    """The cluster-registry reference ``source`` is copied to; raise InvalidReferenceError."""
    if not source:
        raise InvalidReferenceError("spec.sourceArtifact is empty")
    return str(reference.rewrite(reference.parse(source), registry_host))


# --- outcomes and the next status ----------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """A copy begins."""

    source: str
    local: str


@dataclass(frozen=True)
class Copied:
    local: str
    digest: str
    size: int
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class CopyFailed:
    reason: str  # CamelCase, for the condition and the Event
    message: str  # user-facing, never a credential
    temporary: bool


@dataclass(frozen=True)
class Locked:
    """The cluster registry holds its GC write lock: the copy waits."""

    message: str = "the cluster registry is in its garbage-collection read-only window; the copy waits"


@dataclass(frozen=True)
class Queued:
    """A new spec is waiting for a copy worker (only written to an Artifact without status)."""

    source: str
    local: str


Outcome = Queued | Started | Copied | CopyFailed | Locked


def namespace_usage(objects: Iterable[Mapping[str, Any]], skip_source: str) -> dict[str, int]:
    """Bytes of the Ready images of each namespace (``status.size``), those of ``skip_source`` aside."""
    usage: dict[str, int] = {}
    for obj in objects:
        status, spec = obj.get("status") or {}, obj.get("spec") or {}
        if status.get("phase") == Phase.READY.value and spec.get("sourceArtifact") != skip_source:
            ns = str((obj.get("metadata") or {}).get("namespace") or "")
            usage[ns] = usage.get(ns, 0) + int(status.get("size") or 0)
    return usage


def quota_exceeded(namespace: str, used: int, quota: int) -> CopyFailed:
    return CopyFailed(
        reason="QuotaExceeded",
        message=f"namespace {namespace}'s images would pass its quota of {quota} bytes (it holds {used} bytes "
        "of Ready images): delete images it no longer uses, or raise the quota",
        temporary=False,
    )


def within_quota(outcome: Outcome, m: ArtifactView, usage: Mapping[str, int], quota: int, quota_limited: bool) -> Outcome:
    """``outcome`` for ``m``, or QuotaExceeded when the copied image takes ``m``'s namespace over
    ``quota``, or was refused as too large for what the namespaces had left (``quota_limited``)."""
    used = usage.get(m.namespace, 0)
    if quota and isinstance(outcome, Copied) and used + outcome.size > quota:
        return quota_exceeded(m.namespace, used, quota)
    if quota_limited and isinstance(outcome, CopyFailed) and outcome.reason == "ImageTooLarge":
        return quota_exceeded(m.namespace, used, quota)
    return outcome


# Failure reasons a new or fixed pull secret may cure (registries answer 404 to anonymous pulls too).
ACCESS_REASONS = frozenset({"Authentication", "AccessDenied", "NotFound"})


def for_namespace(outcome: Outcome, namespace: str, secrets: Iterable[str], missing: Iterable[str]) -> Outcome:
    """``outcome`` of an attempt made with ``namespace``'s own pull secrets, as that namespace's Artifact
    reports it: an access failure says whose credentials were tried (another namespace's copy of the
    same image never makes this one Ready) and which of its Secrets do not exist."""
    if not (isinstance(outcome, CopyFailed) and outcome.reason in ACCESS_REASONS):
        return outcome
    names = ", ".join(secrets)
    absent = ", ".join(missing)
    how = (f"pull secrets {names}" if names else "anonymous") + (f"; pull secrets not found: {absent}" if absent else "")
    return CopyFailed(outcome.reason, f"{outcome.message} (with namespace {namespace}'s own access: {how})", outcome.temporary)


def failure(err: BaseException) -> CopyFailed | Locked:
    """Classify an exception raised by a copy as an outcome (an unknown exception is temporary)."""
    from cluster_registry.errors import WriteLockedError

    if isinstance(err, WriteLockedError):
        return Locked()
    if isinstance(err, ClusterRegistryError):
        return CopyFailed(reason=err.reason, message=err.message, temporary=err.temporary)
    return CopyFailed(reason="InternalError", message=f"unexpected {type(err).__name__}; see the reconciler log", temporary=True)


def next_status(current: Mapping[str, Any], generation: int, outcome: Outcome, now: float) -> ArtifactStatus:
    """The status after ``outcome``: a new dict, ``current`` untouched.

    A retry after a failure or a deferral does not flip the phase back to Copying (that would be two
    status writes per retry for no information); the phase changes when the retry's result is known.
    """
    status: dict[str, Any] = {k: v for k, v in current.items()}
    conditions: list[Condition] = list(status.get("conditions") or [])
    if isinstance(outcome, Queued):
        if status.get("phase") and not (status.get("phase") == Phase.PENDING and status.get("observedGeneration") != generation):
            return cast(ArtifactStatus, status)  # a worker got there first: Pending would be a step back
        status["phase"] = Phase.PENDING.value
        conditions = set_condition(
            conditions, READY, "False", "Pending", f"waiting to copy {outcome.source} to {outcome.local}", now, generation
        )
    elif isinstance(outcome, Started):
        if status.get("observedGeneration") == generation and status.get("phase") in (Phase.FAILED, Phase.DEFERRED):
            return cast(ArtifactStatus, status)
        status["phase"] = Phase.COPYING.value
        conditions = set_condition(
            conditions, READY, "False", "Copying", f"copying {outcome.source} to {outcome.local}", now, generation
        )
    elif isinstance(outcome, Copied):
        status.update(
            phase=Phase.READY.value,
            digest=outcome.digest,
            size=outcome.size,
            platforms=list(outcome.platforms),
            localArtifact=outcome.local,
            lastSyncTime=timestamp(now),
        )
        conditions = set_condition(
            conditions, READY, "True", "Copied", f"{outcome.local} holds {outcome.digest}", now, generation
        )
    elif isinstance(outcome, CopyFailed):
        status["phase"] = Phase.FAILED.value
        conditions = set_condition(conditions, READY, "False", outcome.reason, outcome.message, now, generation)
    else:
        status["phase"] = Phase.DEFERRED.value
        conditions = set_condition(conditions, READY, "False", "WriteLocked", outcome.message, now, generation)
    status["observedGeneration"] = generation
    status["conditions"] = conditions
    return cast(ArtifactStatus, status)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch of the ``status`` taking ``old`` to ``new``, or None when they are equal."""
    if dict(old) == dict(new):
        return None
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    note: str


def transition_event(old: Mapping[str, Any], new: Mapping[str, Any]) -> Event | None:
    """The Event to record for a status change, or None (a repeated failure records nothing)."""
    old_phase, new_phase = old.get("phase"), new.get("phase")
    old_ready, new_ready = condition(old.get("conditions"), READY), condition(new.get("conditions"), READY)
    old_reason = old_ready.get("reason") if old_ready else None
    new_reason = new_ready.get("reason", "") if new_ready else ""
    message = new_ready.get("message", "") if new_ready else ""
    if new_phase == old_phase and (new_phase != Phase.FAILED or new_reason == old_reason):
        if new_phase == Phase.READY and old.get("digest") != new.get("digest"):
            return Event("Normal", "Copied", message)
        return None
    if new_phase == Phase.READY:
        return Event("Normal", "Copied", message)
    if new_phase == Phase.COPYING:
        return Event("Normal", "Copying", message)
    if new_phase == Phase.DEFERRED:
        return Event("Normal", "Deferred", message)
    if new_phase == Phase.FAILED:
        return Event("Warning", new_reason or "Failed", message)
    return None


# --- backoff ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with jitter; permanent errors start and cap far higher."""

    base: float = 5.0
    cap: float = 300.0
    permanent_base: float = 300.0
    permanent_cap: float = 3600.0
    deferred: float = 10.0  # retry interval while the GC write lock is held
    jitter: float = 0.2  # +-20%


def backoff_delay(attempt: int, temporary: bool, rand: float, policy: BackoffPolicy = BackoffPolicy()) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (1-based)."""
    base, cap = (policy.base, policy.cap) if temporary else (policy.permanent_base, policy.permanent_cap)
    delay = min(cap, base * 2.0 ** max(0, min(attempt - 1, 30)))
    return delay * (1 - policy.jitter + 2 * policy.jitter * rand)


def deferred_delay(rand: float, policy: BackoffPolicy = BackoffPolicy()) -> float:
    return policy.deferred * (1 - policy.jitter + 2 * policy.jitter * rand)


# --- planning ----------------------------------------------------------------------------------------


class Mode(str, Enum):
    COPY = "copy"
    VERIFY = "verify"


def first_due(
    art: ArtifactView,
    now: float,
    verify_interval: float,
    rand: float,
    policy: BackoffPolicy = BackoffPolicy(),
    dest: str | None = None,
) -> tuple[float, Mode]:
    """When, and how, to look at an Artifact whose current generation the reconciler has not seen yet.

    A new spec (or no status) is copied at once; a Ready one is verified when its last sync is
    ``verify_interval`` old (at once, when it names another ``dest``); a Failed one (seen after a restart) is retried after a first backoff step,
    a Deferred one after the deferral interval.
    """
    if not art.observed or art.phase in ("", Phase.PENDING, Phase.COPYING):
        return now, Mode.COPY
    if art.phase == Phase.READY:
        if dest is not None and art.status.get("localArtifact") not in (None, dest):
            return now, Mode.COPY  # the cluster registry moved (another --registry-host): copy there
        last = parse_timestamp(art.status.get("lastSyncTime"))
        spread = verify_interval * 0.1 * rand  # after a restart, do not verify everything at once
        due = (last + verify_interval) if last is not None else now
        return max(due, now + spread), Mode.VERIFY
    if art.phase == Phase.DEFERRED:
        return now + deferred_delay(rand, policy), Mode.COPY
    # Failed, seen after a restart: one early retry; the real classification then sets the pace.
    return now + backoff_delay(1, True, rand, policy), Mode.COPY
