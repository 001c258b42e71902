"""The artifact reconciler's pure core: status transitions, conditions, Events, backoff, planning."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_registry.errors import PermanentError, TemporaryError, WriteLockedError
from cluster_registry.oci.errors import AuthenticationError, NotFoundError, RegistryUnavailableError
from cluster_registry.reconcile import status as st

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
SRC = "myacr.azurecr.io/nginx:1.0.0"
LOCAL = "127.0.0.1:5000/myacr.azurecr.io/nginx:1.0.0"
DIGEST = "sha256:" + "ab" * 32


def ready(status: dict[str, Any]) -> dict[str, Any]:
    cond = st.condition(status.get("conditions"), "Ready")
    assert cond is not None
    return dict(cond)


def test_timestamps_round_trip() -> None:
    assert st.timestamp(NOW) == "2027-01-15T08:00:00Z"
    assert st.parse_timestamp("2027-01-15T08:00:00Z") == NOW
    assert st.parse_timestamp("garbage") is None
    assert st.parse_timestamp(None) is None


def test_destination_keeps_tag_and_digest() -> None:
    assert st.destination("nginx", "reg:5000") == "reg:5000/docker.io/library/nginx:latest"
    ref = f"ghcr.io/a/b:v1@{DIGEST}"
    assert st.destination(ref, "reg:5000") == f"reg:5000/ghcr.io/a/b:v1@{DIGEST}"
    assert st.destination("h:5000/x:1", "reg:5000") == "reg:5000/h_5000/x:1"
    with pytest.raises(PermanentError):
        st.destination("", "reg:5000")
    with pytest.raises(PermanentError):
        st.destination("UPPER/Case:1", "reg:5000")


def test_first_copy_pending_to_copying_to_ready() -> None:
    s1 = st.next_status({}, 1, st.Started(SRC, LOCAL), NOW)
    assert s1["phase"] == "Copying" and s1["observedGeneration"] == 1
    assert ready(dict(s1)) | {} == {
        "type": "Ready",
        "status": "False",
        "reason": "Copying",
        "message": f"copying {SRC} to {LOCAL}",
        "lastTransitionTime": "2027-01-15T08:00:00Z",
        "observedGeneration": 1,
    }
    s2 = st.next_status(s1, 1, st.Copied(LOCAL, DIGEST, 1234, ("linux/amd64", "linux/arm64")), NOW + 5)
    assert s2["phase"] == "Ready"
    assert (s2["digest"], s2["size"], s2["platforms"], s2["localArtifact"]) == (
        DIGEST, 1234, ["linux/amd64", "linux/arm64"], LOCAL,
    )
    assert s2["lastSyncTime"] == "2027-01-15T08:00:05Z"
    assert ready(dict(s2))["status"] == "True" and ready(dict(s2))["reason"] == "Copied"
    assert ready(dict(s2))["lastTransitionTime"] == "2027-01-15T08:00:05Z"
    assert len(s2["conditions"]) == 1
    assert s1["phase"] == "Copying", "next_status must not mutate its input"


def test_condition_transition_time_moves_only_on_status_change() -> None:
    failed = st.next_status({}, 1, st.CopyFailed("NotFound", "no such tag", False), NOW)
    again = st.next_status(failed, 1, st.CopyFailed("RegistryUnavailable", "down", True), NOW + 60)
    assert ready(dict(again))["lastTransitionTime"] == st.timestamp(NOW)
    assert ready(dict(again))["reason"] == "RegistryUnavailable"
    ok = st.next_status(again, 1, st.Copied(LOCAL, DIGEST, 1), NOW + 120)
    assert ready(dict(ok))["lastTransitionTime"] == st.timestamp(NOW + 120)


def test_queued_only_marks_an_artifact_without_status() -> None:
    pending = st.next_status({}, 1, st.Queued(SRC, LOCAL), NOW)
    assert pending["phase"] == "Pending" and ready(dict(pending))["reason"] == "Pending"
    assert st.transition_event({}, pending) is None  # no Event for merely being queued
    copying = st.next_status(pending, 1, st.Started(SRC, LOCAL), NOW)
    assert copying["phase"] == "Copying"
    assert st.next_status(copying, 1, st.Queued(SRC, LOCAL), NOW) == copying  # never a step back


def test_retry_after_failure_or_deferral_does_not_flip_to_copying() -> None:
    failed = st.next_status({}, 3, st.CopyFailed("NotFound", "no such tag", False), NOW)
    assert st.next_status(failed, 3, st.Started(SRC, LOCAL), NOW + 1) == failed
    deferred = st.next_status({}, 3, st.Locked(), NOW)
    assert deferred["phase"] == "Deferred" and ready(dict(deferred))["reason"] == "WriteLocked"
    assert st.next_status(deferred, 3, st.Started(SRC, LOCAL), NOW + 1) == deferred
    # ...but a new generation does start over as Copying
    assert st.next_status(failed, 4, st.Started(SRC, LOCAL), NOW + 1)["phase"] == "Copying"


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (WriteLockedError("locked"), st.Locked()),
        (NotFoundError("manifest unknown: x:1"), st.CopyFailed("NotFound", "manifest unknown: x:1", False)),
        (AuthenticationError("401 from h"), st.CopyFailed("Authentication", "401 from h", False)),
        (RegistryUnavailableError("h: connection refused"), st.CopyFailed("RegistryUnavailable", "h: connection refused", True)),
        (TemporaryError("t"), st.CopyFailed("Temporary", "t", True)),
        (RuntimeError("password=hunter2"), st.CopyFailed("InternalError", "unexpected RuntimeError; see the reconciler log", True)),
    ],
)
def test_failure_classification(err: BaseException, expected: object) -> None:
    assert st.failure(err) == expected
    assert "hunter2" not in repr(st.failure(err)), "unknown exception text may hold secrets"


def test_status_patch_is_minimal_and_none_when_unchanged() -> None:
    s1 = dict(st.next_status({}, 1, st.Started(SRC, LOCAL), NOW))
    assert st.status_patch(s1, s1) is None
    s2 = dict(st.next_status(s1, 1, st.Copied(LOCAL, DIGEST, 9), NOW))
    patch = st.status_patch(s1, s2)
    assert patch is not None and "observedGeneration" not in patch
    assert patch["phase"] == "Ready" and patch["digest"] == DIGEST
    assert st.status_patch({"phase": "Ready", "x": 1}, {"phase": "Ready"}) == {"x": None}


@pytest.mark.parametrize(
    ("old", "new", "event"),
    [
        ({}, st.Started(SRC, LOCAL), ("Normal", "Copying")),
        ("copying", st.Copied(LOCAL, DIGEST, 1), ("Normal", "Copied")),
        ("copying", st.CopyFailed("NotFound", "gone", False), ("Warning", "NotFound")),
        ("failed", st.CopyFailed("NotFound", "gone again", False), None),  # no flood
        ("failed", st.CopyFailed("Authentication", "401", False), ("Warning", "Authentication")),
        ("copying", st.Locked(), ("Normal", "Deferred")),
        ("ready", st.Copied(LOCAL, DIGEST, 1), None),  # re-verified, nothing new
        ("ready", st.Copied(LOCAL, "sha256:" + "cd" * 32, 1), ("Normal", "Copied")),
    ],
)
def test_transition_events(old: Any, new: st.Outcome, event: tuple[str, str] | None) -> None:
    bases: dict[str, Any] = {
        "copying": st.next_status({}, 1, st.Started(SRC, LOCAL), NOW),
        "failed": st.next_status({}, 1, st.CopyFailed("NotFound", "gone", False), NOW),
        "ready": st.next_status({}, 1, st.Copied(LOCAL, DIGEST, 1), NOW),
    }
    before = bases[old] if isinstance(old, str) else old
    after = st.next_status(before, 1, new, NOW + 1)
    got = st.transition_event(before, after)
    assert (got.type, got.reason) == event if event else got is None


def test_backoff_grows_caps_and_jitters() -> None:
    p = st.BackoffPolicy(base=5, cap=300, permanent_base=300, permanent_cap=3600, jitter=0.2)
    mids = [st.backoff_delay(n, True, 0.5, p) for n in range(1, 10)]
    assert mids[:4] == [5, 10, 20, 40]
    assert max(mids) == 300 and mids[-1] == 300
    assert st.backoff_delay(1, True, 0.0, p) == pytest.approx(4.0)
    assert st.backoff_delay(1, True, 0.999999, p) == pytest.approx(6.0, rel=1e-4)
    assert st.backoff_delay(1, False, 0.5, p) == 300
    assert st.backoff_delay(10, False, 0.5, p) == 3600
    assert st.backoff_delay(10_000, True, 0.5, p) == 300  # no overflow
    assert 8 <= st.deferred_delay(0.0, p) <= st.deferred_delay(0.99, p) <= 12


def art(phase: str = "", generation: int = 1, observed: int | None = 1, **status: Any) -> st.ArtifactView:
    s: dict[str, Any] = dict(status)
    if phase:
        s["phase"] = phase
    if observed is not None and phase:
        s["observedGeneration"] = observed
    return st.ArtifactView("ns", "a", "uid", generation, SRC, (), s)


@pytest.mark.parametrize(
    ("artifact", "due", "mode"),
    [
        (art(), NOW, st.Mode.COPY),
        (art("Pending"), NOW, st.Mode.COPY),
        (art("Copying"), NOW, st.Mode.COPY),  # interrupted by a restart
        (art("Ready", generation=2, observed=1), NOW, st.Mode.COPY),  # spec changed
        (art("Failed", generation=2, observed=1), NOW, st.Mode.COPY),
        (art("Ready", lastSyncTime=st.timestamp(NOW - 100)), NOW + 500, st.Mode.VERIFY),
        (art("Ready", lastSyncTime=st.timestamp(NOW - 10_000)), NOW, st.Mode.VERIFY),
        (art("Deferred"), NOW + 10, st.Mode.COPY),
        (art("Failed"), NOW + 5, st.Mode.COPY),
    ],
)
def test_first_due(artifact: st.ArtifactView, due: float, mode: st.Mode) -> None:
    assert st.first_due(artifact, NOW, 600, 0.5 if mode != st.Mode.VERIFY else 0.0) == (due, mode)


def test_first_due_copies_at_once_when_the_registry_host_changed() -> None:
    ready = art("Ready", lastSyncTime=st.timestamp(NOW - 100), localArtifact=LOCAL)
    assert st.first_due(ready, NOW, 600, 0.0, dest=LOCAL) == (NOW + 500, st.Mode.VERIFY)
    assert st.first_due(ready, NOW, 600, 0.0, dest="other:5000/myacr.azurecr.io/nginx:1.0.0") == (NOW, st.Mode.COPY)


def test_view_extracts_fields() -> None:
    v = st.view(
        {
            "metadata": {"namespace": "n", "name": "a", "uid": "u", "generation": 3, "resourceVersion": "7"},
            "spec": {"sourceArtifact": SRC, "pullSecrets": ["s1", "", 5, "s2"]},
            "status": {"phase": "Ready", "observedGeneration": 3},
        }
    )
    assert (v.key, v.generation, v.source, v.pull_secrets, v.phase, v.observed) == (
        "n/a", 3, SRC, ("s1", "s2"), "Ready", True,
    )
    assert st.view({"metadata": {"name": "x"}}).observed is False
