"""The Artifact recorder recovers from API errors by itself: after N failed writes (RBAC denied, API
server away) the next attempt writes the Artifact, with nothing resubmitted by anyone."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from cluster_registry import reference
from cluster_registry.webhook.recorder import Intent, Recorder
from cluster_registry.webhook.view import ArtifactView

SOURCE = "docker.io/library/nginx:latest"


class FlakyApi:
    """Artifacts in memory; the first ``failures`` creates raise ``error``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error = failures, error
        self.creates = 0
        self.artifacts: dict[tuple[str, str], dict[str, Any]] = {}

    def get_artifact(self, namespace: str, name: str) -> dict[str, Any] | None:
        got = self.artifacts.get((namespace, name))
        return copy.deepcopy(got) if got else None

    def create_artifact(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.creates += 1
        if self.creates <= self.failures:
            raise self.error
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(self.creates)
        self.artifacts[(namespace, body["metadata"]["name"])] = obj
        return obj

    def patch_artifact(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("nothing to merge into")

    def controller_of(self, namespace: str, owner: Any) -> Any:
        return None

    def service_account_secrets(self, namespace: str, name: str) -> list[str]:
        return []


@pytest.mark.parametrize("error", [
    ApiException(status=403, reason="Forbidden"),  # a ClusterRole rule taken away, then given back
    ApiException(status=503, reason="Service Unavailable"),
    ConnectionRefusedError("API server away"),
], ids=["forbidden", "unavailable", "refused"])  # fmt: skip
async def test_an_artifact_is_written_after_n_failures(error: Exception) -> None:
    api = FlakyApi(failures=3, error=error)
    rec = Recorder(api, ArtifactView.static([]), batch_interval=0.01)
    task = asyncio.create_task(rec.run())
    try:
        rec.submit([Intent("cnf", SOURCE, ("pull",), "default", None)])
        for _ in range(500):
            if api.artifacts:
                break
            await asyncio.sleep(0.01)
        assert await rec.drained(5)
    finally:
        task.cancel()
    assert api.creates == 4 and rec.stats.errors == 3 and rec.stats.creates == 1
    written = api.artifacts[("cnf", reference.artifact_name(SOURCE))]
    assert written["spec"]["sourceArtifact"] == SOURCE and written["spec"]["pullSecrets"] == ["pull"]
