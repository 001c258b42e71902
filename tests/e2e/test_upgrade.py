"""`helm upgrade` from the last release (chart 0.1.0, packaged as tests/e2e/fixtures/cluster-registry-0.1.0.tgz
from commit 25e60ac, its pods running that commit's image) to the working tree, with data in place, then
`helm rollback` to it.

Data: Artifacts (one with the owners the webhook records for running pods) and a Component, all
copied into the registry by the installed reconcilers. After the upgrade nothing is lost: the same
objects (same uids) keep their status, the images still pull byte-exact from every registry replica
(the registry volume and its credentials Secret survive), the Component stays Ready. 0.1.0's registry
served anyone; 0.2.0 defaults to isolated access: after the upgrade the images pull with the workload
namespace's new pull Secret and no longer anonymously, a pod rewritten by 0.1.0 (no pull Secret) keeps
running untouched, and its replacement is rewritten with the pull Secret. The CRD change
between the two (Component ``spec.suspend``, new in 0.2.0; docs/upgrading.md) is exercised: refused
by 0.1.0's schema, kept by 0.2.0's, and gone again after the rollback, which keeps everything else.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import cnf
from tests.support.cluster import ROOT, Cluster, CommandError, adopt_crds, exclusive_chart, wait_for
from tests.support.ociimages import push_image

FIXTURE = ROOT / "tests" / "e2e" / "fixtures" / "cluster-registry-0.1.0.tgz"
RELEASE_REV = "25e60ac"  # the commit FIXTURE was packaged from: its image runs FIXTURE's pods
RELEASE_TAG = f"release-{RELEASE_REV}"
CHART = ROOT / "chart"
GROUP = "clusterregistry.io"


def chart_version(path: Path) -> str:
    if path.is_dir():
        return str(yaml.safe_load((path / "Chart.yaml").read_text())["version"])
    with tarfile.open(path) as t:
        f = t.extractfile("cluster-registry/Chart.yaml")
        assert f is not None
        return str(yaml.safe_load(f.read())["version"])


def release_image_sets() -> list[str]:
    """Image values for the old chart: the local cluster runs only images built here (see
    /tmp/cluster-notes.md), so the release's own code is built from RELEASE_REV (`ci/images
    push-release`) under the working tree's image names; the old chart's defaults named others."""
    subprocess.run([str(ROOT / "ci" / "images"), "push-release", RELEASE_REV, RELEASE_TAG], check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    values = yaml.safe_load((CHART / "values.yaml").read_text())["global"]["networkfunctionextension"]
    out = []
    for prefix, image in (("image", {**values["image"], "tag": RELEASE_TAG}),
                          ("clusterRegistry.image", values["clusterRegistry"]["image"])):
        out += [f"global.networkfunctionextension.{prefix}.{k}={image[k]}" for k in ("registry", "repository", "tag")
                if image.get(k)]  # fmt: skip
    return [a for s in out for a in ("--set", s)]


def deployed(cluster: Cluster, release: str, namespace: str) -> dict[str, Any]:
    status = json.loads(cluster.helm("status", release, "-n", namespace, "-o", "json"))
    assert status["info"]["status"] == "deployed", status["info"]
    return dict(status)


def chart_of(cluster: Cluster, release: str, namespace: str) -> str:
    history = json.loads(cluster.helm("history", release, "-n", namespace, "-o", "json"))
    return str(history[-1]["chart"])


def objects(cluster: Cluster, kind: str, namespace: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in cluster.kubectl_json("get", f"{kind}.{GROUP}", "-n", namespace)["items"]}


def ready(obj: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def kept(status: dict[str, Any]) -> dict[str, Any]:
    """What an upgrade must not change in an Artifact's status: a verify may refresh the times, and the
    host pods pull from may change with the chart (0.2.0 rewrites to its node proxy), not the path."""
    return {"phase": status.get("phase"), "digest": status.get("digest"), "size": status.get("size"),
            "platforms": status.get("platforms"), "path": str(status.get("localArtifact")).partition("/")[2]}  # fmt: skip


def all_ready(cluster: Cluster, namespace: str, n: int, what: str) -> dict[str, dict[str, Any]]:
    """The namespace's N Artifacts once all are Ready; on a timeout, what their status says."""
    def check() -> dict[str, dict[str, Any]] | None:
        arts = objects(cluster, "artifacts", namespace)
        return arts if len(arts) == n and all((a.get("status") or {}).get("phase") == "Ready" for a in arts.values()) else None

    try:
        return wait_for(check, timeout=240, interval=2, what=what)
    except TimeoutError as err:
        states = {n: ((a.get("status") or {}).get("phase"), (a.get("status") or {}).get("conditions"))
                  for n, a in objects(cluster, "artifacts", namespace).items()}  # fmt: skip
        raise AssertionError(f"{err}: {states}") from None


def pulls(cluster: Cluster, namespace: str, arts: dict[str, dict[str, Any]], creds: tuple[str, str] | None = None) -> None:
    """Every Artifact's image pulls (with CREDS; None: anonymously), every blob verified, from every
    registry replica, as the digest it recorded."""
    endpoints = cnf.registry_endpoints(cluster, namespace)
    assert len(endpoints) == 3, endpoints
    for a in arts.values():
        for endpoint in endpoints:
            got = cnf.pull(a["status"]["localArtifact"], endpoint, creds)
            assert got == a["status"]["digest"], (a["metadata"]["name"], endpoint)


def app_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=app")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def rewritten_app_pod(cluster: Cluster, namespace: str, store: str, replaced: str = "") -> dict[str, Any]:
    """The app's running pod rewritten off STORE (other than REPLACED, a pod uid); one admitted before
    its Artifact was Ready (WhenReady leaves it on the store) is deleted for the ReplicaSet to remake."""
    def check() -> dict[str, Any] | None:
        for p in app_pods(cluster, namespace):
            if p["metadata"]["uid"] == replaced:
                continue
            if p["spec"]["containers"][0]["image"].startswith(store + "/"):
                cluster.kubectl("delete", "pod", "-n", namespace, p["metadata"]["name"], "--wait=false")
            elif p["status"].get("phase") == "Running":
                return p
        return None

    return dict(wait_for(check, timeout=120, interval=2, what="the app's pod rewritten and running"))


def app(image: str) -> dict[str, Any]:
    """A Deployment of IMAGE on the (kwok) user nodes: the webhook rewrites its pods, nothing pulls there."""
    labels = {"app": "app"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
                     "spec": {"nodeSelector": {"kubernetes.azure.com/mode": "user"}, "imagePullSecrets": [{"name": cnf.PULL_SECRET}],
                              "containers": [{"name": "c", "image": image}]}}}}  # fmt: skip


def suspend_field(cluster: Cluster) -> bool:
    crd = cluster.kubectl_json("get", "crd", f"components.{GROUP}")
    return "suspend" in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


@pytest.mark.timeout(2400)  # three chart installs' worth (install, upgrade, rollback), after waiting for the chart lock
def test_upgrade_from_the_last_release_keeps_everything_and_rolls_back(cluster: Cluster, tmp_path: Path) -> None:
    assert chart_version(FIXTURE) == "0.1.0" and chart_version(CHART) != "0.1.0"
    release, namespace, wl = f"up{secrets.token_hex(2)}", f"crup-{secrets.token_hex(3)}", f"e2e-upgrade-wl-{secrets.token_hex(3)}"
    store = cluster.artifact_store_in_cluster or cluster.artifact_store
    # Values both charts know: the webhook scoped to the workload namespace, the store over plain
    # HTTP, the project's pods on the (real) system nodes only.
    values = {"global": {"networkfunctionextension": {
        "webhook": {"pod": {"mutation": {"matchConditionExpression": f"request.namespace == '{wl}'"}}},
        "systemPool": {"required": True},
        "clusterRegistry": {"storageSize": "1Gi"},
        "artifactReconciler": {"insecureRegistries": [store]},
    }}}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    p = cnf.store_pusher(cluster)
    images = {name: push_image(p, f"{wl}/{name}", "1.0", layers=[256 << 10, 4096], seed=7100 + n)
              for n, name in enumerate(("direct", "owned", "component"))}  # fmt: skip
    source = {name: f"{store}/{wl}/{name}:1.0" for name in images}

    with exclusive_chart():
        for ns in (namespace, wl):
            cluster.kubectl("create", "namespace", ns)
        try:
            adopt_crds(cluster, release, namespace)
            cluster.helm("install", release, str(FIXTURE), "-n", namespace, "-f", str(values_file), *release_image_sets(),
                         "--wait", "--wait-for-jobs", "--timeout", "480s", timeout=540)  # fmt: skip
            assert chart_of(cluster, release, namespace) == "cluster-registry-0.1.0"
            cnf.wait_replicas(cluster, namespace)

            # -- data in place, by the 0.1.0 release's own reconcilers and webhook
            cnf.pull_secret(cluster, wl, store)
            cnf_component = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Component", "metadata": {"name": "cnf"},
                             "spec": {"images": [source["component"]], "pullSecrets": [cnf.PULL_SECRET]}}
            cluster.apply([
                {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Artifact", "metadata": {"name": "direct"},
                 "spec": {"sourceArtifact": source["direct"], "pullSecrets": [cnf.PULL_SECRET]}},
                cnf_component,
                # as the webhook records one for running pods: their top owners in spec.owners (GC reads them)
                {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Artifact", "metadata": {"name": "owned"},
                 "spec": {"sourceArtifact": source["owned"], "pullSecrets": [cnf.PULL_SECRET],
                          "owners": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "app", "uid": "u-1"}]}},
            ], wl)  # fmt: skip
            arts = all_ready(cluster, wl, 3, "3 Ready Artifacts")
            assert {a["spec"]["sourceArtifact"] for a in arts.values()} == set(source.values())
            assert {a["status"]["digest"] for a in arts.values()} == {i.digest for i in images.values()}
            component = wait_for(lambda: (lambda c: c if ready(c) else None)(objects(cluster, "components", wl)["cnf"]),
                                 timeout=120, interval=2, what="the Component Ready")  # fmt: skip
            # a workload rewritten by 0.1.0's webhook: no pull Secret of ours (0.1.0 had none)
            cluster.apply(app(source["direct"]), wl)  # the webhook records it on Artifact "direct" (same source)
            old_pod = rewritten_app_pod(cluster, wl, store)
            assert old_pod["spec"]["imagePullSecrets"] == [{"name": cnf.PULL_SECRET}]
            pulls(cluster, namespace, arts)
            # 0.1.0's schema has no spec.suspend: the API server refuses it (kubectl validates strictly).
            assert not suspend_field(cluster)
            try:
                cluster.apply({**cnf_component, "spec": {**cnf_component["spec"], "suspend": False}}, wl)
                raise AssertionError("0.1.0's CRD accepted spec.suspend")
            except CommandError as err:
                assert "suspend" in err.stderr, err.stderr
            secret = cluster.kubectl_json("get", "secret", "-n", namespace, f"{release}-cluster-registry-registry")
            pvc = cluster.kubectl_json("get", "pvc", "-n", namespace, f"{release}-cluster-registry-registry")

            # -- upgrade to the working tree
            cluster.helm("upgrade", release, str(CHART), "-n", namespace, "-f", str(values_file),
                         "--wait", "--wait-for-jobs", "--timeout", "480s", timeout=540)  # fmt: skip
            deployed(cluster, release, namespace)
            assert chart_of(cluster, release, namespace) == f"cluster-registry-{chart_version(CHART)}"
            cnf.wait_replicas(cluster, namespace)
            assert suspend_field(cluster), "the upgrade brought the new CRD schema"
            after = all_ready(cluster, wl, 3, "the Artifacts Ready after the upgrade")
            assert {n: a["metadata"]["uid"] for n, a in after.items()} == {n: a["metadata"]["uid"] for n, a in arts.items()}
            assert {n: kept(a["status"]) for n, a in after.items()} == {n: kept(a["status"]) for n, a in arts.items()}
            again = objects(cluster, "components", wl)["cnf"]
            assert again["metadata"]["uid"] == component["metadata"]["uid"] and ready(again)
            assert cluster.kubectl_json("get", "secret", "-n", namespace, secret["metadata"]["name"])["data"] == secret["data"]
            assert cluster.kubectl_json("get", "pvc", "-n", namespace, pvc["metadata"]["name"])["metadata"]["uid"] == pvc["metadata"]["uid"]
            # isolated now: the workload namespace's pull Secret pulls, an anonymous caller does not
            creds = cnf.namespace_pull_credential(cluster, wl)
            pulls(cluster, namespace, after, creds)
            with pytest.raises(CommandError):
                cnf.inspect_raw(after["direct"]["status"]["localArtifact"], cnf.registry_endpoints(cluster, namespace)[0], None)
            # the pod 0.1.0 rewrote runs on untouched; its replacement gets the pull Secret from 0.2.0's webhook
            (still,) = app_pods(cluster, wl)
            assert still["metadata"]["uid"] == old_pod["metadata"]["uid"] and still["status"]["phase"] == "Running"
            cluster.kubectl("delete", "pod", "-n", wl, still["metadata"]["name"], "--wait=false")
            new_pod = rewritten_app_pod(cluster, wl, store, still["metadata"]["uid"])
            assert new_pod["spec"]["containers"][0]["image"].startswith("127.0.0.1:5050/"), "0.2.0: the node proxy"
            assert new_pod["spec"]["imagePullSecrets"] == [{"name": cnf.PULL_SECRET}, {"name": cnf.REGISTRY_PULL_SECRET}]
            assert after["owned"]["spec"] == arts["owned"]["spec"]
            # The 0.2.0 reconcilers work on the old data: a Component made now becomes Ready too.
            later = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Component", "metadata": {"name": "later"},
                     "spec": {"images": [source["direct"]], "pullSecrets": [cnf.PULL_SECRET]}}
            cluster.apply(later, wl)
            wait_for(lambda: ready(objects(cluster, "components", wl)["later"]), timeout=120, interval=2,
                     what="a Component made after the upgrade Ready")  # fmt: skip
            cluster.apply({**later, "spec": {**later["spec"], "suspend": True}}, wl)  # validated strictly: known now
            assert objects(cluster, "components", wl)["later"]["spec"]["suspend"] is True

            # -- roll back to 0.1.0
            cluster.helm("rollback", release, "1", "-n", namespace, "--wait", "--wait-for-jobs", "--timeout", "480s",
                         timeout=540)  # fmt: skip
            deployed(cluster, release, namespace)
            assert chart_of(cluster, release, namespace) == "cluster-registry-0.1.0"
            cnf.wait_replicas(cluster, namespace)
            assert not suspend_field(cluster), "the rollback restored 0.1.0's CRD schema"
            # The field's value is pruned from what the API server serves under the old schema.
            assert "suspend" not in objects(cluster, "components", wl)["later"]["spec"]
            # Nothing lost: the same Artifacts (0.1.0's reconciler re-verifies them, the host pods pull
            # from having changed back), the credentials, and the images in the registry's volume.
            back = objects(cluster, "artifacts", wl)
            # ("later" has an Artifact of its own now: only the ones from before the upgrade are compared)
            assert {n: (back[n]["metadata"]["uid"], back[n]["spec"]["sourceArtifact"]) for n in arts if n in back} == \
                {n: (a["metadata"]["uid"], a["spec"]["sourceArtifact"]) for n, a in arts.items()}
            assert back["owned"]["spec"]["owners"] == arts["owned"]["spec"]["owners"]
            assert set(objects(cluster, "components", wl)) == {"cnf", "later"}
            assert cluster.kubectl_json("get", "secret", "-n", namespace, secret["metadata"]["name"])["data"] == secret["data"]
            pulls(cluster, namespace, arts)
        finally:
            cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
            for ns in (wl, namespace):
                cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_fixture_is_the_chart_of_commit_25e60ac() -> None:
    """The fixture is what 0.1.0 released: its templates are those of the tagged commit, byte for byte."""
    import subprocess

    with tarfile.open(FIXTURE) as t:
        packed = {m.name.removeprefix("cluster-registry/"): t.extractfile(m).read()  # type: ignore[union-attr]
                  for m in t.getmembers() if m.isfile()}  # fmt: skip
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", "25e60ac", "chart/templates"],
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert listed
    for path in listed:
        name = path.removeprefix("chart/")
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"25e60ac:{path}"], capture_output=True, check=True).stdout
        assert packed.get(name) == blob, name
