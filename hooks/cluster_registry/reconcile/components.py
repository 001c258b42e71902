"""The component reconciler: Components -> the Artifacts they own -> the Component's status.

Watches Components and the project's Artifacts; a Component is reconciled when it changes, when
one of its Artifacts changes, and every ``resync`` seconds. Chart renders are cached per Component
generation, so status-only updates never run helm again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cluster_registry import reference, workloads
from cluster_registry.api import ARTIFACTS, COMPONENTS, LABEL_COMPONENT, LABEL_MANAGED_BY, MANAGED_BY
from cluster_registry.errors import ClusterRegistryError
from cluster_registry.reconcile import component_status as cs
from cluster_registry.reconcile import helm
from cluster_registry.reconcile import status as st
from cluster_registry.kubeio import Informer, Kube, Obj, key_of
from cluster_registry.reconcile.metrics import ComponentMetrics
from cluster_registry.reconcile.queue import DelayQueue
from cluster_registry.reconcile.worker import next_due, store_newer

log = logging.getLogger(__name__)

CONTROLLER = "clusterregistry.io/component-reconciler"

# (component object, docker configs of its chart pull secrets) -> helm template output
RenderFn = Callable[[Obj, list[bytes]], Awaitable[str]]


@dataclass(frozen=True)
class Config:
    helm: str = "helm"
    workers: int = 2
    insecure_registries: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    resync: float = 300.0
    render_timeout: float = 120.0
    policy: st.BackoffPolicy = st.BackoffPolicy(base=5, cap=300, permanent_base=60, permanent_cap=900)
    identity: str = "component-reconciler"
    watch_namespace: str | None = None  # None: every namespace
    kube_version: str | None = None  # for helm template; None: ask the API server
    registry_host: str | None = None  # only to honour the clusterregistry.io/registry annotation


class ComponentReconciler:
    def __init__(
        self,
        kube: Kube,
        config: Config,
        metrics: ComponentMetrics,
        *,
        render: RenderFn | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self._render = render
        self.rand = rand
        self.clock = clock
        self.components: dict[str, Obj] = {}
        self.artifacts: dict[str, Obj] = {}
        self.queue = DelayQueue()
        self.attempts: dict[str, int] = {}
        self.renders: dict[str, tuple[str, list[str] | ClusterRegistryError]] = {}  # key -> (chart hash, images | error)
        self.render_retry_at: dict[str, float] = {}
        # artifact key -> Components whose status lists it (also those not owning it: see _ensure_artifact)
        self.wanted_by: dict[str, set[str]] = {}
        self.synced = False
        self._wake = asyncio.Event()
        self._informers: list[Informer] = []
        self.kube_version: str | None = None

    # -- events ---------------------------------------------------------------------------------

    def on_component(self, type_: str, obj: Obj) -> None:
        key = key_of(obj)
        if st.claimed_elsewhere(obj, self.config.registry_host):
            type_ = "DELETED"  # another installation's Component
        if type_ == "DELETED":
            self.components.pop(key, None)
            self.renders.pop(key, None)
            self._set_wanted(key, set())
            self.attempts.pop(key, None)
            self.queue.forget(key)
            return
        store_newer(self.components, obj)
        self._enqueue(key)

    def on_artifact(self, type_: str, obj: Obj) -> None:
        key = key_of(obj)
        if type_ == "DELETED":
            self.artifacts.pop(key, None)
        else:
            store_newer(self.artifacts, obj)
        ns = (obj.get("metadata") or {}).get("namespace", "")
        wanting = {f"{ns}/{name}" for name in cs.component_owners(obj)} | self.wanted_by.get(key, set())
        for component in wanting:
            self._enqueue(component)

    def _set_wanted(self, component: str, artifacts: set[str]) -> None:
        for key in list(self.wanted_by):
            if key not in artifacts:
                self.wanted_by[key].discard(component)
                if not self.wanted_by[key]:
                    del self.wanted_by[key]
        for key in artifacts:
            self.wanted_by.setdefault(key, set()).add(component)

    def _enqueue(self, key: str, at: float | None = None) -> None:
        self.queue.add(key, self.clock() if at is None else at)
        self._wake.set()

    # -- run -------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.components, self.artifacts, self.queue, self.attempts = {}, {}, DelayQueue(), {}
        if self.kube_version is None:
            self.kube_version = self.config.kube_version or await asyncio.to_thread(self.kube.server_version)
        self.synced = False
        self._informers = [
            Informer(
                self.kube, ARTIFACTS, loop, self.on_artifact, label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}",
                namespace=self.config.watch_namespace,
            ),
            Informer(self.kube, COMPONENTS, loop, self.on_component, namespace=self.config.watch_namespace),
        ]
        for informer in self._informers:
            informer.start()
        # Reconcile only once both caches are filled, so no Artifact is created twice or judged missing.
        while not all(i.synced.is_set() for i in self._informers):
            await asyncio.sleep(0.1)
        self.synced = True
        tasks = [asyncio.ensure_future(self.worker()) for _ in range(max(1, self.config.workers))]
        tasks.append(asyncio.ensure_future(self._resync()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for informer in self._informers:
                informer.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync * (0.9 + 0.2 * self.rand()))
            for key in list(self.components):
                self._enqueue(key)

    async def worker(self) -> None:
        while True:
            key = await next_due(self.queue, self._wake, self.clock)
            next_at: float | None = None
            try:
                next_at = await self.reconcile(key)
                self.metrics.reconciles.labels("ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - API trouble or a bug: back off and retry
                self.metrics.reconciles.labels("error").inc()
                if isinstance(err, ClusterRegistryError):
                    log.warning("reconciling component %s: %s", key, err.message)
                else:
                    log.exception("reconciling component %s failed", key)
                attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
                next_at = self.clock() + st.backoff_delay(attempt, True, self.rand(), self.config.policy)
            finally:
                self.queue.done(key, next_at)
                self._wake.set()
            self._gauge()

    def _gauge(self) -> None:
        counts = {"True": 0, "False": 0, "Unknown": 0}
        for obj in self.components.values():
            ready = st.condition((obj.get("status") or {}).get("conditions"), st.READY)
            counts[str(ready.get("status", "Unknown")) if ready else "Unknown"] += 1
        for k, v in counts.items():
            self.metrics.components.labels(k).set(v)

    # -- one Component ----------------------------------------------------------------------------

    async def chart_images(self, comp: Obj) -> tuple[list[str], str | None, bool]:
        """(images of the chart, render error, whether the error is temporary); cached per chart spec."""
        spec = comp.get("spec") or {}
        chart = spec.get("chart")
        key = key_of(comp)
        if not chart:
            self.renders.pop(key, None)
            return [], None, False
        digest = hashlib.sha256(json.dumps([chart, spec.get("pullSecrets")], sort_keys=True).encode()).hexdigest()
        cached = self.renders.get(key)
        if cached and cached[0] == digest and isinstance(cached[1], list):
            return cached[1], None, False
        failed = cached[1] if cached and cached[0] == digest and not isinstance(cached[1], list) else None
        if failed is not None and self.clock() < self.render_retry_at.get(key, 0):
            # a failed render is retried on its backoff, not on every event; a permanent one stays Stalled
            return [], failed.message, failed.temporary
        ns = comp["metadata"]["namespace"]
        configs: list[bytes] = []
        for name in cs.pull_secrets(spec):
            data = await asyncio.to_thread(self.kube.docker_config, ns, name)
            if data is not None:
                configs.append(data)
        try:
            text = await (self._render or self._helm)(comp, configs)
            found = workloads.images(workloads.load_manifests(text))
        except ClusterRegistryError as err:
            self.metrics.renders.labels("error").inc()
            self.renders[key] = (digest, err)
            return [], err.message, err.temporary
        except Exception as err:  # noqa: BLE001 - e.g. YAML helm should never print
            self.metrics.renders.labels("error").inc()
            return [], f"rendering the chart failed: {type(err).__name__}", True
        self.metrics.renders.labels("ok").inc()
        self.renders[key] = (digest, found)
        log.info("rendered chart", extra={"component": key, "ref": chart.get("ref"), "images": len(found)})
        return found, None, False

    async def _helm(self, comp: Obj, configs: list[bytes]) -> str:
        chart = (comp.get("spec") or {}).get("chart") or {}
        ref = str(chart.get("ref") or "")
        meta = comp["metadata"]
        return await helm.template(
            self.config.helm,
            release=meta["name"],
            namespace=meta["namespace"],
            ref=ref,
            version=chart.get("version"),
            values=chart.get("values"),
            docker_configs=configs,
            plain_http=helm.chart_host(ref) in self.config.insecure_registries,
            ca_file=self.config.ca_bundle,
            kube_version=self.kube_version,
            timeout=self.config.render_timeout,
        )

    async def reconcile(self, key: str) -> float | None:
        comp = self.components.get(key)
        if comp is None or (comp.get("metadata") or {}).get("deletionTimestamp"):
            return None
        meta = comp["metadata"]
        ns, uid, generation = meta["namespace"], meta["uid"], int(meta.get("generation") or 0)
        spec = comp.get("spec") or {}
        if spec.get("suspend") is True:  # the operator's pause: nothing rendered, written or released
            return None
        chart_imgs, render_error, temporary = await self.chart_images(comp)
        want = cs.desired([str(i) for i in spec.get("images") or []], chart_imgs)
        if render_error is None:
            self._set_wanted(key, {f"{ns}/{reference.artifact_name(src)}" for src in want.sources})
        secrets = cs.pull_secrets(spec)
        wanted_names = set()
        if render_error is None:  # never drop Artifacts because a render failed
            for source in want.sources:
                body = cs.wanted_artifact(comp, source, secrets)
                claim = (meta.get("annotations") or {}).get(st.ANNOTATION_REGISTRY)
                if claim:  # the Component's installation copies its images
                    body["metadata"]["annotations"] = {st.ANNOTATION_REGISTRY: claim}
                name = body["metadata"]["name"]
                wanted_names.add(name)
                await self._ensure_artifact(comp, body)
            await self._release_unwanted(comp, wanted_names)
        in_ns = {k.split("/", 1)[1]: v for k, v in self.artifacts.items() if k.startswith(ns + "/")}
        new = cs.compute_status(
            comp.get("status") or {}, generation, want, in_ns, self.clock(), render_error, render_temporary=temporary
        )
        patch = st.status_patch(comp.get("status") or {}, new)
        if patch is not None:
            obj = await asyncio.to_thread(self.kube.patch_status, COMPONENTS, ns, meta["name"], patch)
            store_newer(self.components, obj)
            old_ready = st.condition((comp.get("status") or {}).get("conditions"), st.READY) or {}
            new_ready = st.condition(new.get("conditions"), st.READY) or {}
            if (old_ready.get("status"), old_ready.get("reason")) != (new_ready.get("status"), new_ready.get("reason")):
                await asyncio.to_thread(
                    self.kube.event, obj, "Normal" if new_ready.get("status") == "True" else "Warning",
                    str(new_ready.get("reason", "")), str(new_ready.get("message", "")),
                    action="Reconcile", controller=CONTROLLER, instance=self.config.identity,
                )
        if render_error is not None:
            if self.clock() >= self.render_retry_at.get(key, 0):
                attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
                self.render_retry_at[key] = self.clock() + st.backoff_delay(attempt, temporary, self.rand(), self.config.policy)
            return self.render_retry_at[key]
        self.render_retry_at.pop(key, None)
        self.attempts.pop(key, None)
        return None

    async def _ensure_artifact(self, comp: Obj, body: Obj) -> None:
        ns, name = comp["metadata"]["namespace"], body["metadata"]["name"]
        existing = self.artifacts.get(f"{ns}/{name}")
        if existing is None:
            try:
                created = await asyncio.to_thread(self.kube.create, ARTIFACTS, ns, body)
                store_newer(self.artifacts, created)
                log.info("created artifact", extra={"artifact": f"{ns}/{name}", "source": body["spec"]["sourceArtifact"]})
                return
            except Exception as err:  # noqa: BLE001
                if getattr(err, "status", None) != 409:
                    raise
                existing = await asyncio.to_thread(self.kube.get, ARTIFACTS, ns, name)
                if existing is None:
                    raise ClusterRegistryError(f"artifact {ns}/{name} vanished while adopting it") from None
        if (existing.get("spec") or {}).get("sourceArtifact") != body["spec"]["sourceArtifact"]:
            log.warning("artifact %s/%s holds another source; not adopting it", ns, name)
            return
        if (existing.get("spec") or {}).get("owners") and not (existing.get("metadata") or {}).get("ownerReferences"):
            # The webhook's, for running pods: left as is. An ownerReference would make Kubernetes
            # delete it with this Component while pods still use the image. The status follows it by name.
            return
        owners = cs.owners_adding(existing, comp)
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if owners is None and LABEL_MANAGED_BY in labels:
            return
        patch_meta: dict[str, Any] = {"resourceVersion": existing["metadata"].get("resourceVersion")}
        if owners is not None:
            patch_meta["ownerReferences"] = owners
        new_labels = {LABEL_MANAGED_BY: MANAGED_BY} if LABEL_MANAGED_BY not in labels else {}
        if LABEL_COMPONENT not in labels:
            new_labels[LABEL_COMPONENT] = comp["metadata"]["name"]
        if new_labels:
            patch_meta["labels"] = new_labels
        updated = await asyncio.to_thread(self.kube.patch, ARTIFACTS, ns, name, {"metadata": patch_meta})
        store_newer(self.artifacts, updated)

    async def _release_unwanted(self, comp: Obj, wanted: set[str]) -> None:
        ns, uid = comp["metadata"]["namespace"], comp["metadata"]["uid"]
        for key, art in list(self.artifacts.items()):
            name = key.split("/", 1)[1]
            if not key.startswith(ns + "/") or name in wanted:
                continue
            remaining = cs.owners_removing(art, uid)
            if remaining is None:
                continue
            if not remaining and not (art.get("spec") or {}).get("owners"):
                await asyncio.to_thread(self.kube.delete, ARTIFACTS, ns, name)
                log.info("deleted artifact no longer wanted", extra={"artifact": key})
                continue
            patch_meta: dict[str, Any] = {"resourceVersion": art["metadata"].get("resourceVersion"), "ownerReferences": remaining}
            if ((art.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT) == comp["metadata"]["name"]:
                patch_meta["labels"] = {LABEL_COMPONENT: None}
            updated = await asyncio.to_thread(self.kube.patch, ARTIFACTS, ns, name, {"metadata": patch_meta})
            store_newer(self.artifacts, updated)
