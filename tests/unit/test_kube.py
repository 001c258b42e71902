"""kube.pod_namespace: the one reader of the pod's own namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_registry import kube


def test_environment_first_then_service_account_file_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "namespace"
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_NAMESPACE", sa)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert kube.pod_namespace("default") == "default"  # neither: the caller's default
    assert kube.pod_namespace() == ""
    sa.write_text("from-file\n")
    assert kube.pod_namespace("default") == "from-file"
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert kube.pod_namespace("default") == "from-env"
