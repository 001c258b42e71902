"""Issue 19, render side: where the chart used to depart from what an AOSM operator expects.

Early loading with no images renders, early-loaded images are recorded in a release-owned Component,
the HA Deployments render 3 replicas with or without the autoscaler, every pod requires the system
pool by default, the validate hook never retries, the storage refusal is a `lookup` that renders
nothing under `helm template`, and GC's defaults are daily at 0%.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.chart.chartlib import CHART, RELEASE, all_of, find, pod_spec, render, workloads

PREFIX = f"{RELEASE}-cluster-registry"
SYSTEM = {"key": "kubernetes.azure.com/mode", "operator": "In", "values": ["system"]}


def args_of(doc: dict) -> list[str]:  # type: ignore[type-arg]
    return list(pod_spec(doc)["containers"][0]["args"])


def test_default_gc_is_daily_at_midnight_with_threshold_0() -> None:
    """Item 8: the seed's GC defaults reach the CronJob."""
    gc = find(render(), "CronJob", "-gc")
    assert gc["spec"]["schedule"] == "0 0 * * *"
    args = args_of(gc)
    assert args[args.index("--threshold") + 1] == "0"


def test_early_loading_switch_alone_renders_and_records_an_empty_list() -> None:
    """Item 2: `enableEarlyLoading=true` alone is valid (AOSM); the preload Job still runs, recording
    an empty list, so the images of an earlier list become collectable."""
    docs = render("enableEarlyLoading=true")
    record = find(docs, "ConfigMap", "-early-loading")
    assert yaml.safe_load(record["data"]["images.yaml"]) == []
    assert "-preload" in find(docs, "Job", "-preload")["metadata"]["name"]


def test_early_loaded_images_are_recorded_in_a_release_owned_component() -> None:
    """Item 1, render side: the preload Job records the images in the Component named like the
    release's (non-hook) early-loading ConfigMap, which owns it, and may read only that ConfigMap."""
    docs = render("enableEarlyLoading=true", "earlyLoading.images[0]=myacr.azurecr.io/nginx:1.0.0",
                  "earlyLoading.pullSecrets[0]=acr-pull")
    record = find(docs, "ConfigMap", "-early-loading")
    assert "helm.sh/hook" not in (record["metadata"].get("annotations") or {}), "the record lives with the release"
    assert yaml.safe_load(record["data"]["images.yaml"]) == ["myacr.azurecr.io/nginx:1.0.0"]
    args = args_of(find(docs, "Job", "-preload"))
    assert args[args.index("--record-component") + 1] == record["metadata"]["name"] == f"{PREFIX}-early-loading"
    assert args[args.index("--pull-secret") + 1] == "acr-pull"
    role = find(docs, "Role", "-hooks")
    configmap_rules = [r for r in role["rules"] if "configmaps" in r["resources"]]
    assert configmap_rules == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                                "resourceNames": [record["metadata"]["name"]]}]
    assert not [c for c in all_of(render(), "ConfigMap") if c["metadata"]["name"].endswith("-early-loading")]


@pytest.mark.parametrize("sets", [(), ("clusterRegistry.autoScaling.enabled=false", "webhook.autoScaling.enabled=false")],
                         ids=["autoscaling", "no-autoscaling"])
def test_ha_deployments_render_three_replicas_with_or_without_the_autoscaler(sets: tuple[str, ...]) -> None:
    """Item 3: `replicas` is never omitted with HA, so a fresh install starts 3 pods and switching the
    autoscaler on or off never drops a live Deployment to 1 (the three-way merge would remove it)."""
    docs = render(*sets)
    for component in ("registry", "webhook"):
        dep = find(docs, "Deployment", f"-{component}")
        assert dep["spec"]["replicas"] == 3, component
        hpas = [h for h in all_of(docs, "HorizontalPodAutoscaler") if h["metadata"]["name"].endswith(f"-{component}")]
        assert [h["spec"]["minReplicas"] for h in hpas] == ([] if sets else [3]), component


def test_every_pod_requires_the_system_pool_by_default() -> None:
    """Item 4: required node affinity unless systemPool.required=false (the preference stays an option)."""
    docs = render("enableEarlyLoading=true", "enableLocalRegistry=true")
    for doc in workloads(docs):
        node = pod_spec(doc)["affinity"]["nodeAffinity"]
        assert node == {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [SYSTEM]}]}}, \
            doc["metadata"]["name"]
    soft = pod_spec(find(render("systemPool.required=false"), "Deployment", "-registry"))["affinity"]["nodeAffinity"]
    assert list(soft) == ["preferredDuringSchedulingIgnoredDuringExecution"]


def test_validate_hook_fails_once_without_retries() -> None:
    """Item 6: a refusal is final; retrying only delays helm's answer."""
    job = find(render("hooks.backoffLimit=4"), "Job", "-validate")
    assert job["spec"]["backoffLimit"] == 0
    assert find(render("enableEarlyLoading=true", "hooks.backoffLimit=4"), "Job", "-preload")["spec"]["backoffLimit"] == 4


def test_storage_refusal_looks_up_the_live_volume_only_in_the_validation_template() -> None:
    """Item 6: the render-time refusal reads the release's PVC with `lookup` (empty under `helm
    template`, so GitOps renders are unaffected: the same size renders and so does another one)."""
    pvc = find(render("clusterRegistry.storageSize=200Gi"), "PersistentVolumeClaim", "-registry")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    text = (CHART / "templates" / "_validate.tpl").read_text()
    assert re.search(r'lookup "v1" "PersistentVolumeClaim"', text)
    assert "storageSize cannot be modified after the initial deployment" in text
