"""The custom resources' wire formats (clusterregistry.io/v1alpha1) as TypedDicts, and their names.

The chart's CRDs (chart/templates/crds/) are the schema of record; these types mirror them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, Literal, TypedDict

from cluster_registry import reference

GROUP = "clusterregistry.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ARTIFACTS = "artifacts"
COMPONENTS = "components"

# Labels and annotations the project sets on objects it manages.
LABEL_OPT_OUT = "clusterregistry.io/skip"  # "true" on a pod: never rewritten
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "cluster-registry"  # the value of LABEL_MANAGED_BY on objects the project creates
LABEL_COMPONENT = "clusterregistry.io/component"  # on Artifacts created for a Component
# Who loaded an Artifact ahead of any pod: "preload" or "sideload". GC keeps sideloaded images: a
# disconnected site has nowhere to copy them from again.
LABEL_LOADED_BY = "clusterregistry.io/loaded-by"
ANNOTATION_SOURCE = "clusterregistry.io/source"


class Phase(str, Enum):
    PENDING = "Pending"
    COPYING = "Copying"
    READY = "Ready"
    FAILED = "Failed"
    DEFERRED = "Deferred"  # waiting for the GC write lock to be released


class OwnerRef(TypedDict):
    """The top controlling owner of a pod that uses the image (recorded for GC)."""

    apiVersion: str
    kind: str
    name: str
    uid: str


class Condition(TypedDict, total=False):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


class ArtifactSpec(TypedDict, total=False):
    sourceArtifact: str  # required: the normalised source reference
    pullSecrets: list[str]  # Secret names in the Artifact's namespace
    owners: list[OwnerRef]


class ArtifactStatus(TypedDict, total=False):
    phase: str
    digest: str  # the top manifest's digest
    size: int  # bytes: manifests plus blobs, every platform
    platforms: list[str]  # os/arch[/variant] of an index's children
    localArtifact: str  # the reference in the cluster registry
    lastSyncTime: str
    observedGeneration: int
    conditions: list[Condition]


class ImageStatus(TypedDict, total=False):
    sourceArtifact: str
    artifact: str  # the Artifact's name
    phase: str
    message: str


class ComponentChart(TypedDict, total=False):
    ref: str  # oci://host/repo/chart
    version: str
    values: dict[str, object]
    pullSecrets: list[str]


class ComponentSpec(TypedDict, total=False):
    images: list[str]
    chart: ComponentChart
    pullSecrets: list[str]
    suspend: bool  # since chart 0.2.0: the component reconciler leaves the Component alone


class ComponentStatus(TypedDict, total=False):
    observedGeneration: int
    ready: str  # "3/4", for the printer column
    images: list[ImageStatus]
    conditions: list[Condition]


def component_ref(name: str, uid: str) -> OwnerRef:
    """The ownerReference naming the Component ``name`` (Artifacts created for it are its dependents)."""
    return OwnerRef(apiVersion=API_VERSION, kind="Component", name=name, uid=uid)


def artifact_body(
    source: str,
    namespace: str,
    *,
    pull_secrets: Iterable[str] = (),
    owners: Iterable[OwnerRef] = (),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    owner_references: Iterable[OwnerRef] = (),
) -> dict[str, Any]:
    """A new Artifact for normalised ``source`` in ``namespace``, named by a hash of it.

    ``owners`` are the pods' top controllers (``spec.owners``, read by GC); ``owner_references`` the
    Kubernetes owners (a Component). Pull secrets are deduplicated and sorted, so every writer produces
    the same body for the same inputs.
    """
    meta: dict[str, Any] = {
        "name": reference.artifact_name(source),
        "namespace": namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY, **(labels or {})},
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    if refs := list(owner_references):
        meta["ownerReferences"] = refs
    spec = ArtifactSpec(sourceArtifact=source)
    if secrets := sorted(set(pull_secrets)):
        spec["pullSecrets"] = secrets
    if pod_owners := list(owners):
        spec["owners"] = pod_owners
    return {"apiVersion": API_VERSION, "kind": "Artifact", "metadata": meta, "spec": spec}
