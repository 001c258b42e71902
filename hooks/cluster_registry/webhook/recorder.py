"""Makes sure an Artifact exists for every image the pods that exist use (fed by ``webhook.pods``).

:meth:`Recorder.submit` deduplicates intents against what is pending and what was recently written
(dict lookups, no I/O). A background task takes the pending intents in batches and, in a worker
thread pool (the Kubernetes client blocks; a few Artifacts at once, not a whole fleet's one after
another), resolves each pod's top controlling owner (Pod -> ReplicaSet
-> Deployment, Job -> CronJob; cached by uid) and its service account's imagePullSecrets (cached for
a while), then creates the Artifact, or merges the missing owners and pull secrets into it. An
Artifact that the watch-fed view already shows with everything in it costs no write, so a rollout of
1,000 pods of one Deployment writes once per image.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cluster_registry import api, reference
from cluster_registry.kubeio import Kube
from cluster_registry.webhook.pods import Intent, Owner, PodWatch
from cluster_registry.webhook.view import ArtifactState, ArtifactView, state_of

log = logging.getLogger(__name__)
MAX_OWNER_DEPTH = 6


class Conflict(Exception):
    """409 from the API server: the object exists, or changed since it was read."""


class ArtifactApi(Protocol):
    """The blocking API calls the recorder needs (a Kubernetes implementation and test fakes)."""

    def get_artifact(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_artifact(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def patch_artifact(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...

    def controller_of(self, namespace: str, owner: Owner) -> Owner | None:
        """The controlling owner of ``owner`` (None: it is the top, or it cannot be read)."""

    def service_account_secrets(self, namespace: str, name: str) -> list[str]: ...


@dataclass
class Stats:
    submitted: int = 0
    deduplicated: int = 0
    creates: int = 0
    patches: int = 0
    unchanged: int = 0
    errors: int = 0
    api_reads: int = 0


def owner_dict(owner: Owner) -> api.OwnerRef:
    return api.OwnerRef(apiVersion=owner.api_version, kind=owner.kind, name=owner.name, uid=owner.uid)


def _owner_id(o: Mapping[str, object]) -> tuple[str, ...]:
    return (str(o.get("uid")),) if o.get("uid") else (str(o.get("kind")), str(o.get("name")))


def merge(state: ArtifactState, owners: list[api.OwnerRef], secrets: set[str]) -> dict[str, Any] | None:
    """The merge patch adding what ``state`` lacks (guarded by its resourceVersion), or None."""
    have = {_owner_id(o) for o in state.owners}
    new_owners = [dict(o) for o in owners if _owner_id(o) not in have]
    new_secrets = secrets - state.pull_secrets
    if not new_owners and not new_secrets:
        return None
    spec: dict[str, Any] = {}
    if new_owners:
        spec["owners"] = [dict(o) for o in state.owners] + new_owners
    if new_secrets:
        spec["pullSecrets"] = sorted(state.pull_secrets | new_secrets)
    return {"metadata": {"resourceVersion": state.resource_version}, "spec": spec}


class Recorder:
    def __init__(
        self,
        kube: ArtifactApi | None,
        view: ArtifactView,
        batch_interval: float = 0.2,
        recent_ttl: float = 60.0,
        sa_ttl: float = 60.0,
        max_recent: int = 100_000,
        clock: Any = time.monotonic,
        concurrency: int = 4,
    ) -> None:
        self.kube = kube
        self.view = view
        self.batch_interval = batch_interval
        self.recent_ttl = recent_ttl
        self.sa_ttl = sa_ttl
        self.max_recent = max_recent
        self.clock = clock
        self.concurrency = max(1, concurrency)  # Artifacts written at once (each a few API calls)
        self._stats_lock = threading.Lock()
        self.stats = Stats()
        self._pending: set[Intent] = set()
        self._inflight: set[Intent] = set()
        self._recent: OrderedDict[Intent, float] = OrderedDict()
        self._owners: OrderedDict[str, Owner] = OrderedDict()  # uid -> top owner
        self._sa: dict[tuple[str, str], tuple[float, list[str]]] = {}
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    # -- request path
    def submit(self, intents: Iterable[Intent]) -> None:
        if self.kube is None:
            return
        now = self.clock()
        added = False
        for intent in intents:
            self.stats.submitted += 1
            if intent in self._pending or intent in self._inflight:
                self.stats.deduplicated += 1
                continue
            seen = self._recent.get(intent)
            if seen is not None and (
                now - seen < self.recent_ttl or self.view.get(intent.namespace, intent.source) is not None
            ):
                self.stats.deduplicated += 1
                continue
            self._pending.add(intent)
            added = True
        if added and self._wake is not None:
            self._wake.set()

    def forget(self, namespace: str, source: str) -> None:
        """The Artifact for ``source`` in ``namespace`` was deleted: its intents are no longer done."""
        for intent in [i for i in self._recent if i.namespace == namespace and i.source == source]:
            del self._recent[intent]

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- background
    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        if self._pending:
            self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._idle.clear()
            await asyncio.sleep(self.batch_interval)  # let a burst of admissions accumulate
            batch, self._pending = self._pending, set()
            self._inflight = batch
            try:
                failed, done = await asyncio.to_thread(self.flush, batch)
                self.remember(done)
            except Exception:  # noqa: BLE001 - never let the recorder die; retry the whole batch
                log.exception("Artifact batch failed")
                failed = batch
            finally:
                self._inflight = set()
            if failed:
                self._pending |= failed
                await asyncio.sleep(min(5.0, self.batch_interval * 10))
                self._wake.set()
            if not self._pending:
                self._idle.set()

    async def drained(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is pending (for tests and graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and (self._idle is None or self._idle.is_set()):
                return True
            await asyncio.sleep(0.02)
        return False

    def remember(self, done: Iterable[Intent]) -> None:
        """Note intents as recently written (on the event loop's thread, like ``submit``)."""
        now = self.clock()
        for intent in done:
            self._recent[intent] = now
            self._recent.move_to_end(intent)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    def flush(self, batch: set[Intent]) -> tuple[set[Intent], list[Intent]]:
        """Write what ``batch`` needs (blocking); return the intents that failed and those done."""
        assert self.kube is not None
        groups: dict[tuple[str, str], list[Intent]] = {}
        for intent in batch:
            groups.setdefault((intent.namespace, intent.source), []).append(intent)
        failed: set[Intent] = set()
        done: list[Intent] = []
        items = sorted(groups.items())
        # each group is one Artifact: independent of the others, so a few are written at once (a 409
        # is re-read and merged in _ensure; a 429 or any other error retries the group next batch)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)) or 1) as pool:
            results = list(pool.map(lambda item: self._record(item[0][0], item[0][1], item[1]), items))
        for (_key, intents), ok in zip(items, results):
            if ok:
                done.extend(intents)
            else:
                failed.update(intents)
        return failed, done

    def _record(self, namespace: str, source: str, intents: list[Intent]) -> bool:
        """Write one Artifact for ``intents`` (blocking); False: it failed and is retried later."""
        try:
            owners: dict[tuple[str, ...], api.OwnerRef] = {}
            secrets: set[str] = set()
            for intent in intents:
                secrets.update(intent.pull_secrets)
                secrets.update(self._sa_secrets(namespace, intent.service_account))
                if intent.owner is not None:
                    top = owner_dict(self._top_owner(namespace, intent.owner))
                    owners.setdefault(_owner_id(top), top)
            self._ensure(namespace, source, [owners[k] for k in sorted(owners)], secrets)
        except Exception as err:  # noqa: BLE001 - retried with the next batch
            self._count("errors")
            log.warning("recording Artifact for %s in %s failed: %s", source, namespace, err)
            return False
        return True

    def _count(self, field: str) -> None:
        with self._stats_lock:  # called from the pool's threads
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _ensure(self, namespace: str, source: str, owners: list[api.OwnerRef], secrets: set[str]) -> None:
        assert self.kube is not None
        name = reference.artifact_name(source)
        state = self.view.get(namespace, source)
        for _attempt in range(4):
            if state is None:
                try:
                    self.kube.create_artifact(namespace, api.artifact_body(source, namespace, pull_secrets=secrets, owners=owners))
                    self._count("creates")
                    log.info("created Artifact %s/%s for %s", namespace, name, source)
                    return
                except Conflict:
                    pass
                state = self._read(namespace, name)
                continue
            patch = merge(state, owners, secrets)
            if patch is None:
                self._count("unchanged")
                return
            try:
                self.kube.patch_artifact(namespace, state.name, patch)
                self._count("patches")
                return
            except Conflict:
                state = self._read(namespace, name)
        raise RuntimeError(f"Artifact {namespace}/{name} kept changing under us")

    def _read(self, namespace: str, name: str) -> ArtifactState | None:
        assert self.kube is not None
        self._count("api_reads")
        obj = self.kube.get_artifact(namespace, name)
        keyed = state_of(obj) if obj is not None else None
        return keyed[1] if keyed else None

    def _top_owner(self, namespace: str, owner: Owner) -> Owner:
        assert self.kube is not None
        if not owner.uid or owner.kind == "Pod":
            return owner
        cached = self._owners.get(owner.uid)
        if cached is not None:
            return cached
        top = owner
        for _ in range(MAX_OWNER_DEPTH):
            self._count("api_reads")
            parent = self.kube.controller_of(namespace, top)
            if parent is None:
                break
            top = parent
        self._owners[owner.uid] = top
        while len(self._owners) > 10_000:
            self._owners.popitem(last=False)
        return top

    def _sa_secrets(self, namespace: str, name: str) -> list[str]:
        assert self.kube is not None
        now = self.clock()
        hit = self._sa.get((namespace, name))
        if hit is not None and now - hit[0] < self.sa_ttl:
            return hit[1]
        self._count("api_reads")
        secrets = self.kube.service_account_secrets(namespace, name)
        self._sa[(namespace, name)] = (now, secrets)
        return secrets


class Recording:
    """The pod watch feeding the recorder; an Artifact deleted while pods use it is recorded again."""

    def __init__(self, recorder: Recorder, pods: PodWatch) -> None:
        self.recorder = recorder
        self.pods = pods

    def _deleted(self, namespace: str, source: str) -> None:
        self.recorder.forget(namespace, source)
        self.pods.resubmit(namespace, source)

    async def run(self) -> None:
        """Watch pods and write Artifacts until cancelled (while this replica leads)."""
        loop = asyncio.get_running_loop()
        view = self.recorder.view

        def sink(intents: Iterable[Intent]) -> None:
            loop.call_soon_threadsafe(self.recorder.submit, intents)

        self.pods.sink = sink
        view.on_deleted = self._deleted
        self.pods.start()
        try:
            await self.recorder.run()
        finally:
            self.pods.stop()
            view.on_deleted = None


class KubeArtifactApi:
    """:class:`ArtifactApi` over the Kubernetes Python client."""

    # kind -> (API class, read method) for the controllers whose owners we follow
    _READERS = {
        ("apps/v1", "ReplicaSet"): ("AppsV1Api", "read_namespaced_replica_set"),
        ("apps/v1", "Deployment"): ("AppsV1Api", "read_namespaced_deployment"),
        ("apps/v1", "StatefulSet"): ("AppsV1Api", "read_namespaced_stateful_set"),
        ("apps/v1", "DaemonSet"): ("AppsV1Api", "read_namespaced_daemon_set"),
        ("batch/v1", "Job"): ("BatchV1Api", "read_namespaced_job"),
        ("batch/v1", "CronJob"): ("BatchV1Api", "read_namespaced_cron_job"),
    }

    def __init__(self, kube: Kube) -> None:
        from kubernetes import client

        self.kube = kube
        self.client = client
        self.api_client = kube.api
        self.core = kube.core

    def get_artifact(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(api.ARTIFACTS, namespace, name)

    def create_artifact(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._conflict(lambda: self.kube.create(api.ARTIFACTS, namespace, body))

    def patch_artifact(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._conflict(lambda: self.kube.patch(api.ARTIFACTS, namespace, name, patch))

    @staticmethod
    def _conflict(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as err:
            if err.status == 409:
                raise Conflict(str(err.reason)) from err
            raise

    def controller_of(self, namespace: str, owner: Owner) -> Owner | None:
        from kubernetes.client.exceptions import ApiException

        reader = self._READERS.get((owner.api_version, owner.kind))
        if reader is None:
            return None
        api_class, method = reader
        try:
            obj = getattr(getattr(self.client, api_class)(self.api_client), method)(
                owner.name, namespace, _request_timeout=10
            )
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise
        for ref in obj.metadata.owner_references or ():
            if ref.controller:
                return Owner(ref.api_version, ref.kind, ref.name, ref.uid)
        return None

    def service_account_secrets(self, namespace: str, name: str) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            sa = self.core.read_namespaced_service_account(name, namespace, _request_timeout=10)
        except ApiException as err:
            if err.status in (403, 404):
                return []
            raise
        return sorted({s.name for s in sa.image_pull_secrets or () if s.name})
