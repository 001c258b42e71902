"""The component reconciler's pure core and the shared workload image extraction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster_registry import reference, workloads
from cluster_registry.reconcile import component_status as cs
from cluster_registry.reconcile.status import condition, next_status, Copied, CopyFailed, Locked, Started

NOW = 1_800_000_000.0
FIXTURE = Path(__file__).parent / "reconcile_fixtures" / "rendered.yaml"

COMPONENT: dict[str, Any] = {
    "apiVersion": "clusterregistry.io/v1alpha1",
    "kind": "Component",
    "metadata": {"name": "cnf", "namespace": "tenant", "uid": "c-uid", "generation": 2},
    "spec": {"images": ["nginx", "ghcr.io/a/b:1"], "pullSecrets": ["s1"], "chart": {"pullSecrets": ["s2", "s1"]}},
}


def test_extracts_every_container_kind_from_every_workload_kind() -> None:
    text = """
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  initContainers: [{name: i, image: "init:1"}]
  containers: [{name: c, image: "app:1"}, {name: noimage}]
  ephemeralContainers: [{name: e, image: "debug:1"}]
---
# a comment-only document
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: cj}
spec:
  jobTemplate:
    spec:
      template:
        spec: {containers: [{name: c, image: "cron:1"}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: ds}
  spec: {template: {spec: {containers: [{name: c, image: " ds:1 "}]}}}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: cm}
  data: {image: "not-a-workload:1"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dup}
spec: {template: {spec: {containers: [{name: c, image: "app:1"}]}}}
"""
    docs = workloads.load_manifests(text)
    found = workloads.workload_images(docs)
    assert [(w.kind, w.container_field, w.image) for w in found] == [
        ("Pod", "initContainers", "init:1"),
        ("Pod", "containers", "app:1"),
        ("Pod", "ephemeralContainers", "debug:1"),
        ("CronJob", "containers", "cron:1"),
        ("DaemonSet", "containers", "ds:1"),
        ("Deployment", "containers", "app:1"),
    ]
    assert found[0].where == "Pod/p initContainers[i]"
    assert workloads.images(docs) == ["init:1", "app:1", "debug:1", "cron:1", "ds:1"]


def test_extracts_images_from_a_real_helm_template_render() -> None:
    """``FIXTURE`` is real ``helm template`` output of reconcile_fixtures/cnf-chart (see its first line)."""
    found = workloads.workload_images(workloads.load_manifests(FIXTURE.read_text()))
    assert sorted((w.kind, w.container_field, w.image) for w in found) == [
        ("CronJob", "containers", "example.com/cnf/backup:1.0"),
        ("DaemonSet", "containers", "example.com/cnf/agent:0.3"),
        ("Deployment", "containers", "example.com/cnf/app:1.0"),
        ("Deployment", "initContainers", "example.com/cnf/init:1.0"),
        ("Job", "containers", "example.com/cnf/migrate:1.0"),
        ("Pod", "containers", "example.com/cnf/app:1.0"),
        ("StatefulSet", "containers", "example.com/cnf/db:2.1"),
    ]
    want = cs.desired(workloads.images(workloads.load_manifests(FIXTURE.read_text())))
    assert len(want.sources) == 6 and not want.invalid  # app:1.0 twice, one Artifact


def test_desired_normalises_dedupes_and_reports_invalid() -> None:
    want = cs.desired(["nginx", "docker.io/library/nginx:latest", "Bad/Name"], ["ghcr.io/a/b:1", "nginx"])
    assert want.sources == ("docker.io/library/nginx:latest", "ghcr.io/a/b:1")
    assert [i for i, _ in want.invalid] == ["Bad/Name"]


def test_wanted_artifact_owner_and_labels() -> None:
    body = cs.wanted_artifact(COMPONENT, "ghcr.io/a/b:1", cs.pull_secrets(COMPONENT["spec"]))
    meta = body["metadata"]
    assert meta["name"] == reference.artifact_name("ghcr.io/a/b:1") and meta["namespace"] == "tenant"
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "cluster-registry", "clusterregistry.io/component": "cnf"}
    assert meta["ownerReferences"] == [
        {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Component", "name": "cnf", "uid": "c-uid"}
    ]
    assert body["spec"] == {"sourceArtifact": "ghcr.io/a/b:1", "pullSecrets": ["s1", "s2"]}
    assert cs.component_owners(body) == ["cnf"]


def test_owner_reference_adoption_and_release() -> None:
    webhook_made = {"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "uid": "rs"}]}}
    added = cs.owners_adding(webhook_made, COMPONENT)
    assert added is not None and [r["uid"] for r in added] == ["rs", "c-uid"]
    assert cs.owners_adding({"metadata": {"ownerReferences": added}}, COMPONENT) is None
    assert cs.owners_removing({"metadata": {"ownerReferences": added}}, "c-uid") == [{"kind": "ReplicaSet", "uid": "rs"}]
    assert cs.owners_removing(webhook_made, "c-uid") is None


def artifact_with(*outcomes: object) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for o in outcomes:
        status = dict(next_status(status, 1, o, NOW))  # type: ignore[arg-type]
    return {"status": status}


def test_component_status_counts_and_conditions() -> None:
    a, b, c = "docker.io/library/a:1", "docker.io/library/b:1", "docker.io/library/c:1"
    want = cs.desired([a, b, c])
    name = reference.artifact_name
    copied = Copied("r/x", "sha256:" + "0" * 64, 1)
    arts = {name(a): artifact_with(Started(a, "r"), copied), name(b): artifact_with(Started(b, "r"))}
    s = cs.compute_status({}, 2, want, arts, NOW)
    assert s["ready"] == "1/3" and s["observedGeneration"] == 2
    assert [(i["artifact"], i["phase"]) for i in s["images"]] == [(name(a), "Ready"), (name(b), "Copying"), (name(c), "Pending")]
    ready = condition(s["conditions"], "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "Progressing"
    assert ready.get("observedGeneration") == 2

    arts[name(c)] = artifact_with(CopyFailed("NotFound", "manifest unknown", False))
    s = cs.compute_status(s, 2, want, arts, NOW + 1)
    ready = condition(s["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "ArtifactFailed" and "manifest unknown" in ready["message"]
    assert s["images"][2]["message"] == "manifest unknown"

    arts[name(c)] = artifact_with(Locked())
    assert condition(cs.compute_status(s, 2, want, arts, NOW)["conditions"], "Ready")["reason"] == "Deferred"  # type: ignore[index]

    arts[name(b)] = artifact_with(copied)
    arts[name(c)] = artifact_with(copied)
    done = cs.compute_status(s, 2, want, arts, NOW + 9)
    ready = condition(done["conditions"], "Ready")
    assert done["ready"] == "3/3" and ready is not None and ready["status"] == "True" and ready["reason"] == "AllReady"
    assert ready["lastTransitionTime"] == "2027-01-15T08:00:09Z"


@pytest.mark.parametrize(
    ("failures", "stalled_on"),
    [
        ({"b": ("NotFound", "manifest unknown")}, "b"),  # the image does not exist: Failed for kstatus
        ({"b": ("RegistryUnavailable", "connection refused")}, None),  # retried: InProgress
        ({"a": ("RateLimited", "429"), "b": ("AccessDenied", "denied")}, "b"),  # the permanent one is named
    ],
)
def test_an_image_failed_for_good_stalls_the_component_a_retried_one_keeps_it_reconciling(
    failures: dict[str, tuple[str, str]], stalled_on: str | None
) -> None:
    src = {k: f"docker.io/library/{k}:1" for k in "abc"}
    arts = {reference.artifact_name(src["c"]): artifact_with(Copied("r/x", "sha256:" + "0" * 64, 1))}
    for k, (reason, message) in failures.items():
        arts[reference.artifact_name(src[k])] = artifact_with(CopyFailed(reason, message, reason not in ("RegistryUnavailable", "RateLimited")))
    s = cs.compute_status({}, 1, cs.desired(src.values()), arts, NOW)
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "ArtifactFailed"
    if stalled_on is None:
        assert set(conds) == {"Ready", "Reconciling"}
        return
    assert set(conds) == {"Ready", "Stalled"}  # kstatus reads Stalled=True as Failed, with this message
    assert conds["Stalled"]["message"] == conds["Ready"]["message"]
    assert conds["Ready"]["message"] == f"1/3 ready; {src[stalled_on]}: {failures[stalled_on][1]}"


def test_every_permanent_error_reason_stalls_a_component() -> None:
    import importlib
    import pkgutil

    import cluster_registry
    from cluster_registry.errors import PermanentError

    for mod in pkgutil.walk_packages(cluster_registry.__path__, "cluster_registry."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)

    def subclasses(cls: type[PermanentError]) -> list[type[PermanentError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    reasons = {cls("m").reason for cls in subclasses(PermanentError)}
    assert cs.PERMANENT_FAILURES == reasons | {"QuotaExceeded"}


def test_component_status_render_error_and_invalid_images_are_not_ready() -> None:
    want = cs.desired(["nginx", "Bad/Name"])
    s = cs.compute_status({}, 1, want, {}, NOW)
    assert s["ready"] == "0/2"
    assert condition(s["conditions"], "Ready")["reason"] == "InvalidImage"  # type: ignore[index]
    s = cs.compute_status({}, 1, cs.desired([]), {}, NOW, render_error="helm template: chart not found")
    ready = condition(s["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "ChartRenderFailed")
    empty = cs.compute_status({}, 1, cs.desired([]), {}, NOW)
    assert condition(empty["conditions"], "Ready")["status"] == "True"  # type: ignore[index]


# --- the component control loop, with an in-memory Kubernetes and a canned chart render -------------

import copy as _copy  # noqa: E402

from cluster_registry.reconcile.components import ComponentReconciler, Config  # noqa: E402
from cluster_registry.reconcile.metrics import component_metrics  # noqa: E402


class FakeKube:
    def __init__(self) -> None:
        self.objs: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 0
        self.calls: list[str] = []

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return _copy.deepcopy(obj)

    def create(self, plural: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"create {body['metadata']['name']}")
        obj = _copy.deepcopy(body)
        obj["metadata"].setdefault("uid", "uid-" + obj["metadata"]["name"])
        self.objs[(plural, f"{ns}/{obj['metadata']['name']}")] = obj
        return self._bump(obj)

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        obj = self.objs.get((plural, f"{ns}/{name}"))
        return _copy.deepcopy(obj) if obj else None

    def patch(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"patch {name}")
        obj = self.objs[(plural, f"{ns}/{name}")]
        meta = patch["metadata"]
        if "ownerReferences" in meta:
            obj["metadata"]["ownerReferences"] = meta["ownerReferences"]
        labels = obj["metadata"].setdefault("labels", {})
        for k, v in (meta.get("labels") or {}).items():
            labels.pop(k, None) if v is None else labels.__setitem__(k, v)
        return self._bump(obj)

    def delete(self, plural: str, ns: str, name: str) -> None:
        self.calls.append(f"delete {name}")
        self.objs.pop((plural, f"{ns}/{name}"), None)

    def patch_status(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"status {name}")
        obj = self.objs[(plural, f"{ns}/{name}")]
        obj.setdefault("status", {}).update(patch)
        return self._bump(obj)

    def docker_config(self, ns: str, name: str) -> bytes | None:
        return None

    def event(self, *args: Any, **kwargs: Any) -> None:
        pass


async def test_component_loop_creates_adopts_releases_and_reports() -> None:
    kube = FakeKube()
    renders: list[str] = []

    async def render(comp: dict[str, Any], configs: list[bytes]) -> str:
        renders.append(comp["metadata"]["name"])
        return FIXTURE.read_text()

    r = ComponentReconciler(kube, Config(), component_metrics(), render=render, rand=lambda: 0.5, clock=lambda: NOW)  # type: ignore[arg-type]
    # an Artifact the webhook made earlier for one of the chart's images
    webhook = kube.create("artifacts", "t", {"metadata": {"name": reference.artifact_name("example.com/cnf/db:2.1"),
                                                           "namespace": "t", "labels": {"app.kubernetes.io/managed-by": "cluster-registry"}},
                                              "spec": {"sourceArtifact": "example.com/cnf/db:2.1", "owners": [{"kind": "Deployment"}]}})
    r.on_artifact("ADDED", webhook)
    comp = kube.create("components", "t", {"metadata": {"name": "cnf", "namespace": "t", "uid": "c1", "generation": 1},
                                           "spec": {"images": ["example.com/cnf/extra:9"], "chart": {"ref": "oci://example.com/charts/cnf"}}})
    r.on_component("ADDED", comp)
    await r.reconcile("t/cnf")
    arts = {k[1]: v for k, v in kube.objs.items() if k[0] == "artifacts"}
    assert len(arts) == 7  # 6 from the chart + 1 listed
    webhook_key = f"t/{reference.artifact_name('example.com/cnf/db:2.1')}"
    assert all(a["metadata"]["ownerReferences"] == [cs.owner_reference(comp)] for k, a in arts.items() if k != webhook_key)
    # the webhook's Artifact (pods use it) is not adopted: deleting the Component must not delete it
    assert "ownerReferences" not in arts[webhook_key]["metadata"] and f"patch {webhook_key[2:]}" not in kube.calls
    assert r.wanted_by[webhook_key] == {"t/cnf"}
    status = kube.objs[("components", "t/cnf")]["status"]
    assert status["ready"] == "0/7" and condition(status["conditions"], "Ready")["reason"] == "Progressing"  # type: ignore[index]

    # A status-only update (our own write coming back) neither renders again nor writes again.
    calls = len(kube.calls)
    r.on_component("MODIFIED", _copy.deepcopy(kube.objs[("components", "t/cnf")]))
    await r.reconcile("t/cnf")
    assert renders == ["cnf"] and kube.calls[calls:] == []

    # Every Artifact becomes Ready -> the Component is Ready.
    for key, art in arts.items():
        art["status"] = dict(next_status({}, 1, Copied("r/x", "sha256:" + "1" * 64, 1), NOW))
        r.on_artifact("MODIFIED", _copy.deepcopy(art))
    await r.reconcile("t/cnf")
    status = kube.objs[("components", "t/cnf")]["status"]
    assert status["ready"] == "7/7" and condition(status["conditions"], "Ready")["status"] == "True"  # type: ignore[index]

    # The listed image is dropped from the spec: its Artifact (no other owner) is deleted; the
    # adopted one would only lose this owner.
    comp = _copy.deepcopy(kube.objs[("components", "t/cnf")])
    comp["spec"]["images"] = []
    comp["metadata"]["generation"] = 2
    r.on_component("MODIFIED", comp)
    await r.reconcile("t/cnf")
    assert f"delete {reference.artifact_name('example.com/cnf/extra:9')}" in kube.calls
    assert kube.objs[("components", "t/cnf")]["status"]["ready"] == "6/6"


def test_kstatus_conditions_reconciling_and_stalled() -> None:
    def types(status: Any) -> dict[str, str]:
        return {c["type"]: c["status"] for c in status["conditions"]}

    want = cs.desired(["nginx"])
    s = cs.compute_status({}, 1, want, {}, NOW)
    assert types(s) == {"Ready": "False", "Reconciling": "True"}
    arts = {reference.artifact_name("docker.io/library/nginx:latest"): artifact_with(Copied("r/x", "sha256:" + "0" * 64, 1))}
    s = cs.compute_status(s, 1, want, arts, NOW)
    assert types(s) == {"Ready": "True"}  # abnormal-true conditions disappear
    s = cs.compute_status(s, 2, cs.desired(["nginx", "Bad/Name"]), arts, NOW)
    assert types(s) == {"Ready": "False", "Stalled": "True"}
    s = cs.compute_status(s, 3, cs.desired([]), {}, NOW, render_error="registry down", render_temporary=True)
    assert types(s) == {"Ready": "False", "Reconciling": "True"}
    s = cs.compute_status(s, 3, cs.desired([]), {}, NOW, render_error="chart not found")
    assert types(s) == {"Ready": "False", "Stalled": "True"}
