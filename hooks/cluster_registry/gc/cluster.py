"""GC's Kubernetes adapter: read pods, workloads, Artifacts and Components into the pure core's
values; delete Artifacts (with preconditions) and record an Event for each.

Reads are cluster-wide lists (paged, raw JSON: no model deserialisation of every pod). Errors while
reading are fatal for the run (GC must never decide on a partial view); an owner of a kind GC cannot
look up counts as alive.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster_registry import api as crd
from cluster_registry.errors import TemporaryError
from cluster_registry.gc.select import TEMPLATED_KINDS, Artifact, Component, Owner, Workload
from cluster_registry.kubeio import Kube
from cluster_registry.workloads import pod_spec, pod_spec_images

log = logging.getLogger(__name__)
EVENT_SOURCE = "cluster-registry-gc"

# (kind, api method name, api class) for every kind whose pod template GC reads
_WORKLOAD_LISTS: list[tuple[str, str, Callable[[client.ApiClient], Any]]] = [
    ("Deployment", "list_deployment_for_all_namespaces", client.AppsV1Api),
    ("ReplicaSet", "list_replica_set_for_all_namespaces", client.AppsV1Api),
    ("StatefulSet", "list_stateful_set_for_all_namespaces", client.AppsV1Api),
    ("DaemonSet", "list_daemon_set_for_all_namespaces", client.AppsV1Api),
    ("ControllerRevision", "list_controller_revision_for_all_namespaces", client.AppsV1Api),
    ("ReplicationController", "list_replication_controller_for_all_namespaces", client.CoreV1Api),
    ("Job", "list_job_for_all_namespaces", client.BatchV1Api),
    ("CronJob", "list_cron_job_for_all_namespaces", client.BatchV1Api),
]


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _pages(fn: Callable[..., Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
    cont: str | None = None
    while True:
        try:
            resp = fn(limit=500, _continue=cont, _preload_content=False, **kwargs)
        except ApiException as err:
            raise TemporaryError(f"cannot list {getattr(fn, '__name__', 'objects')}: {err.reason}") from err
        body = json.loads(resp.data)
        yield from body.get("items") or []
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return


def pod_images(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """A pod's images as written in its spec, plus each container status's image and imageID."""
    spec = pod.get("spec") or {}
    out = [image for _, _, image in pod_spec_images(spec)]
    status = pod.get("status") or {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            for field in ("image", "imageID"):
                if isinstance(cs.get(field), str) and cs[field]:
                    out.append(cs[field])
    return tuple(dict.fromkeys(out))


def template_images(kind: str, obj: Mapping[str, Any]) -> tuple[str, ...]:
    if kind == "ControllerRevision":
        data = obj.get("data") or {}
        spec = ((data.get("spec") or {}).get("template") or {}).get("spec") or {}
    else:
        spec = pod_spec({**obj, "kind": kind}) or {}
    return tuple(dict.fromkeys(image for _, _, image in pod_spec_images(spec)))


def _workload(kind: str, obj: Mapping[str, Any], images: tuple[str, ...]) -> Workload:
    meta = obj.get("metadata") or {}
    return Workload(kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""), str(meta.get("uid") or ""), images)


class ClusterView:
    """Reads the cluster for one GC run and writes its Artifact deletions and Events."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.kube = Kube(api)

    def workloads(self) -> list[Workload]:
        out = [_workload("Pod", p, pod_images(p)) for p in _pages(self.core.list_pod_for_all_namespaces)]
        for kind, method, cls in _WORKLOAD_LISTS:
            fn = getattr(cls(self.api), method)
            out += [_workload(kind, o, template_images(kind, o)) for o in _pages(fn)]
        return out

    def artifacts(self) -> list[Artifact]:
        out = []
        for o in self._custom(crd.ARTIFACTS):
            meta, spec, status = o.get("metadata") or {}, o.get("spec") or {}, o.get("status") or {}
            if not spec.get("sourceArtifact"):
                continue
            owners = tuple(
                Owner(str(w.get("apiVersion", "")), str(w.get("kind", "")), str(w.get("name", "")), str(w.get("uid", "")))
                for w in spec.get("owners") or []
                if isinstance(w, dict)
            )
            out.append(
                Artifact(
                    namespace=meta.get("namespace", ""),
                    name=meta.get("name", ""),
                    source=str(spec["sourceArtifact"]),
                    uid=meta.get("uid", ""),
                    resource_version=meta.get("resourceVersion", ""),
                    digest=status.get("digest") or None,
                    owners=owners,
                    component=(meta.get("labels") or {}).get(crd.LABEL_COMPONENT),
                    sideloaded=(meta.get("labels") or {}).get(crd.LABEL_LOADED_BY) == "sideload",
                    last_sync=parse_time(status.get("lastSyncTime")),
                    created=parse_time(meta.get("creationTimestamp")),
                )
            )
        return out

    def components(self) -> list[Component]:
        out = []
        for o in self._custom(crd.COMPONENTS):
            meta, spec, status = o.get("metadata") or {}, o.get("spec") or {}, o.get("status") or {}
            images = [str(i) for i in spec.get("images") or [] if i]
            images += [str(s["sourceArtifact"]) for s in status.get("images") or [] if s.get("sourceArtifact")]
            out.append(Component(meta.get("namespace", ""), meta.get("name", ""), tuple(dict.fromkeys(images))))
        return out

    def _custom(self, plural: str) -> list[dict[str, Any]]:
        try:
            return list(_pages(self.custom.list_cluster_custom_object, group=crd.GROUP, version=crd.VERSION, plural=plural))
        except TemporaryError as err:
            cause = err.__cause__
            if isinstance(cause, ApiException) and cause.status == 404:
                return []  # the CRD is not installed: nothing of that kind exists
            raise

    def live_owner_uids(self, artifacts: list[Artifact], known_uids: set[str]) -> set[str]:
        """uids among the Artifacts' recorded owners of kinds GC does not list that still exist.

        Looked up one by one through discovery (custom controllers); any doubt counts as alive.
        """
        alive: set[str] = set()
        wanted = {
            (a.namespace, o.api_version, o.kind, o.name, o.uid)
            for a in artifacts
            for o in a.owners
            if o.kind not in TEMPLATED_KINDS and o.uid not in known_uids
        }
        if not wanted:
            return alive
        from kubernetes.dynamic import DynamicClient  # discovery is slow: only when needed
        from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

        dyn = DynamicClient(self.api)  # type: ignore[no-untyped-call]
        for ns, api_version, kind, name, uid in wanted:
            try:
                res = dyn.resources.get(api_version=api_version, kind=kind)
                obj = res.get(name=name, namespace=ns if res.namespaced else None)
                if obj.metadata.uid == uid:
                    alive.add(uid)
            except (NotFoundError, ResourceNotFoundError):
                continue  # the object, or its kind, is gone
            except Exception as err:  # noqa: BLE001 - keep on any doubt
                log.warning("cannot look up an owner; keeping its images", extra={"owner": f"{kind}/{name}", "error": str(err)})
                alive.add(uid)
        return alive

    def delete_artifact(self, a: Artifact) -> bool:
        """Delete ``a`` if it is unchanged since it was read; False when it changed or is gone."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=a.uid or None, resource_version=a.resource_version or None))
        try:
            self.custom.delete_namespaced_custom_object(crd.GROUP, crd.VERSION, a.namespace, crd.ARTIFACTS, a.name, body=body)
            return True
        except ApiException as err:
            if err.status in (404, 409):
                return False
            raise TemporaryError(f"cannot delete Artifact {a}: {err.reason}") from err

    def window_event(self, namespace: str, lease: str, note: str, type_: str = "Normal", reason: str = "ReadOnlyWindow") -> None:
        """An Event on the GC lock Lease: how long the run held writes off (or why its sweep was aborted)."""
        regarding = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": lease, "namespace": namespace}}
        self.kube.event(regarding, type_, reason, note, action="Sweep", controller=EVENT_SOURCE, instance=EVENT_SOURCE)

    def event(self, a: Artifact, reason: str, message: str, type_: str = "Normal") -> None:
        regarding = {
            "apiVersion": crd.API_VERSION,
            "kind": "Artifact",
            "metadata": {"name": a.name, "namespace": a.namespace, "uid": a.uid or None},
        }
        self.kube.event(regarding, type_, reason, message, action="Delete", controller=EVENT_SOURCE, instance=EVENT_SOURCE)
