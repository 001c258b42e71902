"""`cluster-registry preload` against the local control plane: values, a list and a chart's images
loaded for real by the artifact reconciler (run as a local process), a timeout report, and a chart's
images (init containers, CronJobs, values files) through `helm template`."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_registry import reference
from tests.support.cluster import ROOT, Cluster
from tests.support.ociimages import Pusher, push_image


@pytest.fixture(scope="module", autouse=True)
def crds(cluster: Cluster) -> None:
    """The chart's Artifact and Component CRDs, when no one installed them yet (rendered by helm)."""
    names = ("artifacts.clusterregistry.io", "components.clusterregistry.io")
    if all(cluster.kubectl("get", "crd", n, check=False).strip() for n in names):
        return
    rendered = cluster.helm(
        "template", "cluster-registry", str(ROOT / "chart"), "--kube-version", "1.35.0",
        "--show-only", "templates/crds/artifacts.yaml", "--show-only", "templates/crds/components.yaml",
    )
    cluster.kubectl("apply", "--server-side", "--field-manager=e2e-preload", "-f", "-", stdin=rendered)
    for n in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{n}", "--timeout=60s")


def cli(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cluster_registry", *args, "--kubeconfig", str(cluster.kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def reconciler(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The artifact reconciler, as its Deployment would run it, watching only the test namespace."""
    log = open(tmp_path / "reconciler.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cluster_registry", "reconcile", "artifacts",
            "--kubeconfig", str(cluster.kubeconfig), "--watch-namespace", namespace, "--no-leader-election",
            "--registry-host", cluster.cluster_registry, "--registry-insecure",
            "--insecure-registry", cluster.artifact_store, "--http-listen", f"127.0.0.1:{free_port()}",
        ],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def pull_secret(cluster: Cluster, namespace: str) -> str:
    auth = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
    config = json.dumps({"auths": {cluster.artifact_store: {"auth": auth}}})
    cluster.apply(
        {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "store"},
            "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
        },
        namespace,
    )
    return "store"


def test_preload_a_list(cluster: Cluster, namespace: str, reconciler: subprocess.Popen[bytes], tmp_path: Path) -> None:
    store = Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))
    repo = f"preload/{namespace}"
    one = push_image(store, repo, "one", layers=[32 * 1024], seed=11)
    two = push_image(store, repo, "two", layers=[16 * 1024, 1024], seed=12)
    three = push_image(store, repo, "three", layers=[8 * 1024], seed=13)
    secret = pull_secret(cluster, namespace)
    chart = tmp_path / "cnf"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: cnf\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text(f"image: {cluster.artifact_store}/{repo}:three\n")
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cnf}\nspec:\n  selector: {matchLabels: {a: b}}\n"
        "  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: app, image: '{{ .Values.image }}'}]\n"
    )
    values = tmp_path / "values.yaml"
    values.write_text(
        "global:\n  networkfunctionextension:\n    earlyLoading:\n"
        f"      images: ['{cluster.artifact_store}/{repo}:one']\n      timeout: 2m\n"
    )
    proc = cli(cluster, "preload", "--values", str(values), "--image", f"{cluster.artifact_store}/{repo}:two",
               "--chart", str(chart), "--helm", str(ROOT / ".cache" / "bin" / "helm"),
               "--namespace", namespace, "--pull-secret", secret, "--poll", "0.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "reconciler.log").read_text()
    assert proc.stdout.strip().splitlines()[-1].startswith("preload: 3 of 3 images Ready")
    progress = [ln for ln in proc.stderr.splitlines() if "of 3 images Ready" in ln]
    assert progress and "3 of 3 images Ready" in progress[-1]  # progress is logged as it changes, ending complete

    artifacts = cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", namespace)["items"]
    by_source = {a["spec"]["sourceArtifact"]: a for a in artifacts}
    for image in (one, two, three):
        source = f"{cluster.artifact_store}/{repo}:{image.tag}"
        art = by_source[source]
        assert art["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cluster-registry"
        assert art["metadata"]["name"] == reference.artifact_name(source)
        assert art["status"]["phase"] == "Ready" and art["status"]["digest"] == image.digest
        # The copy is really in the cluster registry, byte for byte.
        local = Pusher(cluster.cluster_registry).get_manifest(reference.local_repository(reference.parse(source)), image.digest)
        assert local is not None and local[0] == image.manifest


def test_preload_timeout_lists_what_is_not_ready(cluster: Cluster, namespace: str) -> None:
    missing = f"{cluster.artifact_store}/preload/never:1"
    proc = cli(cluster, "preload", "--image", missing, "--namespace", namespace, "--timeout", "3s", "--poll", "0.5")
    assert proc.returncode == 1
    assert "preload: timed out after 3s: 0 of 1 images Ready" in proc.stderr
    # Pending when no reconciler watches this namespace; another test's chart install may run one that
    # already tried (Copying/Failed): either way the image is listed with its phase and why.
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("NOT READY"))
    assert line.startswith(f"NOT READY {missing} (Artifact {namespace}/{reference.artifact_name(missing)}, from --image): ")
    assert line.split("): ", 1)[1].split(":")[0] in ("Pending", "Copying", "Failed", "Deferred")


def test_preload_a_chart_dry_run(cluster: Cluster, tmp_path: Path, namespace: str) -> None:
    chart = tmp_path / "cnf"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: cnf\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("tag: '1.0'\n")
    (chart / "templates" / "workloads.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cnf}\nspec:\n  selector: {matchLabels: {a: b}}\n"
        "  template:\n    metadata: {labels: {a: b}}\n    spec:\n"
        "      initContainers: [{name: init, image: 'myacr.azurecr.io/cnf/init:{{ .Values.tag }}'}]\n"
        "      containers: [{name: app, image: 'myacr.azurecr.io/cnf/app:{{ .Values.tag }}'}]\n"
        "---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: job}\nspec:\n  schedule: '@daily'\n"
        "  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n"
        "          containers: [{name: j, image: busybox}]\n"
    )
    override = tmp_path / "override.yaml"
    override.write_text("tag: '2.0'\n")
    proc = cli(cluster, "preload", "--chart", str(chart), "--chart-values", str(override), "--namespace", namespace,
               "--helm", str(ROOT / ".cache" / "bin" / "helm"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(" as ")[0] for ln in lines] == [
        "would preload myacr.azurecr.io/cnf/init:2.0",
        "would preload myacr.azurecr.io/cnf/app:2.0",
        "would preload docker.io/library/busybox:latest",
    ]
    assert not cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", namespace)["items"]  # dry run: nothing created
