"""`helm install --wait` of chart/ into the local cluster: the hooks run, every pod is Running and
Ready on the system nodes (real kubelets run the project's images), the HA Deployments
spread over the 3 system nodes, the API server calls the webhook through the chart's own TLS chain
(certs hook Secret, caBundle patched after install), and an upgrade keeps the HPA's replica count.

The webhook's matchConditions scope it to one namespace of this test (with failurePolicy Fail, so a
broken TLS chain fails the test instead of being ignored); other tests' pods never reach it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import (
    CRDS, Cluster, CommandError, adopt_crds, component_pods, exclusive_chart, pod_ready, three_ready, wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"


@pytest.fixture
def short_namespace(cluster: Cluster) -> Iterator[str]:
    """A short release namespace: `cluster-registry certs` puts `<service>.<namespace>.svc` in the
    certificate's CN, which X.509 caps at 64 characters (reported; the shared fixture's names are longer)."""
    name = f"crc-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def release(cluster: Cluster, short_namespace: str) -> Iterator[str]:
    name = f"cr-{secrets.token_hex(3)}"
    with exclusive_chart():  # one release at a time: each one's node proxy takes 127.0.0.1:5050 on every node
        yield name
        cluster.helm("uninstall", name, "-n", short_namespace, "--wait", "--timeout", "120s", check=False)


def test_chart_installs_with_pods_running_spread_over_system_nodes(cluster: Cluster, short_namespace: str, release: str,
                                                                   tmp_path: Path) -> None:
    namespace = short_namespace
    workload = f"{namespace}-wl"
    scope = f"request.namespace == '{workload}'"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"global": {"networkfunctionextension": {
        "webhook": {"pod": {"mutation": {"matchConditionExpression": scope}}, "failurePolicy": "Fail",
                    "rewritePolicy": "Always"},
        "clusterRegistry": {"storageSize": "1Gi"},
    }}}))
    adopt_crds(cluster, release, namespace)
    cluster.helm("install", release, str(CHART), "-n", namespace, "-f", str(values),
                 "--wait", "--wait-for-jobs", "--timeout", "300s", timeout=420)

    status = json.loads(cluster.helm("status", release, "-n", namespace, "-o", "json"))
    assert status["info"]["status"] == "deployed"
    hooks = {h["name"].removeprefix(f"{release}-cluster-registry-"): h for h in status.get("hooks", [])}
    for job in ("validate", "registry-secret", "certs-issue", "certs-cabundle"):
        assert hooks[job]["last_run"]["phase"] == "Succeeded", (job, hooks[job]["last_run"])
    # Hook RBAC is gone after the hooks succeeded; no hook Job is left behind.
    assert not cluster.kubectl("get", "serviceaccount", "-n", namespace, "-l", "app.kubernetes.io/component=hooks",
                               "-o", "name").strip()
    assert not cluster.kubectl("get", "jobs", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "name").strip()

    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in cluster.kubectl_json("get", "nodes")["items"]}
    system = {name for name, labels in nodes.items() if labels.get("kubernetes.azure.com/mode") == "system"}
    assert len(system) == 3

    # 3 Ready replicas of each HA Deployment (rendered at the HPA's minimum), one per system node.
    for component in ("registry", "webhook"):
        spread = three_ready(cluster, namespace, component, timeout=180)
        placed = {p["spec"]["nodeName"] for p in spread}
        assert placed == system, f"{component} pods on {placed}, want one on each system node {system}"
    for component in ("artifact-reconciler", "component-reconciler"):
        (pod,) = wait_for(lambda c=component: [p for p in component_pods(cluster, namespace, c) if pod_ready(p)],
                          timeout=120, what=f"{component} Ready")
        assert pod["spec"]["nodeName"] in system

    pvc = cluster.kubectl_json("get", "pvc", "-n", namespace, f"{release}-cluster-registry-registry")
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, name in (("pdb", "registry"), ("pdb", "webhook"), ("hpa", "registry"), ("hpa", "webhook"),
                       ("cronjob", "gc"), ("cronjob", "certs"), ("service", "registry"), ("service", "webhook")):
        cluster.kubectl("get", kind, "-n", namespace, f"{release}-cluster-registry-{name}")
    webhook = cluster.kubectl_json("get", "mutatingwebhookconfiguration", f"{release}-cluster-registry-webhook")
    assert webhook["webhooks"][0]["matchConditions"][0]["expression"] == scope
    assert webhook["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system", namespace]
    assert webhook["webhooks"][0]["clientConfig"].get("caBundle"), "the post-install certs Job patched the caBundle"

    # The API server calls the webhook over the chart's TLS (failurePolicy Fail): a dry-run pod comes back rewritten.
    cluster.kubectl("create", "namespace", workload)
    try:
        pod = json.loads(wait_for(lambda: cluster.kubectl(
            "run", "nginx", "-n", workload, "--image=docker.io/library/nginx:1.27", "--restart=Never",
            "--dry-run=server", "-o", "json"), timeout=60, interval=2, what="the webhook to answer"))
        host = "127.0.0.1:5050"  # the default rewrite target: the node proxy (docs/pull-path.md)
        assert pod["spec"]["containers"][0]["image"] == f"{host}/docker.io/library/nginx:1.27"
        # isolated access (the default): with the namespace's pull Secret, which nodes pull with
        assert pod["spec"]["imagePullSecrets"] == [{"name": "cluster-registry-pull"}], pod["spec"]
    finally:
        cluster.kubectl("delete", "namespace", workload, "--wait=false", check=False)
    printed = cluster.kubectl("get", "crd", "artifacts.clusterregistry.io", "-o",
                              "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}")
    assert printed.split()[:5] == ["Source", "Phase", "Digest", "Size", "Local"]

    # An Artifact the API server accepts under the installed CRD, listed by its source.
    cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                   "metadata": {"name": "e2e-chart-nginx", "namespace": namespace},
                   "spec": {"sourceArtifact": "docker.io/library/nginx:latest"}})
    sources = cluster.kubectl("get", "artifacts", "-A", "-o", "jsonpath={range .items[*]}{.spec.sourceArtifact}{'\\n'}{end}")
    assert "docker.io/library/nginx:latest" in sources.splitlines()  # (other tests' webhooks may add more)
    with pytest.raises(CommandError, match="sourceArtifact"):
        cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                       "metadata": {"name": "e2e-chart-bad", "namespace": namespace}, "spec": {"pullSecrets": []}})

    # Upgrade: pre-upgrade hooks re-run, the registry rolls to the new size, and the HPA keeps 3.
    cluster.helm("upgrade", release, str(CHART), "-n", namespace, "-f", str(values),
                 "--set", "global.networkfunctionextension.clusterRegistry.registryService.scale=small",
                 "--wait", "--timeout", "300s", timeout=420)
    deployment = cluster.kubectl_json("get", "deployment", "-n", namespace, f"{release}-cluster-registry-registry")
    assert deployment["spec"]["replicas"] == 3, "an upgrade must not reset what the HPA scaled to"
    registry = deployment["spec"]["template"]["spec"]["containers"][0]
    assert registry["resources"]["requests"] == {"cpu": "100m", "memory": "250Mi"}
    wait_for(lambda: (lambda ps: len(ps) == 3 and all(map(pod_ready, ps)) and all(
        p["spec"]["containers"][0]["resources"]["requests"]["memory"] == "250Mi" for p in ps))(
        component_pods(cluster, namespace, "registry")),
        timeout=180, interval=2, what="registry rolled to scale=small")

    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    for crd in CRDS:  # helm.sh/resource-policy: keep
        assert cluster.kubectl("get", "crd", crd, "-o", "name").strip()
    assert not cluster.kubectl("get", "clusterrole", "-o", "name", "-l", f"app.kubernetes.io/instance={release}").strip()


def test_registry_secret_hook_script_creates_once_and_never_rewrites(cluster: Cluster, namespace: str) -> None:
    """`cluster-registry registry-secret`, run as the pre-install hook runs it (kwok runs no containers)."""
    import base64
    import subprocess
    import sys

    import jwt

    env = dict(cluster.env(), POD_NAMESPACE=namespace)
    labels = json.dumps({"app.kubernetes.io/component": "registry"})
    names = ["reg", "reg-token", "reg-push-gc", "reg-push-sideload"]

    def run() -> dict[str, Any]:
        argv = [sys.executable, "-m", "cluster_registry", "registry-secret", "reg", "--token-secret", "reg-token",
                "--push-secret", "gc=reg-push-gc", "--push-secret", "sideload=reg-push-sideload", "--labels", labels]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def read(name: str) -> tuple[dict[str, Any], dict[str, str]]:
        secret = cluster.kubectl_json("get", "secret", "-n", namespace, name)
        return secret, {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    assert run() == {"secrets": {f"{namespace}/{n}": True for n in names}}
    first, data = read("reg")
    assert first["metadata"]["labels"] == {"app.kubernetes.io/component": "registry"}
    assert len(data["http-secret"]) == 64
    _, token = read("reg-token")
    # the signing key and the public key distribution trusts belong together (kid = its thumbprint)
    signed = jwt.encode({"sub": "x"}, token["key.pem"], algorithm="ES256")
    key = jwt.PyJWKSet.from_json(token["jwks.json"]).keys[0]
    assert jwt.decode(signed, key.key, algorithms=["ES256"])["sub"] == "x" and "PRIVATE" not in token["jwks.json"]
    for component in ("gc", "sideload"):
        credentials = yaml.safe_load(read(f"reg-push-{component}")[1]["credentials.yaml"])
        assert credentials["username"] == component and len(credentials["password"]) >= 32
    assert yaml.safe_load(read("reg-push-gc")[1]["credentials.yaml"]) != yaml.safe_load(
        read("reg-push-sideload")[1]["credentials.yaml"]), "each component its own credential"
    before = {n: read(n)[0] for n in names}
    assert run() == {"secrets": {f"{namespace}/{n}": False for n in names}}
    for n in names:
        again = read(n)[0]
        assert again["data"] == before[n]["data"] and again["metadata"]["resourceVersion"] == before[n]["metadata"]["resourceVersion"]
