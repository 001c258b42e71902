"""``spec.suspend`` (the Component field added in chart 0.2.0): a suspended Component is left alone."""

from __future__ import annotations

import copy
from typing import Any

from cluster_registry.reconcile.components import ComponentReconciler, Config
from cluster_registry.reconcile.metrics import component_metrics
from tests.unit.test_reconcile_components import NOW, FakeKube


async def test_a_suspended_component_is_left_alone_until_resumed() -> None:
    kube = FakeKube()
    renders: list[str] = []

    async def render(comp: dict[str, Any], configs: list[bytes]) -> str:
        renders.append(comp["metadata"]["name"])
        return ""

    r = ComponentReconciler(kube, Config(), component_metrics(), render=render, clock=lambda: NOW)  # type: ignore[arg-type]
    comp = kube.create("components", "t", {"metadata": {"name": "cnf", "namespace": "t", "uid": "c1", "generation": 1},
                                           "spec": {"images": ["example.com/cnf/a:1"], "suspend": True,
                                                    "chart": {"ref": "oci://example.com/charts/cnf"}}})  # fmt: skip
    r.on_component("ADDED", comp)
    assert await r.reconcile("t/cnf") is None
    assert kube.calls == ["create cnf"] and renders == [], "suspended: no render, no Artifact, no status"

    resumed = copy.deepcopy(comp)
    resumed["spec"]["suspend"] = False
    resumed["metadata"]["generation"] = 2
    kube.objs[("components", "t/cnf")] = copy.deepcopy(resumed)
    r.on_component("MODIFIED", resumed)
    await r.reconcile("t/cnf")
    assert renders == ["cnf"] and any(c.startswith("create ") and c != "create cnf" for c in kube.calls)
    assert "status cnf" in kube.calls
