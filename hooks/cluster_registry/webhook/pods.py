"""Which Artifacts the pods that exist need: a pure mapping from a pod to its intents, and a pod watch.

Artifacts are recorded from pods the API server holds, never from admission requests (which any
client that reaches the webhook's port could forge for any namespace). A pod's images are read from
its spec; an image the webhook rewrote is traced back to its source by the pod's
``clusterregistry.io/sources`` annotation, which the webhook's patch sets.

Which pods count: pods the webhook annotated (its matchConditions covered them), and, with
``record_unannotated`` (the chart sets it when the webhook's scope is the built-in namespace
exclusion, which this process can apply itself), every other pod too, so that pods created before
the chart was installed, or whose Artifact was deleted, are recorded as well. Never pods in an
excluded namespace, opted-out pods or mirror pods.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

from cluster_registry.webhook.mutate import (
    ANNOTATION_SOURCES,
    CONTAINER_FIELDS,
    MIRROR_ANNOTATION,
    Mutator,
    pod_skip,
    recorded_sources,
)

log = logging.getLogger(__name__)


# Owner and Intent are NamedTuples rather than frozen dataclasses: a rollout builds and hashes many.
class Owner(NamedTuple):
    api_version: str
    kind: str
    name: str
    uid: str


class Intent(NamedTuple):
    """Make sure the Artifact for ``source`` exists in ``namespace`` and records this pod's use."""

    namespace: str
    source: str  # normalised
    pull_secrets: tuple[str, ...] = ()  # the pod's own imagePullSecrets
    service_account: str = "default"  # whose imagePullSecrets are added too
    owner: Owner | None = None  # the pod's controller (resolved to the top owner later), or the pod


def pod_intents(pod: dict[str, Any], mutator: Mutator, record_unannotated: bool) -> frozenset[Intent]:
    """The Artifacts ``pod`` needs (empty for pods outside the scope described above)."""
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace")
    if not isinstance(namespace, str) or namespace in mutator.settings.exclude_namespaces or pod_skip(meta):
        return frozenset()
    recorded = recorded_sources(meta)
    if recorded is None and not record_unannotated:
        return frozenset()
    recorded = recorded or {}
    spec = pod.get("spec") or {}
    sources: set[str] = set()
    for field in CONTAINER_FIELDS:
        for container in spec.get(field) or ():
            if not isinstance(container, dict):
                continue
            # a rewritten image names the cluster registry: its source is the annotation's
            image = recorded.get(str(container.get("name", ""))) or container.get("image")
            if isinstance(image, str) and (plan := mutator.classify(image)).skip is None:
                sources.add(plan.source)
    if not sources:
        return frozenset()
    own = mutator.settings.pull_secret  # the webhook's own addition: for the cluster registry, not the source
    secrets = tuple(
        sorted({s["name"] for s in spec.get("imagePullSecrets") or () if isinstance(s, dict) and s.get("name") not in ("", None, own)})
    )
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    owner = _controller(meta)
    return frozenset(Intent(namespace, src, secrets, str(sa), owner) for src in sources)


def slim(pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` reduced to what :func:`pod_intents` reads."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k in (ANNOTATION_SOURCES, MIRROR_ANNOTATION)}
    keep = ("name", "namespace", "uid", "labels", "ownerReferences")
    return {
        "metadata": {**{k: meta[k] for k in keep if k in meta}, "annotations": annotations},
        "spec": {
            **{k: spec[k] for k in ("imagePullSecrets", "serviceAccountName", "serviceAccount") if k in spec},
            **{f: [{"name": c.get("name"), "image": c.get("image")} for c in spec.get(f) or () if isinstance(c, dict)]
               for f in CONTAINER_FIELDS},
        },
    }


def _controller(meta: dict[str, Any]) -> Owner | None:
    for ref in meta.get("ownerReferences") or ():
        if isinstance(ref, dict) and ref.get("controller") is True:
            return Owner(str(ref.get("apiVersion", "")), str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", "")))
    name = meta.get("name")
    return Owner("v1", "Pod", str(name), str(meta.get("uid", ""))) if name else None


class PodSource(Protocol):
    def list(self) -> tuple[list[dict[str, Any]], str]:
        """Every pod and the list's resourceVersion."""

    def watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, pod) pairs from ``resource_version`` on; raises ``Gone`` on 410."""


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubePods:
    """Every pod in the cluster through the Kubernetes client, as plain JSON (blocking: a thread's).

    Pods are core objects, which the shared Informer (custom objects) does not list.
    """

    def __init__(self, api_client: Any, watch_timeout: int = 240) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(api_client)
        self.watch_timeout = watch_timeout

    def list(self, page: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every pod, read ``page`` at a time and kept only in what ``pod_intents`` reads (a big
        cluster's pods in full would not fit the webhook's memory limit)."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"_continue": token} if token else {}
            resp = self.core.list_pod_for_all_namespaces(limit=page, _request_timeout=60, _preload_content=False, **kwargs)
            got = json.loads(resp.data)
            items.extend(slim(p) for p in got.get("items") or ())
            token = got["metadata"].get("continue")
            if not token:
                return items, str(got["metadata"].get("resourceVersion", ""))

    def watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in w.stream(
                self.core.list_pod_for_all_namespaces,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _request_timeout=self.watch_timeout + 30,
            ):
                yield str(event["type"]), event["raw_object"]
        except ApiException as err:
            if err.status == 410:
                raise Gone() from err
            raise


class PodWatch:
    """Every pod's intents, by pod uid; hands new intents to ``sink`` (called on the watch's thread).

    A daemon thread lists pods, then watches from the list's resourceVersion (relisting on 410 Gone,
    and after a back-off on errors). A pod whose intents did not change (status updates, most
    MODIFIED events) costs a dict lookup. ``resubmit(namespace, source)`` hands the intents of every
    pod still using a deleted Artifact's image to ``sink`` again.
    """

    def __init__(
        self,
        source: PodSource | None,
        mutator: Mutator,
        sink: Callable[[Iterable[Intent]], None] = lambda intents: None,
        record_unannotated: bool = False,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._source = source
        self.mutator = mutator
        self.sink = sink
        self.record_unannotated = record_unannotated
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the index is also read from the event loop (resubmit)
        self._pods: dict[str, frozenset[Intent]] = {}
        self._users: dict[tuple[str, str], set[str]] = {}  # (namespace, source) -> pod uids

    def __len__(self) -> int:
        return len(self._pods)

    def start(self) -> None:
        if self._source is None or (self._thread is not None and not self._stop.is_set()):
            return  # offline, or running (a stopped thread still in a watch call exits by itself)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="pod-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        assert self._source is not None
        delay = self.backoff
        while not stop.is_set():
            try:
                items, rv = self._source.list()
                self.replace_all(items)
                delay = self.backoff
                while not stop.is_set():
                    for kind, obj in self._source.watch(rv):
                        if stop.is_set():
                            return
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        if kind != "BOOKMARK":
                            self.apply(kind, obj)
            except Gone:
                log.info("pod watch expired; listing again")
            except Exception as err:  # noqa: BLE001 - keep watching whatever the API does
                log.warning("pod watch: %s; retrying in %.0fs", err, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.max_backoff)

    def _set(self, uid: str, intents: frozenset[Intent]) -> frozenset[Intent]:
        """Index ``uid``'s intents; return those it did not have before (under the lock)."""
        old = self._pods.pop(uid, frozenset())
        for i in old - intents:
            users = self._users.get((i.namespace, i.source))
            if users is not None:
                users.discard(uid)
                if not users:
                    del self._users[(i.namespace, i.source)]
        if intents:
            self._pods[uid] = intents
            for i in intents:
                self._users.setdefault((i.namespace, i.source), set()).add(uid)
        return intents - old

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        if not uid:
            return
        intents = frozenset() if kind == "DELETED" else pod_intents(obj, self.mutator, self.record_unannotated)
        with self._lock:
            new = self._set(uid, intents)
        if new:
            self.sink(new)

    def replace_all(self, items: list[dict[str, Any]]) -> None:
        fresh = {
            str(p["metadata"]["uid"]): pod_intents(p, self.mutator, self.record_unannotated)
            for p in items
            if (p.get("metadata") or {}).get("uid")
        }
        with self._lock:
            self._pods, self._users = {}, {}
            for uid, intents in fresh.items():
                self._set(uid, intents)
        every = frozenset().union(*fresh.values()) if fresh else frozenset()
        if every:
            self.sink(every)  # after a relist everything is checked again: deduplicated downstream

    def resubmit(self, namespace: str, source: str) -> None:
        with self._lock:
            uids = list(self._users.get((namespace, source), ()))
            again = frozenset(i for u in uids for i in self._pods.get(u, ()) if i.source == source)
        if again:
            log.info("Artifact for %s in %s deleted while %d pods use it: recording it again", source, namespace, len(uids))
            self.sink(again)
