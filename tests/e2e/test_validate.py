"""`cluster-registry validate` against the local control plane.

Most cases render the chart's hook ConfigMap and validate Job with the real `helm template` and run
the Job's exact command as a local process against the cluster (quick, one process per case). Two
cases run the real thing: `helm install` / `helm upgrade` of chart/, whose pre-install/pre-upgrade
hook Job runs `validate` on a (real) system node, refuses, and leaves the release
unchanged. Value combinations `_validate.tpl` rejects are checked through `helm install` as well.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ROOT, Cluster, CommandError

CHART = ROOT / "chart"
P = "global.networkfunctionextension."


def render_hook(cluster: Cluster, release: str, namespace: str, sets: dict[str, str]) -> tuple[str, list[str]]:
    """(values.yaml the hook ConfigMap carries, the validate Job's args)."""
    flags = [arg for k, v in sets.items() for arg in ("--set-string" if isinstance(v, str) and not v.isdigit() and v not in ("true", "false") else "--set", f"{P}{k}={v}")]
    out = cluster.helm(
        "template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.35.0", *flags,
        "--show-only", "templates/hooks/configmap.yaml", "--show-only", "templates/hooks/job-validate.yaml",
    )
    docs = [d for d in yaml.safe_load_all(out) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return config["data"]["values.yaml"], list(container["args"])


def run_validate(
    cluster: Cluster, tmp_path: Path, namespace: str, sets: dict[str, str], *extra: str, release: str = "r"
) -> subprocess.CompletedProcess[str]:
    values, args = render_hook(cluster, release, namespace, sets)
    assert args[0] == "validate"
    values_file = tmp_path / "values.yaml"
    values_file.write_text(values)
    args[args.index("--values") + 1] = str(values_file)
    args[args.index("--termination-log") + 1] = str(tmp_path / "termination-log")
    argv = [sys.executable, "-m", "cluster_registry", *args, *extra, "--namespace", namespace, "--kubeconfig", str(cluster.kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


# The local cluster's classes use a provisioner validate does not know: declare RWX as an operator would.
RWX = {"clusterRegistry.storageAccessMode": "ReadWriteMany"}


def test_good_configuration_passes(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    proc = run_validate(cluster, tmp_path, namespace, dict(RWX))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith("configuration accepted")
    assert "[ha-nodes]" not in proc.stdout  # 3 Ready system nodes


def release_webhook(cluster: Cluster, release: str) -> str:
    """A release's MutatingWebhookConfiguration (as an upgrade finds it), scoped to nothing: validate
    dry-runs an update of it (#16: the hooks may update it by name, and create none)."""
    name = f"{release}-cluster-registry-webhook"
    cluster.apply({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                   "metadata": {"name": name}, "webhooks": [{
                       "name": "pods.clusterregistry.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                       "failurePolicy": "Ignore", "clientConfig": {"url": "https://validate.clusterregistry.invalid/mutate"},
                       "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                       "matchConditions": [{"name": "none", "expression": "false"}]}]})  # fmt: skip
    return name


def test_every_problem_reported_at_once(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    release = f"r{secrets.token_hex(3)}"
    webhook = release_webhook(cluster, release)
    try:
        _every_problem(cluster, namespace, tmp_path, release, webhook)
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", webhook, "--ignore-not-found")


def _every_problem(cluster: Cluster, namespace: str, tmp_path: Path, release: str, webhook: str) -> None:
    proc = run_validate(
        cluster,
        tmp_path,
        namespace,
        {
            **RWX,
            "clusterRegistry.storageClassName": "does-not-exist",
            "clusterRegistry.clusterRegistryGCCadence": "0 0 * * 8",
            "webhook.pod.mutation.matchConditionExpression": "request.namespace ==",
            "systemPool.nodeLabel": "kubernetes.azure.com/mode=user",  # 2 user nodes stand in for a small pool
        },
        release=release,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ERROR [storage-class] storage class 'does-not-exist' does not exist (the cluster has: nexus-shared, standard)" in out
    assert "(value: global.networkfunctionextension.clusterRegistry.storageClassName)" in out
    assert "ERROR [values] '0 0 * * 8' is not a valid cron schedule: day of week field '8'" in out  # values.load checks shapes
    # The API server's own CEL error, from a server-side dry run.
    line = next(ln for ln in out.splitlines() if "[match-condition]" in ln)
    assert "the API server rejects the webhook match condition" in line and "matchConditions[0].expression" in line
    assert "Syntax error" in line or "compil" in line
    line = next(ln for ln in out.splitlines() if "[ha-nodes]" in ln)
    assert line.startswith("ERROR") and "2 of the 2 nodes with that label are." in line and "allowHighAvailabilityOnFewerNodes" in line
    assert out.strip().splitlines()[-1] == "validate: 4 problem(s), 0 warning(s): refusing this configuration"
    assert (tmp_path / "termination-log").read_text().strip().endswith("refusing this configuration")
    # The dry run changed nothing.
    got = cluster.kubectl_json("get", "mutatingwebhookconfiguration", webhook)
    assert got["webhooks"][0]["matchConditions"] == [{"name": "none", "expression": "false"}]


def test_ha_override_turns_the_node_count_into_a_warning(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    proc = run_validate(
        cluster, tmp_path, namespace,
        {**RWX, "systemPool.nodeLabel": "kubernetes.azure.com/mode=user", "validation.allowHighAvailabilityOnFewerNodes": "true"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING [ha-nodes]" in proc.stdout and "accepted: the override is set" in proc.stdout


@pytest.fixture
def rwo_class(cluster: Cluster) -> Any:
    name = f"e2e-rwo-{secrets.token_hex(3)}"
    cluster.apply({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name}, "provisioner": "rancher.io/local-path"})
    yield name
    cluster.kubectl("delete", "storageclass", name, "--wait=false", check=False)


def test_ha_on_a_read_write_once_class(cluster: Cluster, namespace: str, tmp_path: Path, rwo_class: str) -> None:
    proc = run_validate(cluster, tmp_path, namespace, {"clusterRegistry.storageClassName": rwo_class})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        f"ERROR [storage-access-mode] storage class '{rwo_class}' (provisioner rancher.io/local-path) gives only ReadWriteOnce"
        in proc.stdout
    )


def test_upgrade_that_changes_storage(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    # The registry PVC as the first install left it (the chart's name and labels for release "r").
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "r-cluster-registry-registry",
                "labels": {"app.kubernetes.io/instance": "r", "app.kubernetes.io/component": "registry"},
            },
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "standard", "resources": {"requests": {"storage": "100Gi"}}},
        },
        namespace,
    )
    same = run_validate(cluster, tmp_path, namespace, {**RWX, "clusterRegistry.storageSize": "100Gi"})
    assert same.returncode == 0, same.stdout + same.stderr  # an upgrade that keeps the storage passes

    proc = run_validate(cluster, tmp_path, namespace, {**RWX, "clusterRegistry.storageSize": "200Gi", "clusterRegistry.storageClassName": "nexus-shared"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "storageSize cannot be modified after the initial deployment: the registry volume r-cluster-registry-registry "
        "is 100Gi and the new value is 200Gi" in proc.stdout
    )
    assert "storageClassName cannot be modified after the initial deployment" in proc.stdout
    assert "uses 'standard'" in proc.stdout


@pytest.fixture(scope="module")
def chart_dir() -> Path:
    return CHART


# Hook settings that keep a refused install quick: one attempt, no CRDs (other tests own them).
HOOK_FLAGS = ("--set", f"{P}hooks.backoffLimit=0", "--set", f"{P}crds.enabled=false")


def validate_logs(cluster: Cluster, namespace: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, "-l", "app.kubernetes.io/component=validate", "--tail=-1")


def test_helm_install_refuses_early_loading_without_the_registry(cluster: Cluster, namespace: str, chart_dir: Path) -> None:
    with pytest.raises(CommandError) as err:
        cluster.helm(
            "install", "bad", str(chart_dir), "--namespace", namespace,
            "--set", f"{P}enableClusterRegistry=false", "--set", f"{P}enableEarlyLoading=true",
            "--set", f"{P}earlyLoading.images={{nginx:1.25}}",
            timeout=120,
        )
    assert "enableEarlyLoading=true needs" in str(err.value)
    assert "bad" not in cluster.helm("list", "--namespace", namespace, "--all", "--short")  # the release did not change


def test_helm_install_refused_by_the_validate_hook(cluster: Cluster, namespace: str, chart_dir: Path) -> None:
    """The pre-install hook Job runs `validate` (a real process on a system node) and refuses."""
    with pytest.raises(CommandError) as err:
        cluster.helm(
            "install", "r", str(chart_dir), "--namespace", namespace, *HOOK_FLAGS,
            "--set", f"{P}clusterRegistry.storageClassName=does-not-exist",
            "--wait", "--wait-for-jobs", "--timeout", "240s", timeout=300,
        )
    assert "pre-install" in str(err.value) and "job r-cluster-registry-validate failed" in str(err.value)
    logs = validate_logs(cluster, namespace)
    assert "ERROR [storage-class] storage class 'does-not-exist' does not exist (the cluster has: nexus-shared, standard)" in logs
    assert "validate: 1 problem(s)" in logs
    # Nothing but the hook's own objects was created.
    assert not cluster.kubectl("get", "deployments,pvc,services", "-n", namespace, "-o", "name").strip()


def test_helm_upgrade_refused_when_storage_size_changes(cluster: Cluster, namespace: str, chart_dir: Path) -> None:
    # Revision 1: the release without the registry (a quick install: hooks only).
    cluster.helm("install", "r", str(chart_dir), "--namespace", namespace, *HOOK_FLAGS,
                 "--set", f"{P}enableClusterRegistry=false", "--wait", "--wait-for-jobs", "--timeout", "240s", timeout=300)
    # The registry volume as a first install with 100Gi left it, owned by the release (Helm adopts it).
    cluster.apply(
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "r-cluster-registry-registry",
                "labels": {"app.kubernetes.io/instance": "r", "app.kubernetes.io/component": "registry", "app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "r", "meta.helm.sh/release-namespace": namespace},
            },
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "standard", "resources": {"requests": {"storage": "100Gi"}}},
        },
        namespace,
    )
    with pytest.raises(CommandError) as err:
        cluster.helm(
            "upgrade", "r", str(chart_dir), "--namespace", namespace, *HOOK_FLAGS,
            "--set", f"{P}clusterRegistry.storageSize=200Gi", "--set", f"{P}clusterRegistry.storageAccessMode=ReadWriteMany",
            "--wait", "--wait-for-jobs", "--timeout", "240s", timeout=300,
        )
    # Refused at render time (the chart looks up the live volume): the reason is in helm's own output and
    # no revision is left behind.
    assert (
        "storageSize cannot be modified after the initial deployment: the registry volume "
        "r-cluster-registry-registry is 100Gi and the new value is 200Gi" in str(err.value)
    ), err.value
    history = json.loads(cluster.helm("history", "r", "--namespace", namespace, "-o", "json"))
    assert [(h["revision"], h["status"]) for h in history] == [(1, "deployed")]
    assert not cluster.kubectl("get", "deployments", "-n", namespace, "-o", "name").strip()  # nothing of revision 2 applied
    pvc = cluster.kubectl_json("get", "pvc", "-n", namespace, "r-cluster-registry-registry")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"


def test_artifact_store_problems_are_warnings(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    creds = tmp_path / "creds.yaml"
    creds.write_text(f"username: {cluster.artifact_store_user}\npassword: wrong\n")
    stores = ["--artifact-store", cluster.artifact_store, "--insecure-registry", cluster.artifact_store, "--artifact-store", "127.0.0.1:9"]
    proc = run_validate(cluster, tmp_path, namespace, dict(RWX), *stores, "--credentials-file", str(creds))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # disconnected installs are legitimate
    assert f"WARNING [artifact-store] artifact store {cluster.artifact_store}: the credentials were rejected (HTTP 401)" in proc.stdout
    assert "WARNING [artifact-store] artifact store 127.0.0.1:9: unreachable" in proc.stdout

    creds.write_text(f"username: {cluster.artifact_store_user}\npassword: {cluster.artifact_store_password}\n")
    proc = run_validate(cluster, tmp_path, namespace, dict(RWX), *stores[:4], "--credentials-file", str(creds))
    assert proc.returncode == 0 and "[artifact-store]" not in proc.stdout, proc.stdout
