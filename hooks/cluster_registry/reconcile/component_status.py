"""The component reconciler's pure core: which Artifacts a Component wants, and its status.

No I/O; ``now`` is passed in. Status shape (``ready: "3/4"``, per-image states and a standard ``Ready``
condition with ``observedGeneration``) is what kstatus (Flux) and an Argo CD health check read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cluster_registry import reference
from cluster_registry.api import (
    LABEL_COMPONENT,
    ComponentStatus,
    Condition,
    ImageStatus,
    OwnerRef,
    Phase,
    artifact_body,
    component_ref,
)
from cluster_registry.errors import InvalidReferenceError
from cluster_registry.reconcile.status import READY, condition, set_condition


# Reasons of an Artifact's failure that retrying will not fix: those of the PermanentError subclasses
# (errors.py, oci/) and the quota's (a unit test keeps the list complete). A Component with such an image
# is Stalled (kstatus: Failed); any other failure (unreachable registry, 429, internal) is retried.
PERMANENT_FAILURES = frozenset({
    "AccessDenied", "Authentication", "Config", "CorruptBlob", "ImageTooLarge", "Input", "InvalidReference",
    "NotFound", "Permanent", "QuotaExceeded", "RegistryProtocol", "TLS", "Unit", "UnsupportedManifest",
    "UnsupportedOperation",
})


@dataclass(frozen=True)
class Desired:
    """The Artifacts a Component wants (by normalised source) and the image strings that do not parse."""

    sources: tuple[str, ...]
    invalid: tuple[tuple[str, str], ...] = ()  # (image as written, why)


def desired(listed: Iterable[str], from_chart: Iterable[str] = ()) -> Desired:
    """Normalise and deduplicate ``spec.images`` plus the chart's images, first-seen order."""
    sources: dict[str, None] = {}
    invalid: dict[str, str] = {}
    for image in [*listed, *from_chart]:
        try:
            sources.setdefault(reference.normalize(image.strip()), None)
        except InvalidReferenceError as err:
            invalid.setdefault(image, err.message)
    return Desired(tuple(sources), tuple(invalid.items()))


def owner_reference(component: Mapping[str, Any]) -> OwnerRef:
    meta = component["metadata"]
    return component_ref(meta["name"], meta["uid"])


def wanted_artifact(component: Mapping[str, Any], source: str, pull_secrets: Iterable[str]) -> dict[str, Any]:
    """A new Artifact for ``source``, owned by ``component``."""
    meta = component["metadata"]
    return artifact_body(
        source,
        meta["namespace"],
        pull_secrets=pull_secrets,
        labels={LABEL_COMPONENT: meta["name"]},
        owner_references=[owner_reference(component)],
    )


def pull_secrets(spec: Mapping[str, Any]) -> list[str]:
    """The Component's pull secrets for its images: ``spec.pullSecrets`` then ``spec.chart.pullSecrets``."""
    chart = spec.get("chart") or {}
    names = [*(spec.get("pullSecrets") or []), *(chart.get("pullSecrets") or [])]
    return [n for n in dict.fromkeys(names) if isinstance(n, str) and n]


def owners_adding(artifact: Mapping[str, Any], component: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The Artifact's ownerReferences with ``component`` added, or None when it is already an owner."""
    refs = list((artifact.get("metadata") or {}).get("ownerReferences") or [])
    uid = component["metadata"]["uid"]
    if any(r.get("uid") == uid for r in refs):
        return None
    return [*refs, owner_reference(component)]


def owners_removing(artifact: Mapping[str, Any], component_uid: str) -> list[dict[str, Any]] | None:
    """The Artifact's ownerReferences without the component, or None when it is not an owner."""
    refs = list((artifact.get("metadata") or {}).get("ownerReferences") or [])
    kept = [r for r in refs if r.get("uid") != component_uid]
    return None if len(kept) == len(refs) else kept


def component_owners(artifact: Mapping[str, Any]) -> list[str]:
    """Names of the Components owning an Artifact (same namespace, by ownerReference)."""
    refs = (artifact.get("metadata") or {}).get("ownerReferences") or []
    return [str(r["name"]) for r in refs if r.get("kind") == "Component" and str(r.get("apiVersion", "")).startswith("clusterregistry.io/")]


def failed_for_good(artifact: Mapping[str, Any] | None) -> bool:
    """Whether the Artifact's copy failed for a reason retrying will not fix."""
    status = (artifact or {}).get("status") or {}
    reason = (condition(status.get("conditions"), READY) or {}).get("reason")
    return status.get("phase") == Phase.FAILED and reason in PERMANENT_FAILURES


def image_state(source: str, artifact: Mapping[str, Any] | None) -> ImageStatus:
    name = reference.artifact_name(source)
    if artifact is None:
        return ImageStatus(sourceArtifact=source, artifact=name, phase=Phase.PENDING.value, message="Artifact not created yet")
    status = artifact.get("status") or {}
    phase = str(status.get("phase") or Phase.PENDING.value)
    ready = condition(status.get("conditions"), READY) or {}
    out = ImageStatus(sourceArtifact=source, artifact=name, phase=phase)
    if phase != Phase.READY and ready.get("message"):
        out["message"] = str(ready["message"])
    return out


def compute_status(
    current: Mapping[str, Any],
    generation: int,
    want: Desired,
    artifacts: Mapping[str, Mapping[str, Any]],
    now: float,
    render_error: str | None = None,
    render_temporary: bool = False,
) -> ComponentStatus:
    """The Component's status from its desired sources and the Artifacts (by name) in its namespace.

    Besides ``Ready``, the kstatus conditions (abnormal-true, present only while true) let Flux and
    other kstatus readers tell "still working" from "stuck": ``Reconciling`` while images are being
    copied or retried, ``Stalled`` when retrying alone will not help (an image that does not parse or
    whose copy failed for good, e.g. it does not exist; a chart that cannot be rendered for a permanent
    reason). Both carry the ``Ready`` message, which kstatus reports as the Component's.
    """
    found = [artifacts.get(reference.artifact_name(s)) for s in want.sources]
    images = [image_state(s, a) for s, a in zip(want.sources, found)]
    stuck = [i for i, a in zip(images, found) if failed_for_good(a)]
    for image, why in want.invalid:
        images.append(ImageStatus(sourceArtifact=image, artifact="", phase=Phase.FAILED.value, message=why))
    total = len(images)
    ready_count = sum(1 for i in images if i["phase"] == Phase.READY)
    phases = {i["phase"] for i in images}
    status_value: Any
    if render_error is not None:
        status_value, reason, message = "False", "ChartRenderFailed", render_error
    elif want.invalid:
        image, why = want.invalid[0]
        status_value, reason, message = "False", "InvalidImage", why
    elif total == 0:
        status_value, reason, message = "True", "NoImages", "the Component lists no images"
    elif ready_count == total:
        status_value, reason, message = "True", "AllReady", f"all {total} images are in the cluster registry"
    elif Phase.FAILED in phases:
        failed = (stuck or [i for i in images if i["phase"] == Phase.FAILED])[0]
        status_value, reason = "False", "ArtifactFailed"
        message = f"{ready_count}/{total} ready; {failed['sourceArtifact']}: {failed.get('message', 'failed')}"
    elif Phase.DEFERRED in phases:
        status_value, reason = "False", "Deferred"
        message = f"{ready_count}/{total} ready; copies wait for the garbage-collection read-only window to end"
    else:
        status_value, reason, message = "False", "Progressing", f"{ready_count}/{total} images ready"
    conditions: list[Condition] = set_condition(
        current.get("conditions"), READY, status_value, reason, message, now, generation
    )
    stalled = (
        reason == "InvalidImage"
        or (reason == "ChartRenderFailed" and not render_temporary)
        or (reason == "ArtifactFailed" and bool(stuck))
    )
    for type_, on in (("Reconciling", status_value != "True" and not stalled), ("Stalled", stalled)):
        if on:
            conditions = set_condition(conditions, type_, "True", reason, message, now, generation)
        else:
            conditions = [c for c in conditions if c.get("type") != type_]
    return ComponentStatus(
        observedGeneration=generation,
        ready=f"{ready_count}/{total}",
        images=images,
        conditions=conditions,
    )
