"""The custom resources' wire formats (clusterregistry.io/v1alpha1) as TypedDicts, and their names.

The chart's CRDs (chart/templates/crds/) are the schema of record; these types mirror them.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, TypedDict

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


class ComponentStatus(TypedDict, total=False):
    observedGeneration: int
    ready: str  # "3/4", for the printer column
    images: list[ImageStatus]
    conditions: list[Condition]
