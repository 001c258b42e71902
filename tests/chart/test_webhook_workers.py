"""The webhook Deployment runs one serving process per CPU of its limit (#20)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.chartlib import render


def webhook_container(*sets: str) -> dict[str, Any]:
    (deployment,) = [d for d in render(*sets) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-webhook")]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "webhook"]
    return container


@pytest.mark.parametrize("limit", [None, "2", "1500m"])
def test_worker_count_follows_the_cpu_limit(limit: str | None) -> None:
    sets = (f"webhook.resources.limits.cpu={limit}",) if limit else ()
    container = webhook_container(*sets)
    env = {e["name"]: e for e in container["env"]}
    # the kubelet resolves it: the limit rounded up to whole CPUs (500m: 1, 1500m: 2), or the node's CPUs without one
    assert env["CLUSTER_REGISTRY_WEBHOOK_WORKERS"]["valueFrom"] == {
        "resourceFieldRef": {"containerName": "webhook", "resource": "limits.cpu", "divisor": "1"}
    }
    assert "--workers" not in container["args"]  # nothing on the command line overrides it
    if limit:
        assert str(container["resources"]["limits"]["cpu"]) == limit
