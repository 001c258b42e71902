"""Side loading into the local cluster's registry: images from an OCI layout land where the webhook
rewrites to, and their Artifacts are created Ready through the status subresource."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster_registry import reference
from tests.e2e.test_preload import crds  # noqa: F401 (module fixture: the CRDs)
from tests.support.cluster import ROOT, Cluster
from tests.support.ociimages import Pusher, push_image


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cluster_registry", *args]
    env = cluster.env()
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_sideload_creates_ready_artifacts(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    store = Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))
    repo = f"sideload/{namespace}"
    image = push_image(store, repo, "1.0", layers=[16 * 1024], seed=21)
    creds = tmp_path / "creds.yaml"
    creds.write_text(f"username: {cluster.artifact_store_user}\npassword: {cluster.artifact_store_password}\n")
    drive = tmp_path / "drive"
    exported = cli(cluster, "export", f"{cluster.artifact_store}/{repo}:1.0", "-o", str(drive / "layout"),
                   "--insecure-registry", cluster.artifact_store, "--credentials-file", str(creds), "--as-host", "myacr.azurecr.io")
    assert exported.returncode == 0, exported.stderr

    proc = cli(cluster, "sideload", str(drive), "--registry-host", cluster.cluster_registry, "--registry-insecure",
               "--namespace", namespace, "--kubeconfig", str(cluster.kubeconfig))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    source = f"myacr.azurecr.io/{repo}:1.0"
    art = cluster.kubectl_json("get", f"artifacts.clusterregistry.io/{reference.artifact_name(source)}", "-n", namespace)
    assert art["spec"]["sourceArtifact"] == source
    assert art["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cluster-registry"
    status = art["status"]
    assert status["phase"] == "Ready" and status["digest"] == image.digest
    assert status["localArtifact"] == f"{cluster.cluster_registry}/myacr.azurecr.io/{repo}:1.0@{image.digest}"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Ready" and c["status"] == "True"] == ["Sideloaded"]
    got = Pusher(cluster.cluster_registry).get_manifest(f"myacr.azurecr.io/{repo}", "1.0")
    assert got is not None and got[0] == image.manifest
