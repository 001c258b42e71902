"""The namespaces' pull Secrets (``registryAccess: isolated``): one per namespace with Artifacts.

The release keeps two keys in one Secret (``<fullname>-pull-keys``: ``current`` and ``previous``, 32
random bytes each); a namespace's pull credential is derived from a key (:mod:`cluster_registry.pullcreds`).
The artifact reconciler's leader runs this controller: it creates the key Secret when it is missing
(random keys, never rendered by the chart, so a GitOps re-render changes nothing), and keeps Secret
``<pull secret name>`` (type ``kubernetes.io/dockerconfigjson``, for the host the webhook rewrites to)
in every namespace that has an Artifact, derived from ``current``. The webhook adds that Secret to the
pods it rewrites. An Artifact exists before its pods are rewritten (WhenReady), so the Secret is
normally there before the first rewritten pod; under ``Always`` within about a second of it (the
kubelet retries a pull whose Secret is missing).

Rotation (``cluster-registry reconcile rotate-pull-keys``, a CronJob) moves ``current`` to ``previous``
and draws a new ``current``. The token service accepts both keys, so the Secrets still holding the old
credential keep working while this controller, seeing the key change, rewrites every namespace's Secret.

Writes: one create per namespace, one update per namespace per rotation. The Secret of another owner
with the same name (no ``LABEL_MANAGED``) is never overwritten.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cluster_registry import pullcreds

log = logging.getLogger(__name__)

LABEL_MANAGED = "clusterregistry.io/pull-credential"
KEY_BYTES = 32


# --- the pure core --------------------------------------------------------------------------------


def new_keys(current: bytes | None = None, draw: Callable[[int], bytes] = os.urandom) -> dict[str, str]:
    """The key Secret's ``data``: a fresh ``current``, and ``previous`` = the old ``current`` (or fresh)."""
    return {
        "current": base64.b64encode(draw(KEY_BYTES)).decode(),
        "previous": base64.b64encode(current if current else draw(KEY_BYTES)).decode(),
    }


def keys_of(secret: Mapping[str, Any] | None) -> tuple[bytes, bytes] | None:
    """(current, previous) from the key Secret, None when it is missing or malformed."""
    data = (secret or {}).get("data") or {}
    try:
        current, previous = (base64.b64decode(data.get(f) or "", validate=True) for f in pullcreds.KEY_FIELDS)
    except ValueError:
        return None
    return (current, previous) if len(current) >= 16 and len(previous) >= 16 else None


def pull_secret(namespace: str, name: str, registry_host: str, key: bytes, labels: Mapping[str, str]) -> dict[str, Any]:
    """The namespace's pull Secret as it should be."""
    config = pullcreds.dockerconfigjson(registry_host, key, namespace)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": pullcreds.SECRET_TYPE,
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, LABEL_MANAGED: "true"}},
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    }


def needs_write(live: Mapping[str, Any] | None, want: Mapping[str, Any]) -> str:
    """``create``, ``update``, ``foreign`` (someone else's Secret of that name: leave it) or ``""``."""
    if live is None:
        return "create"
    if (live.get("metadata") or {}).get("labels", {}).get(LABEL_MANAGED) != "true":
        return "foreign"
    if live.get("data") != want["data"] or live.get("type") != want["type"]:
        return "update"
    return ""


# --- the adapter ---------------------------------------------------------------------------------------


class Conflict(Exception):
    """409: the object exists already, or changed since it was read."""


class SecretsApi(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def replace(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...


class KubeSecrets:
    """Secrets as plain JSON through the Kubernetes client (blocking: call from a thread)."""

    def __init__(self, core: Any, timeout: tuple[float, float] = (10.0, 60.0)) -> None:
        self.core = core
        self.timeout = timeout

    def _call(self, fn: Any, *args: Any) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = fn(*args, _request_timeout=self.timeout, _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return None
            if err.status == 409:
                raise Conflict(str(err.reason)) from err
            raise
        body: dict[str, Any] = json.loads(resp.data)
        return body

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(self.core.read_namespaced_secret, name, namespace)

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.core.create_namespaced_secret, namespace, body) or {}

    def replace(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.core.replace_namespaced_secret, name, namespace, body) or {}


def ensure_keys(api: SecretsApi, namespace: str, name: str, labels: Mapping[str, str]) -> tuple[bytes, bytes]:
    """The release's keys, creating their Secret (random keys) when it does not exist yet."""
    live = api.get(namespace, name)
    if live is None:
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)}, "data": new_keys()}
        try:
            live = api.create(namespace, body)
        except Conflict:  # created meanwhile (another leader's last act): take that one
            live = api.get(namespace, name)
    keys = keys_of(live)
    if keys is None:
        raise ValueError(f"Secret {namespace}/{name} lacks valid 'current' and 'previous' keys (base64, 32 bytes)")
    return keys


def rotate_keys(api: SecretsApi, namespace: str, name: str) -> None:
    """previous <- current, current <- new, as one update guarded by the resourceVersion."""
    live = api.get(namespace, name)
    keys = keys_of(live)
    if live is None or keys is None:
        raise ValueError(f"Secret {namespace}/{name} is missing or malformed: the artifact reconciler creates it")
    live["data"] = new_keys(current=keys[0])
    api.replace(namespace, name, live)  # a concurrent change fails with Conflict (409): nothing half-done


class PullSecrets:
    """Keeps ``secret_name`` in every namespace handed to :meth:`add`, derived from the current key."""

    def __init__(
        self,
        api: SecretsApi,
        release_namespace: str,
        keys_name: str,
        secret_name: str,
        registry_host: str,
        labels: Mapping[str, str] | None = None,
        interval: float = 30.0,
        recheck: float = 600.0,
    ) -> None:
        self.api = api
        self.release_namespace = release_namespace
        self.keys_name = keys_name
        self.secret_name = secret_name
        self.registry_host = registry_host
        self.labels = dict(labels or {"app.kubernetes.io/managed-by": "cluster-registry"})
        self.interval = interval
        self.recheck = recheck
        self.namespaces: set[str] = set()
        self.written: dict[str, bytes] = {}  # namespace -> the key its Secret was last made from
        self.writes = 0  # creates and updates (for tests and logs)
        self._wake = asyncio.Event()

    def add(self, namespace: str) -> None:
        """A namespace has an Artifact: make sure it has the Secret (soon, on the controller's task)."""
        if namespace and namespace not in self.namespaces:
            self.namespaces.add(namespace)
            self._wake.set()

    def sync(self) -> int:
        """One pass (blocking): the keys, then every namespace not yet written with the current key."""
        current, _ = ensure_keys(self.api, self.release_namespace, self.keys_name, self.labels)
        done = 0
        for namespace in sorted(self.namespaces):
            if self.written.get(namespace) == current:
                continue
            want = pull_secret(namespace, self.secret_name, self.registry_host, current, self.labels)
            live = self.api.get(namespace, self.secret_name)
            action = needs_write(live, want)
            if action == "create":
                try:
                    self.api.create(namespace, want)
                except Conflict:
                    continue  # appeared meanwhile: the next pass compares it
            elif action == "update":
                assert live is not None
                want["metadata"]["resourceVersion"] = live["metadata"].get("resourceVersion")
                self.api.replace(namespace, self.secret_name, want)
            elif action == "foreign":
                log.warning("namespace %s has a Secret %s not made by cluster-registry: left as it is; its pods "
                            "cannot pull from the cluster registry", namespace, self.secret_name)
            if action in ("create", "update"):
                self.writes += 1
                done += 1
            self.written[namespace] = current
        return done

    async def run(self) -> None:
        """Sync on every new namespace, every ``interval`` (a rotated key), and from scratch every ``recheck``
        (a Secret deleted by hand)."""
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while True:
            self._wake.clear()
            if loop.time() - last_full >= self.recheck:
                self.written.clear()
                last_full = loop.time()
            try:
                n = await asyncio.to_thread(self.sync)
                if n:
                    log.info("pull Secrets written", extra={"count": n, "namespaces": len(self.namespaces)})
            except Exception as err:  # noqa: BLE001 - the API may be away: the next pass retries
                log.warning("pull Secrets: %s", getattr(err, "reason", None) or err)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
