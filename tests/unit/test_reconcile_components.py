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


def test_artifact_body_owner_and_labels() -> None:
    body = cs.artifact_body(COMPONENT, "ghcr.io/a/b:1", cs.pull_secrets(COMPONENT["spec"]))
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
