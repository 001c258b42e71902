"""The Artifact recorder (deduplication, batching, owner and service-account resolution), fed by the
pod watch, and the watch-fed view, against in-memory fakes of the API server."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from typing import Any

from cluster_registry import reference
from cluster_registry.api import OwnerRef, artifact_body
from cluster_registry.webhook.mutate import Mutator, Settings
from cluster_registry.webhook.pods import Gone, Intent, Owner, PodWatch
from cluster_registry.webhook.recorder import Conflict, Recorder
from cluster_registry.webhook.view import ArtifactView

RS = Owner("apps/v1", "ReplicaSet", "web-5c9d", "rs-uid")
DEPLOY = Owner("apps/v1", "Deployment", "web", "deploy-uid")
JOB = Owner("batch/v1", "Job", "backup-1", "job-uid")
CRON = Owner("batch/v1", "CronJob", "backup", "cron-uid")
DEPLOY_REF = OwnerRef(apiVersion="apps/v1", kind="Deployment", name="web", uid="deploy-uid")


class FakeApi:
    """An API server holding Artifacts, with controller chains and service accounts."""

    def __init__(self) -> None:
        self.artifacts: dict[tuple[str, str], dict[str, Any]] = {}
        self.parents = {RS.uid: DEPLOY, JOB.uid: CRON}
        self.sa = {("cnf", "upf"): ["sa-pull"]}
        self.calls: list[str] = []
        self.rv = 100
        self.conflict_next_patch = False

    def get_artifact(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get")
        got = self.artifacts.get((namespace, name))
        return copy.deepcopy(got) if got else None

    def create_artifact(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("create")
        key = (namespace, body["metadata"]["name"])
        if key in self.artifacts:
            raise Conflict("exists")
        self.rv += 1
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.artifacts[key] = obj
        return obj

    def patch_artifact(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("patch")
        obj = self.artifacts[(namespace, name)]
        if self.conflict_next_patch or patch["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            self.conflict_next_patch = False
            raise Conflict("changed")
        obj["spec"].update(patch["spec"])
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    def controller_of(self, namespace: str, owner: Owner) -> Owner | None:
        self.calls.append("owner")
        return self.parents.get(owner.uid)

    def service_account_secrets(self, namespace: str, name: str) -> list[str]:
        self.calls.append("sa")
        return self.sa.get((namespace, name), [])

    def writes(self) -> int:
        return sum(c in ("create", "patch") for c in self.calls)


def pod(uid: str, images: list[str], owner: dict[str, Any] | None, phase: str = "Pending") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"web-5c9d-{uid}", "namespace": "cnf", "uid": uid, "resourceVersion": "1"}
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "metadata": meta,
        "spec": {
            "serviceAccountName": "upf",
            "imagePullSecrets": [{"name": "pod-pull"}],
            "containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)],
        },
        "status": {"phase": phase},
    }


RS_REF = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": RS.name, "uid": RS.uid, "controller": True}
IMAGES = ["myacr.azurecr.io/upf:1.0", "nginx", "ghcr.io/x/y:2", "busybox"]


async def rollout(api: FakeApi, view: ArtifactView, pods: int) -> Recorder:
    """A Deployment's rollout as the pod watch sees it: each pod ADDED, then MODIFIED twice (scheduled,
    running), then half of them DELETED again (a rollout's old ReplicaSet scaled down)."""
    rec = Recorder(api, view, batch_interval=0.05)
    watch = PodWatch(None, Mutator(Settings.build("cr.local:5000")), rec.submit, record_unannotated=True)
    task = asyncio.create_task(rec.run())
    for i in range(pods):
        for kind, phase in (("ADDED", "Pending"), ("MODIFIED", "Pending"), ("MODIFIED", "Running")):
            watch.apply(kind, pod(f"u{i}", IMAGES, RS_REF, phase))
        if i % 2:
            watch.apply("DELETED", pod(f"u{i - 1}", IMAGES, RS_REF))
        if i % 50 == 0:
            await asyncio.sleep(0)  # events arrive over time, interleaved with flushes
    assert await rec.drained(10)
    task.cancel()
    return rec


async def test_a_rollout_of_1000_pods_writes_once_per_image() -> None:
    api = FakeApi()
    rec = await rollout(api, ArtifactView.static([]), 1000)
    assert api.calls.count("create") == len(IMAGES)
    assert api.writes() == len(IMAGES)
    assert rec.stats.deduplicated >= 1000 * len(IMAGES) - 2 * len(IMAGES)
    # owners resolved once (ReplicaSet -> Deployment -> top), service account read once
    assert api.calls.count("owner") == 2 and api.calls.count("sa") == 1
    for (ns, name), obj in api.artifacts.items():
        assert ns == "cnf"
        assert name == reference.artifact_name(obj["spec"]["sourceArtifact"])
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "cluster-registry"}
        assert obj["spec"]["owners"] == [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "deploy-uid"}
        ]
        assert obj["spec"]["pullSecrets"] == ["pod-pull", "sa-pull"]
    assert {o["spec"]["sourceArtifact"] for o in api.artifacts.values()} == {
        "myacr.azurecr.io/upf:1.0",
        "docker.io/library/nginx:latest",
        "ghcr.io/x/y:2",
        "docker.io/library/busybox:latest",
    }


def test_existing_artifact_with_everything_costs_no_write() -> None:
    api = FakeApi()
    source = "docker.io/library/nginx:latest"
    body = artifact_body(source, "cnf", owners=[DEPLOY_REF], pull_secrets=["pod-pull", "sa-pull"])
    body["metadata"]["resourceVersion"] = "5"
    rec = Recorder(api, ArtifactView.static([body]))
    failed, done = rec.flush({Intent("cnf", source, ("pod-pull",), "upf", RS)})
    assert not failed and len(done) == 1
    assert api.writes() == 0 and rec.stats.unchanged == 1


def test_new_owner_is_merged_and_conflicts_are_retried() -> None:
    api = FakeApi()
    source = "docker.io/library/nginx:latest"
    stale = artifact_body(source, "cnf", owners=[DEPLOY_REF])
    stale["metadata"]["resourceVersion"] = "1"
    api.artifacts[("cnf", stale["metadata"]["name"])] = {**copy.deepcopy(stale), "metadata": {**stale["metadata"], "resourceVersion": "7"}}
    rec = Recorder(api, ArtifactView.static([stale]))  # the view lags behind: resourceVersion 1
    failed, _ = rec.flush({Intent("cnf", source, (), "default", JOB)})
    assert not failed
    obj = api.artifacts[("cnf", stale["metadata"]["name"])]
    assert [o["uid"] for o in obj["spec"]["owners"]] == ["deploy-uid", "cron-uid"]
    assert api.calls.count("patch") == 2 and api.calls.count("get") == 1  # conflict, re-read, patch


def test_create_conflict_falls_back_to_merging() -> None:
    api = FakeApi()
    source = "ghcr.io/x/y:2"
    other = artifact_body(source, "cnf", owners=[OwnerRef(apiVersion="v1", kind="Pod", name="p", uid="")])
    api.create_artifact("cnf", other)  # another replica won the race; our view has not seen it
    api.calls.clear()
    rec = Recorder(api, ArtifactView.static([]))
    failed, _ = rec.flush({Intent("cnf", source, ("s",), "default", RS)})
    assert not failed
    assert api.calls == ["sa", "owner", "owner", "create", "get", "patch"]
    spec = api.artifacts[("cnf", reference.artifact_name(source))]["spec"]
    assert spec["pullSecrets"] == ["s"] and len(spec["owners"]) == 2


def test_api_errors_return_intents_for_retry() -> None:
    api = FakeApi()

    def broken(namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionError("apiserver down")

    api.create_artifact = broken  # type: ignore[method-assign]
    rec = Recorder(api, ArtifactView.static([]))
    intent = Intent("cnf", "docker.io/library/nginx:latest", (), "default", None)
    failed, done = rec.flush({intent})
    assert failed == {intent} and done == [] and rec.stats.errors == 1


def test_a_batch_creates_a_few_artifacts_at_once_and_a_rejected_one_waits_alone() -> None:
    """A fleet's Artifacts are not written one after another: ``concurrency`` creates are in flight
    together (each here blocks until a second one arrives), and one the API server throttles (429)
    comes back for retry without holding back or losing the others."""
    api = FakeApi()
    lock = threading.Lock()
    inflight, peak = [0], [0]
    both = threading.Barrier(2, timeout=5)
    create = api.create_artifact

    def slow_create(namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["spec"]["sourceArtifact"].endswith("/throttled:1"):
            raise RuntimeError("429 Too Many Requests")
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        both.wait()  # would time out (BrokenBarrierError: a failed group) if creates ran one at a time
        with lock:
            inflight[0] -= 1
            return create(namespace, body)

    api.create_artifact = slow_create  # type: ignore[method-assign]
    rec = Recorder(api, ArtifactView.static([]), concurrency=3)
    good = {Intent("cnf", f"ghcr.io/x/img{i}:1", (), "default", None) for i in range(4)}
    throttled = Intent("cnf", "ghcr.io/x/throttled:1", (), "default", None)
    failed, done = rec.flush(good | {throttled})
    assert failed == {throttled} and set(done) == good
    assert len(api.artifacts) == 4 and rec.stats.creates == 4 and rec.stats.errors == 1
    assert peak[0] >= 2


def test_recent_intents_are_resubmitted_once_the_artifact_is_gone() -> None:
    t = [0.0]
    api = FakeApi()
    view = ArtifactView.static([])
    rec = Recorder(api, view, recent_ttl=30, clock=lambda: t[0])
    intent = Intent("cnf", "docker.io/library/nginx:latest", (), "default", None)
    rec.remember([intent])
    rec.submit([intent])
    assert rec.pending == 0  # written a moment ago
    t[0] = 100.0
    rec.submit([intent])
    assert rec.pending == 1  # long ago, and the view does not hold it (deleted by GC?)


# -- the pod watch's list/watch loop, and the view


class FakeSource:
    """Pods: the first list has a pod using nginx, the second (after Gone) one using redis."""

    def __init__(self) -> None:
        self.lists = 0
        self.events: list[list[tuple[str, dict[str, Any]]] | Exception] = []
        self.idle = threading.Event()

    def list(self) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return [pod(f"l{self.lists}", ["nginx" if self.lists == 1 else "redis"], RS_REF)], str(self.lists)

    def watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.events:
            self.idle.set()
            threading.Event().wait(0.05)
            return
        batch = self.events.pop(0)
        if isinstance(batch, Exception):
            raise batch
        yield from batch


def sources(got: list[frozenset[Intent]]) -> list[set[str]]:
    return [{i.source for i in g} for g in got]


def test_pod_watch_lists_watches_and_relists_on_gone() -> None:
    src = FakeSource()
    src.events = [
        [("ADDED", pod("a", ["ghcr.io/x/y:2"], RS_REF)), ("BOOKMARK", {"metadata": {"resourceVersion": "9"}})],
        [("MODIFIED", pod("a", ["ghcr.io/x/y:2"], RS_REF, "Running")), ("DELETED", pod("a", [], RS_REF))],
        Gone(),
    ]
    got: list[frozenset[Intent]] = []
    watch = PodWatch(src, Mutator(Settings.build("cr.local:5000")), lambda i: got.append(frozenset(i)),
                     record_unannotated=True, backoff=0.01)  # fmt: skip
    watch.start()
    try:
        assert src.idle.wait(5)
    finally:
        watch.stop()
    assert src.lists == 2  # relisted after Gone
    assert sources(got) == [{"docker.io/library/nginx:latest"}, {"ghcr.io/x/y:2"}, {"docker.io/library/redis:latest"}]
    assert len(watch) == 1  # the relist replaced everything


def test_pod_watch_survives_api_errors() -> None:
    src = FakeSource()
    calls = {"n": 0}
    real_list = src.list

    def flaky() -> tuple[list[dict[str, Any]], str]:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("apiserver starting")
        return real_list()

    src.list = flaky  # type: ignore[method-assign]
    watch = PodWatch(src, Mutator(Settings.build("cr.local:5000")), record_unannotated=True, backoff=0.01)
    watch.start()
    try:
        assert src.idle.wait(5) and calls["n"] == 3 and len(watch) == 1
    finally:
        watch.stop()


def art(ns: str, source: str, phase: str, name: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "resourceVersion": "1"},
        "spec": {"sourceArtifact": source},
        "status": {"phase": phase},
    }


def test_view_events() -> None:
    deleted: list[tuple[str, str]] = []
    view = ArtifactView.static([art("cnf", "a.io/x:1", "Pending", "a")])
    view.on_deleted = lambda ns, source: deleted.append((ns, source))
    assert not view.is_ready("cnf", "a.io/x:1")
    view.apply("MODIFIED", art("cnf", "a.io/x:1", "Ready", "a"))
    assert view.is_ready("cnf", "a.io/x:1")
    view.apply("DELETED", art("cnf", "a.io/x:1", "Ready", "other-name"))  # not the one we hold
    assert view.is_ready("cnf", "a.io/x:1") and deleted == []
    view.apply("DELETED", art("cnf", "a.io/x:1", "Ready", "a"))
    assert view.get("cnf", "a.io/x:1") is None and len(view) == 0 and deleted == [("cnf", "a.io/x:1")]
    view.apply("ADDED", {"metadata": {"name": "broken"}})  # malformed: ignored
    assert len(view) == 0
