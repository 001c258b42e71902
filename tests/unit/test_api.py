"""api.artifact_body: the one builder of Artifact bodies (webhook, install hooks, component reconciler)."""

from __future__ import annotations

from cluster_registry import api, reference

SOURCE = "ghcr.io/acme/app:1.0"


def test_minimal_body() -> None:
    body = api.artifact_body(SOURCE, "cnf")
    assert body == {
        "apiVersion": "clusterregistry.io/v1alpha1",
        "kind": "Artifact",
        "metadata": {
            "name": reference.artifact_name(SOURCE),
            "namespace": "cnf",
            "labels": {"app.kubernetes.io/managed-by": "cluster-registry"},
        },
        "spec": {"sourceArtifact": SOURCE},
    }


def test_pull_secrets_sorted_and_deduplicated_whatever_the_input_order() -> None:
    a = api.artifact_body(SOURCE, "cnf", pull_secrets=["zz", "aa", "zz", "mm"])
    b = api.artifact_body(SOURCE, "cnf", pull_secrets=("mm", "aa", "zz"))
    assert a == b and a["spec"]["pullSecrets"] == ["aa", "mm", "zz"]


def test_pod_owners_and_owner_references_go_to_their_own_fields() -> None:
    deploy = api.OwnerRef(apiVersion="apps/v1", kind="Deployment", name="web", uid="d-uid")
    comp = api.component_ref("cnf", "c-uid")
    body = api.artifact_body(
        SOURCE, "cnf", owners=[deploy], owner_references=[comp], labels={"x": "y"}, annotations={"a": "b"}
    )
    assert body["spec"]["owners"] == [deploy]
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Component", "name": "cnf", "uid": "c-uid"}
    ]
    assert body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "cluster-registry", "x": "y"}
    assert body["metadata"]["annotations"] == {"a": "b"}
