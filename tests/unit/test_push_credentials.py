"""The artifact reconciler re-reads its push credential on each use, so a rotated Secret needs no restart."""

from __future__ import annotations

import json
from pathlib import Path

from cluster_registry.oci import Credentials
from cluster_registry.reconcile.artifacts import ArtifactReconciler, Config
from cluster_registry.reconcile.metrics import artifact_metrics


def test_a_rotated_credential_file_is_used_at_once_and_a_broken_one_keeps_the_last(tmp_path: Path) -> None:
    f = tmp_path / "credentials.yaml"
    f.write_text(json.dumps({"username": "artifact-reconciler", "password": "old"}))
    first = Credentials("artifact-reconciler", "old")
    r = ArtifactReconciler(None, Config(registry_host="r:5000", registry_credentials=first,  # type: ignore[arg-type]
                                        registry_credentials_file=str(f)), artifact_metrics())
    assert r.push_credentials() == first
    f.write_text(json.dumps({"username": "artifact-reconciler", "password": "new"}))  # the kubelet refreshed the Secret
    assert r.push_credentials() == Credentials("artifact-reconciler", "new")
    f.write_text("not: [a credential")
    assert r.push_credentials() == Credentials("artifact-reconciler", "new"), "the last good one"
    fixed = ArtifactReconciler(None, Config(registry_host="r:5000", registry_credentials=first), artifact_metrics())  # type: ignore[arg-type]
    assert fixed.push_credentials() == first, "no file: the credential given at start"
