"""The container images of Kubernetes workloads (e.g. a rendered Helm chart). Pure: no I/O.

Every kind that carries a pod template is understood: Pod, PodTemplate, Deployment, StatefulSet,
DaemonSet, ReplicaSet, ReplicationController, Job and CronJob (its job template's pod template), and
``List`` objects holding them. From each pod spec: ``containers``, ``initContainers`` and
``ephemeralContainers``. Used by the component reconciler and the early-loading (preload) job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import yaml

CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")

# kind -> path from the object to its pod spec
_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
WORKLOAD_KINDS = frozenset(_POD_SPEC_PATHS)


@dataclass(frozen=True)
class WorkloadImage:
    """One container's image, with where it was found (for messages)."""

    kind: str
    name: str
    namespace: str
    container_field: str  # containers | initContainers | ephemeralContainers
    container: str
    image: str

    @property
    def where(self) -> str:
        return f"{self.kind}/{self.name} {self.container_field}[{self.container}]"


def load_manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (``helm template`` output); empty documents skipped."""
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def _objects(docs: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            yield from _objects(doc["items"])
        else:
            yield doc


def pod_spec(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec inside a workload object, or None for other kinds."""
    path = _POD_SPEC_PATHS.get(str(obj.get("kind")))
    if path is None:
        return None
    node: Any = obj
    for step in path:
        node = node.get(step) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def pod_spec_images(spec: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(container field, container name, image)`` for every container of a pod spec."""
    for fieldname in CONTAINER_FIELDS:
        for container in spec.get(fieldname) or []:
            if isinstance(container, Mapping) and isinstance(container.get("image"), str) and container["image"]:
                yield fieldname, str(container.get("name") or ""), container["image"].strip()


def workload_images(docs: Iterable[Mapping[str, Any]]) -> list[WorkloadImage]:
    """Every container image of every workload in ``docs``, in document order."""
    out: list[WorkloadImage] = []
    for obj in _objects(docs):
        spec = pod_spec(obj)
        if spec is None:
            continue
        meta = obj.get("metadata") or {}
        for fieldname, container, image in pod_spec_images(spec):
            out.append(
                WorkloadImage(
                    kind=str(obj.get("kind")),
                    name=str(meta.get("name") or ""),
                    namespace=str(meta.get("namespace") or ""),
                    container_field=fieldname,
                    container=container,
                    image=image,
                )
            )
    return out


def images(docs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct image strings (as written) of every workload in ``docs``, first-seen order."""
    return list(dict.fromkeys(w.image for w in workload_images(docs)))
