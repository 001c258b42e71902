"""Creating Artifacts from the install hooks (preload, sideload), through the Kubernetes API.

Bodies are built by pure functions (``api.artifact_body``, ``ready_status``); the thin functions below
do the API calls. An Artifact that
already exists is kept (its spec is the source, named by a hash of it) and only gains the
``app.kubernetes.io/managed-by`` label when it lacks it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from kubernetes import client
from kubernetes.client import ApiException

from cluster_registry import api

MANAGED_BY = api.MANAGED_BY
LABEL_COMPONENT = api.LABEL_COMPONENT
ANNOTATION_SIDELOADED = "clusterregistry.io/sideloaded"
LABEL_LOADED_BY = api.LABEL_LOADED_BY


def ready_status(
    *,
    digest: str,
    size: int,
    platforms: Iterable[str],
    local: str,
    generation: int,
    now: datetime.datetime,
    reason: str,
    message: str,
) -> dict[str, Any]:
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "phase": api.Phase.READY.value,
        "digest": digest,
        "size": size,
        "platforms": list(platforms),
        "localArtifact": local,
        "lastSyncTime": stamp,
        "observedGeneration": generation,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": stamp,
                "observedGeneration": generation,
            }
        ],
    }


def ensure(custom: client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    """Create ``body``; if it exists, make sure it carries the managed-by label. Returns the object."""
    meta = body["metadata"]
    try:
        return _obj(custom.create_namespaced_custom_object(api.GROUP, api.VERSION, meta["namespace"], api.ARTIFACTS, body))
    except ApiException as err:
        if err.status != 409:
            raise
    current = _obj(custom.get_namespaced_custom_object(api.GROUP, api.VERSION, meta["namespace"], api.ARTIFACTS, meta["name"]))
    labels = (current.get("metadata") or {}).get("labels") or {}
    missing = {k: v for k, v in meta["labels"].items() if k not in labels}
    patch: dict[str, Any] = {}
    if missing:
        patch["metadata"] = {"labels": missing}
    if body["spec"].get("pullSecrets"):
        merged = sorted(set((current.get("spec") or {}).get("pullSecrets") or []) | set(body["spec"]["pullSecrets"]))
        if merged != (current.get("spec") or {}).get("pullSecrets"):
            patch["spec"] = {"pullSecrets": merged}
    if patch:
        current = _obj(
            custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, meta["namespace"], api.ARTIFACTS, meta["name"], patch)
        )
    return current


def _obj(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value


def set_status(custom: client.CustomObjectsApi, namespace: str, name: str, status: dict[str, Any]) -> None:
    custom.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.ARTIFACTS, name, {"status": status}
    )
