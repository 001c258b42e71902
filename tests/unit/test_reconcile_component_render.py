"""The component reconciler when its chart cannot be rendered: the Artifacts it already made stay,
the status says why (``ChartRenderFailed``; ``Stalled`` for a permanent failure, ``Reconciling``
while retrying a temporary one), and helm runs again only at the backoff time."""

from __future__ import annotations

import copy
from typing import Any

from cluster_registry import reference
from cluster_registry.errors import PermanentError, TemporaryError
from cluster_registry.reconcile import status as st
from cluster_registry.reconcile.components import ComponentReconciler, Config
from cluster_registry.reconcile.metrics import component_metrics
from tests.unit.test_reconcile_components import FIXTURE, NOW, FakeKube

POLICY = Config().policy


def conditions(kube: FakeKube) -> dict[str, tuple[str, str]]:
    status = kube.objs[("components", "t/cnf")]["status"]
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def artifacts(kube: FakeKube) -> set[str]:
    return {k[1] for k in kube.objs if k[0] == "artifacts"}


async def test_a_failed_render_keeps_the_artifacts_says_why_and_retries_at_the_backoff_time() -> None:
    kube = FakeKube()
    now = [NOW]
    outcomes: list[BaseException | None] = [None]  # what the next renders do (None: render the fixture)
    renders: list[float] = []

    async def render(comp: dict[str, Any], configs: list[bytes]) -> str:
        renders.append(now[0])
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        return FIXTURE.read_text()

    r = ComponentReconciler(kube, Config(), component_metrics(), render=render, rand=lambda: 0.5,  # type: ignore[arg-type]
                            clock=lambda: now[0])  # fmt: skip
    comp = kube.create("components", "t", {"metadata": {"name": "cnf", "namespace": "t", "uid": "c1", "generation": 1},
                                           "spec": {"images": ["example.com/cnf/extra:9"],
                                                    "chart": {"ref": "oci://example.com/charts/cnf", "version": "1.0.0"}}})  # fmt: skip
    r.on_component("ADDED", comp)
    assert await r.reconcile("t/cnf") is None
    made = artifacts(kube)
    assert len(made) == 7  # 6 from the chart + 1 listed
    for key in made:  # the reconciler's cache follows the API server, as its informer would
        r.on_artifact("ADDED", copy.deepcopy(kube.objs[("artifacts", key)]))

    # The chart moves to a version that does not exist: a permanent failure.
    comp = copy.deepcopy(kube.objs[("components", "t/cnf")])
    comp["spec"]["chart"]["version"] = "9.9.9"
    comp["metadata"]["generation"] = 2
    kube.objs[("components", "t/cnf")] = copy.deepcopy(comp)
    outcomes[:] = [PermanentError("helm template oci://example.com/charts/cnf:9.9.9: not found")]
    r.on_component("MODIFIED", comp)
    retry_at = await r.reconcile("t/cnf")
    assert artifacts(kube) == made and not [c for c in kube.calls if c.startswith("delete")], \
        "a render failure must never drop Artifacts"
    assert conditions(kube) == {"Ready": ("False", "ChartRenderFailed"), "Stalled": ("True", "ChartRenderFailed")}
    message = next(c["message"] for c in kube.objs[("components", "t/cnf")]["status"]["conditions"] if c["type"] == "Ready")
    assert "9.9.9: not found" in message
    assert retry_at == NOW + st.backoff_delay(1, False, 0.5, POLICY) == NOW + POLICY.permanent_base

    # Events before the backoff time (an Artifact changes, our own status write comes back) render nothing.
    now[0] = NOW + POLICY.permanent_base - 1
    r.on_component("MODIFIED", copy.deepcopy(kube.objs[("components", "t/cnf")]))
    assert await r.reconcile("t/cnf") == retry_at
    assert len(renders) == 2
    assert conditions(kube)["Stalled"] == ("True", "ChartRenderFailed"), "still stalled, not retrying"

    # At the backoff time helm runs again; now the registry is away: temporary, retrying, not stalled.
    now[0] = retry_at
    outcomes[:] = [TemporaryError("helm template oci://example.com/charts/cnf:9.9.9: connection refused")]
    second = await r.reconcile("t/cnf")
    assert len(renders) == 3 and artifacts(kube) == made
    assert conditions(kube) == {"Ready": ("False", "ChartRenderFailed"), "Reconciling": ("True", "ChartRenderFailed")}
    assert second == retry_at + st.backoff_delay(2, True, 0.5, POLICY) == retry_at + 2 * POLICY.base

    # It renders again: Ready once its Artifacts are, and the backoff starts over.
    now[0] = second
    assert await r.reconcile("t/cnf") is None
    assert len(renders) == 4 and artifacts(kube) == made and r.attempts.get("t/cnf") is None
    for key in made:
        art = kube.objs[("artifacts", key)]
        art["status"] = dict(st.next_status({}, 1, st.Copied("r/x", "sha256:" + "1" * 64, 1), now[0]))
        r.on_artifact("MODIFIED", copy.deepcopy(art))
    await r.reconcile("t/cnf")
    assert conditions(kube) == {"Ready": ("True", "AllReady")}
    assert reference.artifact_name("example.com/cnf/extra:9") in {k.split("/", 1)[1] for k in made}
