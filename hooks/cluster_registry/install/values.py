"""The rendered ``global.networkfunctionextension`` values, read into a typed, frozen snapshot.

Pure. ``load`` never raises on a wrong type: it records a problem (with the value's full path) and
uses the default, so one run reports every bad value at once. Besides types (the chart's schema has
them too) it checks the shapes the schema cannot express: the GC cadence is a cron schedule, the
early-loading images are image references. The file the chart mounts may hold
the ``networkfunctionextension`` mapping itself or a whole values tree (``global:`` at the top).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster_registry import reference
from cluster_registry.errors import InvalidReferenceError
from cluster_registry.install.cron import cron_error

PREFIX = "global.networkfunctionextension."

# Value keys (relative to PREFIX) that the checks read; see docs in chart/values.yaml.
K_CLUSTER_REGISTRY = "enableClusterRegistry"
K_LOCAL_REGISTRY = "enableLocalRegistry"
K_EARLY_LOADING = "enableEarlyLoading"
K_EARLY_IMAGES = "earlyLoading.images"
K_REGISTRY_HA = "clusterRegistry.highAvailability.enabled"
K_REGISTRY_AUTOSCALING = "clusterRegistry.autoScaling.enabled"
K_WEBHOOK_HA = "webhook.highAvailability.enabled"
K_WEBHOOK_AUTOSCALING = "webhook.autoScaling.enabled"
K_STORAGE_CLASS = "clusterRegistry.storageClassName"
K_STORAGE_SIZE = "clusterRegistry.storageSize"
K_STORAGE_ACCESS_MODE = "clusterRegistry.storageAccessMode"
K_MATCH_CONDITION = "webhook.pod.mutation.matchConditionExpression"
K_GC_CADENCE = "clusterRegistry.clusterRegistryGCCadence"
K_GC_THRESHOLD = "clusterRegistry.clusterRegistryGCThreshold"
K_PULL_ROTATION = "registryAccess.pullCredentialRotation"
K_SCALE = "clusterRegistry.registryService.scale"
K_HA_ALLOW_FEWER_NODES = "validation.allowHighAvailabilityOnFewerNodes"
K_SYSTEM_POOL_LABEL = "systemPool.nodeLabel"
K_STORAGE_DRIVER = "clusterRegistry.storage.driver"
K_EXISTING_CLAIM = "clusterRegistry.existingClaim"
K_LOCAL_SOURCE = "localRegistry.source"
K_LOCAL_CLAIM = "localRegistry.claimName"

DEFAULT_SYSTEM_POOL_LABEL = "kubernetes.azure.com/mode=system"
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce")
SCALES = ("small", "medium", "large")
STORAGE_DRIVERS = ("filesystem", "s3", "azure")


@dataclass(frozen=True)
class ValueProblem:
    key: str  # relative to PREFIX
    message: str


@dataclass(frozen=True)
class Values:
    enable_cluster_registry: bool = True
    enable_local_registry: bool = False
    enable_early_loading: bool = False
    early_loading_images: tuple[str, ...] = ()
    registry_ha: bool = True
    registry_autoscaling: bool = True
    webhook_ha: bool = True
    webhook_autoscaling: bool = True
    storage_class_name: str = ""
    storage_size: str = "100Gi"
    storage_access_mode: str = ""  # "" = infer from the provisioner
    match_condition_expression: str = ""
    gc_cadence: str = "0 0 * * *"
    gc_threshold: int = 0
    scale: str = "medium"
    ha_allow_fewer_nodes: bool = False
    system_pool_label: str = DEFAULT_SYSTEM_POOL_LABEL
    storage_driver: str = "filesystem"  # filesystem (a PVC), s3 or azure (no PVC)
    existing_claim: str = ""
    local_source: str = "hostPath"  # hostPath or persistentVolumeClaim (side loading's drive)
    local_claim: str = ""

    @property
    def uses_volume(self) -> bool:
        return self.enable_cluster_registry and self.storage_driver == "filesystem"

    @property
    def any_ha(self) -> bool:
        return self.enable_cluster_registry and (self.registry_ha or self.webhook_ha)


def subtree(document: Any) -> Mapping[str, Any]:
    """The ``networkfunctionextension`` mapping of a whole values tree, or the document itself."""
    if not isinstance(document, Mapping):
        return {}
    glob = document.get("global")
    if isinstance(glob, Mapping) and isinstance(glob.get("networkfunctionextension"), Mapping):
        nfe: Mapping[str, Any] = glob["networkfunctionextension"]
        return nfe
    return document


def _get(tree: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def load(document: Any) -> tuple[Values, list[ValueProblem]]:
    """Read ``document`` (a parsed values file); wrong types become problems and defaults."""
    tree = subtree(document)
    problems: list[ValueProblem] = []
    defaults = Values()

    def boolean(key: str, default: bool) -> bool:
        present, v = _get(tree, key)
        if not present or v is None:
            return default
        if isinstance(v, bool):
            return v
        problems.append(ValueProblem(key, f"must be true or false, not {v!r}"))
        return default

    def string(key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        present, v = _get(tree, key)
        if not present or v is None:
            return default
        if not isinstance(v, str):
            problems.append(ValueProblem(key, f"must be a string, not {v!r}"))
            return default
        if choices and v not in choices:
            problems.append(ValueProblem(key, f"must be one of {', '.join(choices)}, not {v!r}"))
            return default
        return v

    present, threshold = _get(tree, K_GC_THRESHOLD)
    gc_threshold = defaults.gc_threshold
    if present and threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 100:
            problems.append(ValueProblem(K_GC_THRESHOLD, f"must be a whole percentage 0-100, not {threshold!r}"))
        else:
            gc_threshold = threshold

    present, images = _get(tree, K_EARLY_IMAGES)
    early: tuple[str, ...] = ()
    if present and images is not None:
        if isinstance(images, list) and all(isinstance(i, str) for i in images):
            early = tuple(images)
            for i, image in enumerate(early):
                try:
                    reference.parse(image)
                except InvalidReferenceError as err:
                    problems.append(ValueProblem(f"{K_EARLY_IMAGES}[{i}]", str(err)))
        else:
            problems.append(ValueProblem(K_EARLY_IMAGES, "must be a list of image references (strings)"))

    present, size = _get(tree, K_STORAGE_SIZE)
    storage_size = defaults.storage_size
    if present and size is not None:
        # YAML may read a bare number; keep it as text and let the quantity check judge it.
        storage_size = str(size) if isinstance(size, (str, int)) and not isinstance(size, bool) else ""
        if not storage_size:
            problems.append(ValueProblem(K_STORAGE_SIZE, f"must be a quantity such as 100Gi, not {size!r}"))
            storage_size = defaults.storage_size

    values = Values(
        enable_cluster_registry=boolean(K_CLUSTER_REGISTRY, defaults.enable_cluster_registry),
        enable_local_registry=boolean(K_LOCAL_REGISTRY, defaults.enable_local_registry),
        enable_early_loading=boolean(K_EARLY_LOADING, defaults.enable_early_loading),
        early_loading_images=early,
        registry_ha=boolean(K_REGISTRY_HA, defaults.registry_ha),
        registry_autoscaling=boolean(K_REGISTRY_AUTOSCALING, defaults.registry_autoscaling),
        webhook_ha=boolean(K_WEBHOOK_HA, defaults.webhook_ha),
        webhook_autoscaling=boolean(K_WEBHOOK_AUTOSCALING, defaults.webhook_autoscaling),
        storage_class_name=string(K_STORAGE_CLASS, defaults.storage_class_name),
        storage_size=storage_size,
        storage_access_mode=string(K_STORAGE_ACCESS_MODE, "", ("",) + ACCESS_MODES),
        match_condition_expression=string(K_MATCH_CONDITION, ""),
        gc_cadence=string(K_GC_CADENCE, defaults.gc_cadence),
        gc_threshold=gc_threshold,
        scale=string(K_SCALE, defaults.scale, SCALES),
        ha_allow_fewer_nodes=boolean(K_HA_ALLOW_FEWER_NODES, False),
        system_pool_label=string(K_SYSTEM_POOL_LABEL, DEFAULT_SYSTEM_POOL_LABEL),
        storage_driver=string(K_STORAGE_DRIVER, defaults.storage_driver, STORAGE_DRIVERS),
        existing_claim=string(K_EXISTING_CLAIM, ""),
        local_source=string(K_LOCAL_SOURCE, "persistentVolumeClaim", ("hostPath", "persistentVolumeClaim")),
        local_claim=string(K_LOCAL_CLAIM, ""),
    )
    if values.enable_cluster_registry and values.gc_cadence and (why := cron_error(values.gc_cadence)):
        problems.append(
            ValueProblem(K_GC_CADENCE, f"{values.gc_cadence!r} is not a valid cron schedule: {why} (e.g. \"0 0 * * *\"; \"\" disables GC)")
        )
    rotation = string(K_PULL_ROTATION, "")
    if values.enable_cluster_registry and rotation and (why := cron_error(rotation)):
        problems.append(ValueProblem(K_PULL_ROTATION, f"{rotation!r} is not a valid cron schedule: {why} (e.g. \"0 3 * * 0\")"))
    return values, problems
