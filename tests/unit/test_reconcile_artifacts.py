"""The artifact reconciler's control loop with an in-memory Kubernetes and a scripted copy engine.

No network: the copy and verify functions are stand-ins, time is a counter. What is checked is the
loop's behaviour: dedupe by destination, per-Artifact status, backoff without hot loops, deferral
while the GC write lock is held, re-verification and recopy, pull-secret credentials.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import copy
import json
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.errors import WriteLockedError
from cluster_registry.oci.auth import Credentials
from cluster_registry.oci.copy import CopyResult
from cluster_registry.oci.errors import AuthenticationError, NotFoundError, RegistryUnavailableError
from cluster_registry.reconcile import status as st
from cluster_registry.reconcile.artifacts import ArtifactReconciler, Config
from cluster_registry.reconcile.metrics import artifact_metrics

REG = "127.0.0.1:5000"
DIGEST = "sha256:" + "ab" * 32


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.status_writes: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, str]] = []
        self.secrets: dict[str, bytes] = {}
        self.rv = 0

    def add(self, ns: str, name: str, source: str, secrets: list[str] | None = None) -> dict[str, Any]:
        self.rv += 1
        obj = {
            "apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
            "metadata": {"namespace": ns, "name": name, "uid": f"uid-{ns}-{name}", "generation": 1, "resourceVersion": str(self.rv)},
            "spec": {"sourceArtifact": source, **({"pullSecrets": secrets} if secrets else {})},
        }
        self.objects[f"{ns}/{name}"] = obj
        return copy.deepcopy(obj)

    def patch_status(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.objects[f"{ns}/{name}"]
        status = obj.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.status_writes.append((f"{ns}/{name}", patch))
        return copy.deepcopy(obj)

    def docker_config(self, ns: str, name: str) -> bytes | None:
        return self.secrets.get(f"{ns}/{name}")

    def event(self, obj: dict[str, Any], type_: str, reason: str, note: str, **_: Any) -> None:
        self.events.append((obj["metadata"]["name"], type_, reason))

    def status(self, key: str) -> dict[str, Any]:
        return dict(self.objects[key].get("status") or {})


class Script:
    """A copy engine stand-in: answers from a list of results/exceptions, records its calls."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, Credentials | None]] = []
        self.present: dict[str, str] = {}  # destination -> digest held by the "registry"

    async def copy(self, src: reference.Reference, dst: reference.Reference, creds: Credentials | None) -> CopyResult:
        self.calls.append((str(src), str(dst), creds))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        self.present[str(dst)] = answer.digest
        return answer  # type: ignore[no-any-return]

    async def verify(self, dst: reference.Reference) -> str | None:
        return self.present.get(str(dst))


def result(digest: str = DIGEST, platforms: tuple[str, ...] = ("linux/amd64",)) -> CopyResult:
    return CopyResult(digest=digest, size=4242, media_type="application/vnd.oci.image.manifest.v1+json",
                      platforms=platforms, blobs_copied=2, blobs_skipped=0, blobs_mounted=0, bytes_copied=4000, seconds=0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(script: Script, kube: FakeKube, clock: Clock, **cfg: Any) -> ArtifactReconciler:
    config = Config(registry_host=REG, verify_interval=600, **cfg)
    return ArtifactReconciler(kube, config, artifact_metrics(), copy=script.copy, verify=script.verify,  # type: ignore[arg-type]
                              rand=lambda: 0.5, clock=clock)


async def drain(r: ArtifactReconciler, kube: FakeKube) -> list[str]:
    """Process every due destination, feeding status writes back as watch events; return them."""
    done = []
    while (dest := r.queue.pop(r.clock())) is not None:
        writes = len(kube.status_writes)
        next_at = await r.process(dest)
        await r.settled()  # the status writes and Events, sent off the worker's path
        r.queue.done(dest, next_at)
        for key, _ in kube.status_writes[writes:]:  # what the watch would deliver
            r.on_event("MODIFIED", copy.deepcopy(kube.objects[key]))
        done.append(dest)
    return done


async def test_same_source_in_two_namespaces_is_copied_once_and_each_gets_status() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    for ns in ("a", "b"):
        r.on_event("ADDED", kube.add(ns, "nginx", "docker.io/library/nginx:1.25"))
    r.on_event("ADDED", kube.add("a", "other", "ghcr.io/x/y:2"))
    assert len(r.queue) == 2
    await drain(r, kube)
    assert sorted(c[1] for c in script.calls) == [f"{REG}/docker.io/library/nginx:1.25", f"{REG}/ghcr.io/x/y:2"]
    for key in ("a/nginx", "b/nginx", "a/other"):
        s = kube.status(key)
        assert s["phase"] == "Ready" and s["digest"] == DIGEST and s["size"] == 4242 and s["platforms"] == ["linux/amd64"]
        assert s["observedGeneration"] == 1 and st.condition(s["conditions"], "Ready")["status"] == "True"  # type: ignore[index]
    assert kube.status("b/nginx")["localArtifact"] == f"{REG}/docker.io/library/nginx:1.25"
    assert sorted(e[2] for e in kube.events) == ["Copied"] * 3 + ["Copying"] * 3
    # our own status writes came back as MODIFIED events: nothing new is due before the verify interval
    assert r.queue.pop(clock.now + 60) is None


async def test_permanent_failure_backs_off_without_hot_loop_or_event_flood() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(NotFoundError("manifest unknown: ghcr.io/x/gone:1"))
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "gone", "ghcr.io/x/gone:1"))
    await drain(r, kube)
    s = kube.status("a/gone")
    cond = st.condition(s["conditions"], "Ready")
    assert s["phase"] == "Failed" and cond is not None
    assert (cond["reason"], cond["message"]) == ("NotFound", "manifest unknown: ghcr.io/x/gone:1 (with namespace a's own access: anonymous)")
    assert len(kube.status_writes) == 2  # Copying, Failed
    due = r.queue.next_due()
    assert due is not None and due - clock.now == pytest.approx(300)  # permanent: long wait
    clock.now += 299
    assert await drain(r, kube) == []
    gaps = []
    for _ in range(3):  # three more retries: no new writes, no new events, growing gaps
        assert (due := r.queue.next_due()) is not None
        gaps.append(due - clock.now)
        clock.now = due
        await drain(r, kube)
    assert gaps[1:] == [pytest.approx(600), pytest.approx(1200)]
    assert len(script.calls) == 4 and len(kube.status_writes) == 2
    assert [e[2] for e in kube.events] == ["Copying", "NotFound"]


async def test_write_lock_defers_then_copies() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(WriteLockedError("gc holds the write lock"), WriteLockedError("x"), result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Deferred"
    assert st.condition(kube.status("a/img")["conditions"], "Ready")["reason"] == "WriteLocked"  # type: ignore[index]
    for _ in range(2):
        due = r.queue.next_due()
        assert due is not None and due - clock.now == pytest.approx(10)
        clock.now = due
        await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Ready" and len(script.calls) == 3
    assert [w[1].get("phase") for w in kube.status_writes] == ["Copying", "Deferred", "Ready"]


async def test_ready_copy_is_reverified_and_recopied_when_gone() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    due = r.queue.next_due()
    assert due is not None and due - clock.now == pytest.approx(600)
    clock.now = due
    await drain(r, kube)  # present: a HEAD only
    assert len(script.calls) == 1 and len(kube.status_writes) == 2
    script.present.clear()  # the registry was wiped
    clock.now = r.queue.next_due() or 0
    await drain(r, kube)
    assert len(script.calls) == 2 and kube.status("a/img")["phase"] == "Ready"
    assert ("img", "Warning", "Missing") in kube.events


async def test_restart_sees_ready_artifact_and_only_verifies_later() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    obj = kube.add("a", "img", "ghcr.io/x/y:1")
    obj["status"] = dict(st.next_status({}, 1, st.Copied(f"{REG}/ghcr.io/x/y:1", DIGEST, 1), clock.now - 60))
    r = make(script, kube, clock)
    r.on_event("ADDED", obj)
    assert r.queue.pop(clock.now + 500) is None and r.queue.next_due() is not None


async def test_pull_secret_credentials_for_the_source_host() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    auth = base64.b64encode(b"robot:s3cret").decode()
    kube.secrets["a/acr"] = json.dumps({"auths": {"other.io": {"auth": "eDp5"}, "myacr.azurecr.io": {"auth": auth}}}).encode()
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "myacr.azurecr.io/nginx:1", ["missing", "acr"]))
    await drain(r, kube)
    creds = script.calls[0][2]
    assert creds is not None and (creds.username, creds.password) == ("robot", "s3cret")
    assert "s3cret" not in json.dumps(kube.status_writes) and "s3cret" not in repr(creds)


async def test_auth_failure_names_the_missing_pull_secret() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(AuthenticationError("myacr.azurecr.io: 401 unauthorized"))
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "myacr.azurecr.io/nginx:1", ["acr"]))
    await drain(r, kube)
    cond = st.condition(kube.status("a/img")["conditions"], "Ready")
    assert cond is not None and cond["reason"] == "Authentication"
    assert "pull secrets not found: a/acr" in cond["message"]


async def test_invalid_source_fails_once() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    obj = kube.add("a", "bad", "Not A Reference")
    r.on_event("ADDED", obj)
    for t in list(r._tasks):
        await t
    r.on_event("MODIFIED", copy.deepcopy(kube.objects["a/bad"]))
    assert kube.status("a/bad")["phase"] == "Failed" and len(kube.status_writes) == 1 and not script.calls
    assert len(r.queue) == 0


async def test_spec_change_resets_backoff_and_moves_destination() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(NotFoundError("nope"), result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Failed"
    obj = kube.objects["a/img"]
    obj["spec"]["sourceArtifact"] = "ghcr.io/x/y:2"
    obj["metadata"]["generation"] = 2
    r.on_event("MODIFIED", copy.deepcopy(obj))
    assert r.queue.scheduled(f"{REG}/ghcr.io/x/y:2") == clock.now
    assert r.queue.scheduled(f"{REG}/ghcr.io/x/y:1") is None  # the old destination's retry is dropped
    clock.now += 1000
    await drain(r, kube)
    s = kube.status("a/img")
    assert s["phase"] == "Ready" and s["observedGeneration"] == 2 and s["localArtifact"].endswith("/ghcr.io/x/y:2")
    assert [c[0] for c in script.calls] == ["ghcr.io/x/y:1", "ghcr.io/x/y:2"]


async def test_deleted_artifact_leaves_the_queue() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    obj = kube.add("a", "img", "ghcr.io/x/y:1")
    r.on_event("ADDED", obj)
    r.on_event("DELETED", obj)
    assert len(r.queue) == 0 and await drain(r, kube) == [] and not script.calls


async def test_a_created_pull_secret_retries_an_access_failure_at_once() -> None:
    kube, clock = FakeKube(), Clock()
    script = Script(AuthenticationError("myacr.azurecr.io: 401 unauthorized"), result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "myacr.azurecr.io/nginx:1", ["acr"]))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Failed"
    assert await r.recheck_secrets() == []  # nothing changed: wait out the (long) backoff
    due = r.queue.next_due()
    assert due is not None and due - clock.now > 200
    kube.secrets["a/acr"] = json.dumps({"auths": {"myacr.azurecr.io": {"auth": base64.b64encode(b"u:p").decode()}}}).encode()
    dest = f"{REG}/myacr.azurecr.io/nginx:1"
    assert await r.recheck_secrets() == [dest]
    assert r.queue.next_due() == clock.now
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Ready" and script.calls[-1][2] is not None
    assert await r.recheck_secrets() == []  # nothing left to watch


async def test_a_new_artifact_waiting_for_a_worker_is_pending() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    for task in list(r._tasks):  # the workers are busy elsewhere: the queued-write lands first
        await task
    s = kube.status("a/img")
    assert s["phase"] == "Pending" and s["observedGeneration"] == 1
    await drain(r, kube)
    assert [w[1].get("phase") for w in kube.status_writes] == ["Pending", "Copying", "Ready"]
    assert [e[2] for e in kube.events] == ["Copying", "Copied"]


async def test_artifacts_claimed_by_another_installation_are_left_alone() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    theirs = kube.add("a", "theirs", "ghcr.io/x/y:1")
    theirs["metadata"]["annotations"] = {st.ANNOTATION_REGISTRY: "other-registry:5000"}
    ours = kube.add("a", "ours", "ghcr.io/x/z:1")
    ours["metadata"]["annotations"] = {st.ANNOTATION_REGISTRY: REG}
    r.on_event("ADDED", theirs)
    r.on_event("ADDED", ours)
    await drain(r, kube)
    assert [c[0] for c in script.calls] == ["ghcr.io/x/z:1"]
    assert "status" not in kube.objects["a/theirs"] and kube.status("a/ours")["phase"] == "Ready"


async def test_a_newcomer_during_a_source_outage_leaves_ready_artifacts_ready() -> None:
    """Disconnected drill: a new namespace starts using an image the cluster registry already holds
    while the source is down. Its own Artifact fails (its access cannot be checked), the others stay
    Ready; once the source is back the newcomer is copied too."""
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Ready"
    script.answers = [RegistryUnavailableError("cannot reach ghcr.io"), result()]
    writes_to_a = sum(1 for key, _ in kube.status_writes if key == "a/img")
    r.on_event("ADDED", kube.add("b", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    assert kube.status("b/img")["phase"] == "Failed"
    assert kube.status("a/img")["phase"] == "Ready"
    assert sum(1 for key, _ in kube.status_writes if key == "a/img") == writes_to_a  # not even Copying
    clock.now = r.queue.next_due() or 0
    await drain(r, kube)
    assert kube.status("b/img")["phase"] == "Ready" and kube.status("a/img")["phase"] == "Ready"


async def test_a_new_owner_during_a_source_outage_leaves_a_ready_artifact_ready() -> None:
    """Disconnected, a CronJob's new Job adds an owner to a Ready Artifact (a new generation): the access
    re-check cannot reach the source, the Artifact stays Ready (no Copying, no Failed) and is re-checked
    once the source is back. A refusal of the namespace's access, by contrast, does take Ready away."""
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    script.answers = [RegistryUnavailableError("cannot reach ghcr.io"), result()]
    writes = len(kube.status_writes)
    obj = kube.objects["a/img"]
    obj["metadata"]["generation"] = 2
    obj["spec"]["owners"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "report-1", "uid": "u1"}]
    r.on_event("MODIFIED", copy.deepcopy(obj))
    await drain(r, kube)
    assert len(script.calls) == 2, "the new generation was re-checked upstream"
    assert kube.status("a/img")["phase"] == "Ready" and len(kube.status_writes) == writes
    clock.now = r.queue.next_due() or 0
    await drain(r, kube)
    s = kube.status("a/img")
    assert s["phase"] == "Ready" and s["observedGeneration"] == 2
    script.answers = [AuthenticationError("ghcr.io: 401 unauthorized")]
    obj["metadata"]["generation"] = 3
    obj["spec"]["pullSecrets"] = ["gone"]
    r.on_event("MODIFIED", copy.deepcopy(obj))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Failed"


async def test_a_lost_copy_with_the_source_down_is_not_ready() -> None:
    """When the cluster registry itself lost the image, every Artifact for it reflects the failed recopy."""
    kube, clock, script = FakeKube(), Clock(), Script(result())
    r = make(script, kube, clock)
    for ns in ("a", "b"):
        r.on_event("ADDED", kube.add(ns, "img", "ghcr.io/x/y:1"))
    await drain(r, kube)
    script.present.clear()
    script.answers = [RegistryUnavailableError("cannot reach ghcr.io")]
    clock.now = r.queue.next_due() or 0
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Failed" and kube.status("b/img")["phase"] == "Failed"


def docker_config(host: str, user: str, password: str) -> bytes:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}}).encode()


class Upstream(Script):
    """A private source: only ``allowed`` credentials read it (the others get 401), as a registry would."""

    def __init__(self, allowed: Credentials | None, digest: str = DIGEST) -> None:
        super().__init__(result(digest))
        self.allowed = allowed

    async def copy(self, src: reference.Reference, dst: reference.Reference, creds: Credentials | None) -> CopyResult:
        if creds != self.allowed:
            self.calls.append((str(src), str(dst), creds))
            raise AuthenticationError(f"{src.host}: 401 unauthorized")
        return await super().copy(src, dst, creds)


def private_source(namespace: str, user: str, password: str) -> tuple[FakeKube, Clock, Upstream, ArtifactReconciler]:
    """A reconciler whose source only ``user`` may read; ``namespace``'s Secret ``acr`` holds that credential."""
    kube, clock = FakeKube(), Clock()
    script = Upstream(Credentials(username=user, password=password))
    kube.secrets[f"{namespace}/acr"] = docker_config("myacr.azurecr.io", user, password)
    return kube, clock, script, make(script, kube, clock)


async def test_a_namespace_without_access_is_not_ready_from_another_namespaces_copy() -> None:
    """#15: B's copy (B's secret) must not make A's Artifact Ready; A's attempt is made with A's own access."""
    kube, clock, script, r = private_source("b", "b-robot", "b-pass")
    b_creds = script.allowed
    src = "myacr.azurecr.io/private/reporter:1"
    r.on_event("ADDED", kube.add("b", "img", src, ["acr"]))
    r.on_event("ADDED", kube.add("a", "img", src))  # no pull secret of its own
    await drain(r, kube)
    assert kube.status("b/img")["phase"] == "Ready"
    s = kube.status("a/img")
    cond = st.condition(s["conditions"], "Ready")
    assert s["phase"] == "Failed" and "digest" not in s and cond is not None and cond["reason"] == "Authentication"
    assert "namespace a's own access: anonymous" in cond["message"]
    assert {c[2] for c in script.calls} == {None, b_creds}  # A tried anonymously, never with B's secret
    # a retry later still uses A's access only; B stays Ready throughout
    script.calls.clear()
    clock.now = r.queue.next_due() or 0
    await drain(r, kube)
    assert [c[2] for c in script.calls] == [None] and kube.status("a/img")["phase"] == "Failed"
    assert kube.status("b/img")["phase"] == "Ready"


async def test_a_namespace_with_its_own_access_is_verified_and_ready_on_an_existing_copy() -> None:
    kube, clock = FakeKube(), Clock()
    creds = Credentials(username="robot", password="pw")
    script = Upstream(creds)
    for ns in ("a", "b"):
        kube.secrets[f"{ns}/acr-{ns}"] = docker_config("myacr.azurecr.io", "robot", "pw")
    r = make(script, kube, clock)
    src = "myacr.azurecr.io/private/reporter:1"
    r.on_event("ADDED", kube.add("b", "img", src, ["acr-b"]))
    await drain(r, kube)
    r.on_event("ADDED", kube.add("a", "img", src, ["acr-a"]))  # later: the image is already there
    await drain(r, kube)
    assert [c[2] for c in script.calls] == [creds, creds]  # A's own attempt happened (its own secret)
    assert kube.status("a/img")["phase"] == "Ready" and kube.status("a/img")["digest"] == DIGEST


async def test_namespaces_with_different_credentials_each_make_their_own_attempt() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    kube.secrets["a/s"] = docker_config("myacr.azurecr.io", "a-robot", "x")
    kube.secrets["b/s"] = docker_config("myacr.azurecr.io", "b-robot", "y")
    r = make(script, kube, clock)
    for ns in ("a", "b", "c"):
        r.on_event("ADDED", kube.add(ns, "img", "myacr.azurecr.io/app:1", ["s"] if ns != "c" else None))
    await drain(r, kube)
    users = sorted(c[2].username if c[2] else "" for c in script.calls)
    assert users == ["", "a-robot", "b-robot"]  # c: anonymous (a public image is Ready by that)
    assert all(kube.status(f"{ns}/img")["phase"] == "Ready" for ns in ("a", "b", "c"))


def test_for_namespace_names_whose_access_was_tried() -> None:
    failed = st.CopyFailed("AccessDenied", "denied", False)
    got = st.for_namespace(failed, "a", ("acr",), ("a/acr",))
    assert isinstance(got, st.CopyFailed) and got.message == "denied (with namespace a's own access: pull secrets acr; pull secrets not found: a/acr)"
    other = st.CopyFailed("Unavailable", "down", True)
    assert st.for_namespace(other, "a", (), ()) is other


async def test_every_artifacts_namespace_is_handed_to_the_pull_secret_controller() -> None:
    from cluster_registry.reconcile.pullsecrets import PullSecrets

    kube, clock, script = FakeKube(), Clock(), Script(result())
    secrets = PullSecrets(None, "cr", "cr-pull-keys", "cluster-registry-pull", "127.0.0.1:5050")  # type: ignore[arg-type]
    r = ArtifactReconciler(kube, Config(registry_host=REG), artifact_metrics(), copy=script.copy, verify=script.verify,  # type: ignore[arg-type]
                           rand=lambda: 0.5, clock=clock, pull_secrets=secrets)
    for ns in ("a", "b", "a"):
        r.on_event("ADDED", kube.add(ns, f"img-{len(kube.objects)}", "ghcr.io/x/y:1"))
    assert secrets.namespaces == {"a", "b"}


async def test_artifacts_of_one_namespace_share_its_secrets_but_never_another_namespaces() -> None:
    kube, clock, script, r = private_source("a", "robot", "pw")
    src = "myacr.azurecr.io/private/app:1"
    r.on_event("ADDED", kube.add("a", "img", src, ["acr"]))
    await drain(r, kube)
    r.on_event("ADDED", kube.add("a", "twin", src))  # later, same namespace, no secret of its own
    r.on_event("ADDED", kube.add("b", "img", src))
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == kube.status("a/twin")["phase"] == "Ready"
    assert kube.status("b/img")["phase"] == "Failed"


async def test_events_do_not_hold_up_the_worker_and_keep_their_order() -> None:
    """A slow events API (the fleet's 600 Copied Events) must not delay the next copy: ``process``
    returns with the Events still being sent, and one Artifact's Events arrive in order."""
    kube, clock, script = FakeKube(), Clock(), Script(result())
    gate = threading.Event()
    record = kube.event

    def slow_event(obj: dict[str, Any], type_: str, reason: str, note: str, **kw: Any) -> None:
        if reason == "Copying":
            assert gate.wait(5)  # held until the worker has moved on
        record(obj, type_, reason, note, **kw)

    kube.event = slow_event  # type: ignore[method-assign]
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    dest = r.queue.pop(clock.now)
    assert dest is not None
    await asyncio.wait_for(r.process(dest), 2)  # would hang on the held Event if it were awaited
    for _ in range(200):  # the Ready write goes out off the worker's path too, without waiting on the Event
        if kube.status("a/img").get("phase") == "Ready":
            break
        await asyncio.sleep(0.01)
    assert kube.status("a/img")["phase"] == "Ready" and kube.events == []
    gate.set()
    await r.settled()  # the Copied Event is sent by a task the Ready write's task starts
    assert [e[2] for e in kube.events] == ["Copying", "Copied"]


async def test_a_slow_status_write_does_not_hold_up_the_next_copy() -> None:
    """Under a fleet's load every status write is an API round trip: ``process`` hands the Ready
    write off and returns, so the worker copies the next image while it is on its way."""
    kube, clock, script = FakeKube(), Clock(), Script(result())
    gate = threading.Event()
    patch = kube.patch_status

    def slow_ready(plural: str, ns: str, name: str, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("phase") == "Ready":
            assert gate.wait(5)
        return patch(plural, ns, name, p)

    kube.patch_status = slow_ready  # type: ignore[method-assign]
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "one", "ghcr.io/x/one:1"))
    r.on_event("ADDED", kube.add("a", "two", "ghcr.io/x/two:1"))
    for _ in range(2):
        dest = r.queue.pop(clock.now)
        assert dest is not None
        r.queue.done(dest, await asyncio.wait_for(r.process(dest), 2))  # would time out on the held write
    assert len(script.calls) == 2 and kube.status("a/one")["phase"] == kube.status("a/two")["phase"] == "Copying"
    gate.set()
    await r.settled()
    assert kube.status("a/one")["phase"] == kube.status("a/two")["phase"] == "Ready"


async def test_a_failed_status_write_retries_the_destination_after_a_backoff() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    patch, failures = kube.patch_status, [RuntimeError("API server: 500")]

    def flaky(plural: str, ns: str, name: str, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("phase") == "Ready" and failures:
            raise failures.pop()
        return patch(plural, ns, name, p)

    kube.patch_status = flaky  # type: ignore[method-assign]
    r = make(script, kube, clock)
    r.on_event("ADDED", kube.add("a", "img", "ghcr.io/x/y:1"))
    dest = r.queue.pop(clock.now)
    assert dest is not None
    r.queue.done(dest, await r.process(dest))
    await r.settled()
    assert kube.status("a/img")["phase"] == "Copying"
    due = r.queue.scheduled(dest)
    assert due is not None and 0 < due - clock.now < 60  # a temporary failure's backoff, not the verify interval
    clock.now = due
    await drain(r, kube)
    assert kube.status("a/img")["phase"] == "Ready"


async def test_a_namespaces_images_copied_in_a_row_read_its_pull_secret_once() -> None:
    kube, clock, script = FakeKube(), Clock(), Script(result())
    kube.secrets["a/acr"] = json.dumps({"auths": {"myacr.azurecr.io": {"auth": base64.b64encode(b"u:p").decode()}}}).encode()
    read, reads = kube.docker_config, []

    def counted(ns: str, name: str) -> bytes | None:
        reads.append(f"{ns}/{name}")
        if len(reads) == 1:
            raise RuntimeError("API server: 500")  # a failed read is not kept: the next copy reads again
        return read(ns, name)

    kube.docker_config = counted  # type: ignore[method-assign]
    r = make(script, kube, clock)
    for n in range(4):
        r.on_event("ADDED", kube.add("a", f"img{n}", f"myacr.azurecr.io/app{n}:1", ["acr"]))
    await drain(r, kube)
    assert reads == ["a/acr", "a/acr"]
    assert [c[2] is not None for c in script.calls] == [False, True, True, True]
