"""Which Artifacts the pods that exist need (webhook.pods): the pure mapping and the pod index."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster_registry.webhook.mutate import ANNOTATION_SOURCES, Mutator, Settings
from cluster_registry.webhook.pods import Intent, Owner, PodWatch, pod_intents, slim
from cluster_registry.webhook.recorder import Recorder
from cluster_registry.webhook.view import ArtifactView

LOCAL = "cr.local:5000"
MUTATOR = Mutator(Settings.build(LOCAL, exclude_namespaces=["cluster-registry"]))
RS = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "upf-7d9c", "uid": "rs-uid", "controller": True}


def pod(images: dict[str, str], *, namespace: str = "cnf", uid: str = "pod-uid", sources: dict[str, str] | None = None,
        owner: dict[str, Any] | None = RS, **meta: Any) -> dict[str, Any]:  # fmt: skip
    m: dict[str, Any] = {"name": "upf-7d9c-x", "namespace": namespace, "uid": uid, **meta}
    if sources is not None:
        m.setdefault("annotations", {})[ANNOTATION_SOURCES] = json.dumps(sources)
    if owner:
        m["ownerReferences"] = [owner]
    return {
        "metadata": m,
        "spec": {
            "serviceAccountName": "upf",
            "imagePullSecrets": [{"name": "acr-pull"}],
            "containers": [{"name": n, "image": i} for n, i in images.items()],
        },
    }


OWNER = Owner("apps/v1", "ReplicaSet", "upf-7d9c", "rs-uid")


def test_a_rewritten_pod_is_traced_to_its_sources_by_the_annotation() -> None:
    p = pod(
        {"upf": f"{LOCAL}/myacr.azurecr.io/upf:1.0", "sidecar": "nginx"},
        sources={"upf": "myacr.azurecr.io/upf:1.0", "sidecar": "docker.io/library/nginx:latest"},
    )
    assert pod_intents(p, MUTATOR, record_unannotated=False) == {
        Intent("cnf", "myacr.azurecr.io/upf:1.0", ("acr-pull",), "upf", OWNER),
        Intent("cnf", "docker.io/library/nginx:latest", ("acr-pull",), "upf", OWNER),
    }


def test_unannotated_pods_count_only_when_the_scope_is_the_namespace_exclusion() -> None:
    """Pods created before the webhook (or outside a custom matchCondition) carry no annotation."""
    p = pod({"app": "ghcr.io/acme/app:2"})
    assert pod_intents(p, MUTATOR, record_unannotated=False) == frozenset()
    assert {i.source for i in pod_intents(p, MUTATOR, record_unannotated=True)} == {"ghcr.io/acme/app:2"}


@pytest.mark.parametrize(
    "p",
    [
        pod({"app": "ghcr.io/acme/app:2"}, namespace="kube-system", sources={"app": "ghcr.io/acme/app:2"}),
        pod({"app": "ghcr.io/acme/app:2"}, namespace="cluster-registry", sources={"app": "ghcr.io/acme/app:2"}),
        pod({"app": "ghcr.io/acme/app:2"}, labels={"clusterregistry.io/skip": "true"}),
        pod({"app": "ghcr.io/acme/app:2"}, annotations={"kubernetes.io/config.mirror": "x"}),
        pod({"app": f"{LOCAL}/ghcr.io/acme/app:2"}),  # rewritten, but no annotation says from where
    ],
    ids=["kube-system", "release-namespace", "opt-out", "mirror", "local-without-source"],
)
def test_pods_never_recorded(p: dict[str, Any]) -> None:
    assert pod_intents(p, MUTATOR, record_unannotated=True) == frozenset()


def test_an_annotated_source_goes_through_the_same_registry_lists() -> None:
    """A tenant can write the annotation itself: its sources are classified like images."""
    m = Mutator(Settings.build(LOCAL, exclude=["quay.io"]))
    p = pod({"a": "x", "b": "y"}, sources={"a": "quay.io/x/y:1", "b": f"{LOCAL}/whatever:1"})
    assert pod_intents(p, m, record_unannotated=False) == frozenset()


def test_a_bare_pod_owns_itself_by_uid() -> None:
    (intent,) = pod_intents(pod({"a": "nginx:1"}, owner=None, uid="u-1"), MUTATOR, record_unannotated=True)
    assert intent.owner == Owner("v1", "Pod", "upf-7d9c-x", "u-1")


def test_status_updates_cost_nothing_and_a_deleted_artifact_is_recorded_again() -> None:
    got: list[frozenset[Intent]] = []
    watch = PodWatch(None, MUTATOR, lambda i: got.append(frozenset(i)), record_unannotated=True)
    p = pod({"a": "nginx:1", "b": "redis:7"})
    watch.replace_all([p])
    for _ in range(5):
        watch.apply("MODIFIED", p)
    assert len(got) == 1 and {i.source for i in got[0]} == {"docker.io/library/nginx:1", "docker.io/library/redis:7"}
    watch.resubmit("cnf", "docker.io/library/redis:7")
    assert [{i.source for i in g} for g in got[1:]] == [{"docker.io/library/redis:7"}]
    watch.apply("DELETED", p)
    watch.resubmit("cnf", "docker.io/library/redis:7")  # no pod uses it any more
    assert len(got) == 2 and len(watch) == 0


def test_a_deleted_artifact_is_forgotten_by_the_recorder() -> None:
    rec = Recorder(None, ArtifactView.static([]))
    rec.kube = object()  # type: ignore[assignment]  # submit() only needs it set
    intent = Intent("cnf", "docker.io/library/nginx:1", (), "default", None)
    rec.remember([intent])
    rec.submit([intent])
    assert rec.pending == 0  # written a moment ago
    rec.forget("cnf", "docker.io/library/nginx:1")
    rec.submit([intent])
    assert rec.pending == 1


def test_a_slimmed_pod_needs_the_same_artifacts() -> None:
    """The pod watch's list keeps only what pod_intents reads (memory: a big cluster's pods in full)."""
    full = pod({"upf": f"{LOCAL}/myacr.azurecr.io/upf:1.0", "side": "nginx"}, sources={"upf": "myacr.azurecr.io/upf:1.0"},
               labels={"app": "upf"})  # fmt: skip
    full["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "x" * 10_000
    full["spec"]["containers"][0]["env"] = [{"name": f"E{i}", "value": "v" * 100} for i in range(100)]
    slimmed = slim(full)
    assert pod_intents(slimmed, MUTATOR, record_unannotated=False) == pod_intents(full, MUTATOR, record_unannotated=False)
    assert len(repr(slimmed)) < 1000 < len(repr(full))
    for meta in ({"labels": {"clusterregistry.io/skip": "true"}}, {"annotations": {"kubernetes.io/config.mirror": "m"}}):
        skipped = pod({"a": "nginx"}, **meta)
        assert pod_intents(slim(skipped), MUTATOR, record_unannotated=True) == frozenset()


def test_the_webhooks_own_pull_secret_is_not_recorded_as_a_source_credential() -> None:
    m = Mutator(Settings.build(LOCAL, pull_secret="cluster-registry-pull"))
    p = pod({"a": f"{LOCAL}/ghcr.io/acme/app:2"}, sources={"a": "ghcr.io/acme/app:2"})
    p["spec"]["imagePullSecrets"].append({"name": "cluster-registry-pull"})
    (intent,) = pod_intents(p, m, record_unannotated=False)
    assert intent.pull_secrets == ("acr-pull",)
