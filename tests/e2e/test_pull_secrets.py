"""#15 per-namespace pull credentials against the real API server: the artifact reconciler (the real
process, its --pull-secret flags as the chart passes them in isolated mode) creates the release's keys
and the pull Secret in a namespace as soon as it has an Artifact; the rotation command rotates the keys;
every namespace's Secret is rewritten and both keys authenticate meanwhile; a real node's kubelet pulls
with the Secret the controller writes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from pathlib import Path
import sys
from typing import Any


from cluster_registry import pullcreds, reference
from cluster_registry.oci import Credentials, RegistryOptions, RegistrySession, copy_image
from cluster_registry.reconcile import pullsecrets as ps
from tests.support import cnf
from tests.support.cluster import Cluster, wait_for
from tests.support.registry import run_registry

NAME, HOST = "cluster-registry-pull", "127.0.0.1:5050"


def credential(secret: dict[str, Any]) -> tuple[str, str]:
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    entry = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"][HOST]
    return entry["username"], entry["password"]


def keys(cluster: Cluster, namespace: str, name: str) -> list[bytes]:
    got = ps.keys_of(cluster.kubectl_json("get", "secret", name, "-n", namespace))
    assert got is not None
    return list(got)


def secret_in(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", "secret", NAME, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def cli(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", *args, "--kubeconfig", str(cluster.kubeconfig)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})  # fmt: skip


def test_the_reconciler_keeps_a_pull_secret_in_each_tenant_namespace_across_a_rotation(
    cluster: Cluster, namespace: str
) -> None:
    release, tenant = namespace, f"{namespace}-t"  # the release's keys in one, an Artifact in the other
    keys_name = "e2e-pull-keys"
    cluster.kubectl("create", "namespace", tenant)
    proc = None
    try:
        cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                       "metadata": {"name": "app", "namespace": tenant},
                       "spec": {"sourceArtifact": f"{cluster.artifact_store}/e2e/none:1"}})  # fmt: skip
        # only the tenant namespace is watched: other tests' Artifacts are not this process's business
        proc = cli(cluster, "reconcile", "artifacts", "--registry-host", cluster.cluster_registry, "--registry-insecure",
                   "--no-leader-election", "--http-listen", "127.0.0.1:0", "--namespace", release,
                   "--watch-namespace", tenant, "--pull-secret", NAME, "--pull-secret-host", HOST, "--pull-keys", keys_name)
        first = wait_for(lambda: secret_in(cluster, tenant), timeout=60, what="the tenant's pull Secret")
        user, password = credential(first)
        assert user == f"ns/{tenant}" and pullcreds.verify(keys(cluster, release, keys_name), user, password) == tenant
        assert first["metadata"]["labels"][ps.LABEL_MANAGED] == "true"
    finally:
        if proc is not None:
            proc.terminate()
            out = proc.communicate(timeout=30)[0].decode()
            assert "Traceback" not in out, out

    # the rotation command (the CronJob's), then a controller pass: a second namespace joins meanwhile
    other = f"{namespace}-u"
    cluster.kubectl("create", "namespace", other)
    try:
        before = keys(cluster, release, keys_name)
        rot = cli(cluster, "reconcile", "rotate-pull-keys", "--namespace", release, "--pull-keys", keys_name)
        assert rot.wait(60) == 0, rot.communicate()[0].decode()
        after = keys(cluster, release, keys_name)
        assert after[1] == before[0] and after[0] not in before
        assert pullcreds.verify(after, user, password) == tenant  # the not-yet-rewritten Secret still works
        controller = ps.PullSecrets(ps.KubeSecrets(cluster.core()), release, keys_name, NAME, HOST)
        controller.add(tenant)
        controller.add(other)
        assert controller.sync() == 2  # rewrites the tenant's, creates the other's
        for ns in (tenant, other):
            got = secret_in(cluster, ns)
            assert got is not None
            u, p = credential(got)
            assert pullcreds.verify(after, u, p) == ns and p != password
        assert controller.sync() == 0
    finally:
        for ns in (tenant, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_a_real_kubelet_pulls_with_the_namespaces_pull_secret(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """The Secret the controller writes (user ns/<namespace>, dockerconfigjson for the rewrite host) is
    what a real node's kubelet and containerd authenticate with: a registry accepting only that
    credential serves the pod that names the Secret and refuses the pod that does not."""
    api = ps.KubeSecrets(cluster.core())
    current, _ = ps.ensure_keys(api, namespace, "e2e-pull-keys", {})
    user, password = pullcreds.username(namespace), pullcreds.password(current, namespace)
    with run_registry(tmp_path / "tenant-registry", htpasswd=(user, password)) as reg:
        image = f"{reg.host}/tenant/pause:3.10"

        async def push() -> str:
            async with RegistrySession(RegistryOptions(insecure_hosts=frozenset({reg.host, cluster.cluster_registry}))) as s:
                got = await copy_image(reference.parse(f"{cluster.cluster_registry}/localcluster/pause:3.10"), reference.parse(image),
                                       session=s, dst_auth=Credentials(username=user, password=password))
                return got.digest

        digest = asyncio.run(push())
        # the nodes live in their own network namespaces: nodenet forwards their 127.0.0.1:PORT to ours
        cluster.apply({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "tenant-registry", "annotations": {cnf.FORWARD_ANNOTATION: reg.host}},
                       "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]}},
                      namespace)  # fmt: skip
        controller = ps.PullSecrets(api, namespace, "e2e-pull-keys", NAME, reg.host)
        controller.add(namespace)
        assert controller.sync() == 1
        system = {"kubernetes.azure.com/mode": "system"}
        for name, secrets in (("with", [{"name": NAME}]), ("without", [])):
            cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                           "spec": {"nodeSelector": system, "terminationGracePeriodSeconds": 0, "imagePullSecrets": secrets,
                                    "containers": [{"name": "c", "image": f"{image}@{digest}", "imagePullPolicy": "Always"}]}},
                          namespace)  # fmt: skip

        def state(name: str) -> dict[str, Any]:
            got = cluster.kubectl_json("get", "pod", name, "-n", namespace)["status"].get("containerStatuses") or [{}]
            return dict(got[0].get("state") or {})

        wait_for(lambda: "running" in state("with"), timeout=120, what="the pod with the pull Secret running")
        wait_for(lambda: state("without").get("waiting", {}).get("reason") in ("ErrImagePull", "ImagePullBackOff"),
                 timeout=120, what="the pod without it refused")
        for name in ("with", "without"):
            cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
