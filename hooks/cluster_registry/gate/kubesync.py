"""The token service's Kubernetes side, in threads: a watch of the lock Lease feeding ``GateState``,
the replica's heartbeat Lease carrying its drain ack (see ``protocol``), a poll of its Secrets and the
Artifacts that say which namespace may pull what."""

from __future__ import annotations

import base64
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from cluster_registry import pullcreds
from cluster_registry.gate.access import ReadyIndex
from cluster_registry.gate.protocol import (
    ANNOTATION_DRAINED,
    ANNOTATION_PUSH_UNTIL,
    GATE_LEASE_SECONDS,
    LABEL_GATE_FOR,
    heartbeat_name,
    view,
)
from cluster_registry.gate.state import GateState
from cluster_registry.kubeio import Informer

log = logging.getLogger(__name__)


class LockWatcher(threading.Thread):
    """List + watch the one lock Lease; every read and event goes to ``state``. Never per request.

    Its own loop rather than ``kubeio.Informer`` (the package's list+watch of custom objects): the gate
    fences writes on staleness, so it must confirm freshness on every bookmark and on each watch that
    ends by its timeout (``state.confirm``), and it watches one core Lease by field selector with short
    timeouts; a cache, relist diffing and exponential backoff would only delay a refusal.
    """

    def __init__(self, api: client.ApiClient, namespace: str, name: str, state: GateState, stop: threading.Event) -> None:
        super().__init__(name="gate-lock-watch", daemon=True)
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.lock_name, self.state, self.stop = namespace, name, state, stop

    def run(self) -> None:
        selector = f"metadata.name={self.lock_name}"
        while not self.stop.is_set():
            try:
                listing: Any = self.coord.list_namespaced_lease(self.namespace, field_selector=selector, _request_timeout=15)
                items = listing.items or []
                self.state.observe(view(items[0]) if items else None)
                rv = listing.metadata.resource_version
                w: Any = watch.Watch()  # type: ignore[no-untyped-call]
                for ev in w.stream(
                    self.coord.list_namespaced_lease,
                    self.namespace,
                    field_selector=selector,
                    resource_version=rv,
                    timeout_seconds=20,
                    allow_watch_bookmarks=True,
                    _request_timeout=30,
                ):
                    if self.stop.is_set():
                        w.stop()
                        break
                    kind = ev.get("type")
                    if kind in ("ADDED", "MODIFIED"):
                        self.state.observe(view(ev["object"]))
                    elif kind == "DELETED":
                        self.state.observe(None)
                    elif kind == "BOOKMARK":
                        self.state.confirm()
                    elif kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                else:
                    self.state.confirm()  # the watch ended on its timeout: nothing was missed
            except Exception as err:  # noqa: BLE001 - the state goes stale (writes refused) until we recover
                log.warning("lock watch failed; retrying", extra={"error": str(err)[:300]})
                self.stop.wait(2.0)


class Heartbeat(threading.Thread):
    """Renew this replica's heartbeat Lease every few seconds, and at once when a drain is to be acked."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        lock_name: str,
        identity: str,
        state: GateState,
        stop: threading.Event,
        *,
        pod_uid: str | None = None,
        duration: int = GATE_LEASE_SECONDS,
    ) -> None:
        super().__init__(name="gate-heartbeat", daemon=True)
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.lock_name, self.identity = namespace, lock_name, identity
        self.name = heartbeat_name(lock_name, identity)
        self.state, self.stop, self.duration, self.pod_uid = state, stop, duration, pod_uid
        self.wake = threading.Event()
        self._acked: str | None = None
        state.on_drained = self.wake.set
        state.on_busy = self.wake.set  # publish the push tokens' end at once (GC's quiet-moment hint)

    def _body(self, existing: Any, ack: str | None) -> Any:
        now = datetime.now(timezone.utc)
        annotations = {ANNOTATION_PUSH_UNTIL: self.state.push_until_wall().isoformat(timespec="milliseconds")}
        if ack:
            annotations[ANNOTATION_DRAINED] = ack
        owner = (
            [client.V1OwnerReference(api_version="v1", kind="Pod", name=self.identity, uid=self.pod_uid)]
            if self.pod_uid
            else None
        )
        meta = client.V1ObjectMeta(
            name=self.name,
            namespace=self.namespace,
            labels={LABEL_GATE_FOR: self.lock_name},
            annotations=annotations or None,
            owner_references=owner,
        )
        if existing is not None:
            meta.resource_version = existing.metadata.resource_version
            old = dict(existing.metadata.annotations or {})
            old.update(annotations)
            meta.annotations = old or None
        spec = client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.duration, renew_time=now)
        return client.V1Lease(metadata=meta, spec=spec)

    def beat(self) -> None:
        try:
            self._beat()
        except ApiException as err:
            if err.status != 409:
                raise
            self._beat()  # written meanwhile (a stale read): read again and retry at once

    def _beat(self) -> None:
        started = time.monotonic()
        ack = self.state.ack_wanted()
        try:
            existing: Any = self.coord.read_namespaced_lease(self.name, self.namespace, _request_timeout=10)
        except ApiException as err:
            if err.status != 404:
                raise
            existing = None
        body = self._body(existing, ack)
        if existing is None:
            self.coord.create_namespaced_lease(self.namespace, body, _request_timeout=10)
        else:
            self.coord.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=10)
        self.state.heartbeat_ok(started)
        if ack:
            self.state.acknowledged(ack)
            log.info("drained for the GC lock; acknowledged", extra={"generation": ack})

    def run(self) -> None:
        interval = self.duration / 4
        while not self.stop.is_set():
            try:
                self.beat()
                interval = self.duration / 4
            except Exception as err:  # noqa: BLE001 - fence by staleness; keep trying
                log.warning("heartbeat failed; retrying", extra={"error": str(err)[:300]})
                interval = 1.0
            drain = self.state.drain_in()  # ack as soon as the last push token has died
            self.wake.wait(interval if drain is None else min(interval, drain + 0.05))
            self.wake.clear()

    def remove(self) -> None:
        """Delete the heartbeat on a clean shutdown so GC does not wait for a gone replica."""
        try:
            self.coord.delete_namespaced_lease(self.name, self.namespace, _request_timeout=5)
        except Exception:  # noqa: BLE001 - it expires by itself
            pass


class SecretPoller(threading.Thread):
    """Re-read a few Secrets by name every ``interval`` seconds (RBAC: ``get`` on those names only), so
    a rotated key or password is in use within seconds and nothing is cached for longer."""

    def __init__(self, api: client.ApiClient, namespace: str, names: list[str], stop: threading.Event,
                 interval: float = 5.0) -> None:
        super().__init__(name="token-secrets", daemon=True)
        self.core = client.CoreV1Api(api)
        self.namespace, self.names, self.stop, self.interval = namespace, names, stop, interval
        self.data: dict[str, dict[str, bytes]] = {}  # name -> key -> value; absent Secrets are {}
        self.synced = threading.Event()

    def poll(self) -> None:
        for name in self.names:
            try:
                secret: Any = self.core.read_namespaced_secret(name, self.namespace, _request_timeout=10)
                self.data[name] = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            except ApiException as err:
                if err.status != 404:
                    raise
                self.data[name] = {}
        self.synced.set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - keep the last values; a rotation waits for the next read
                log.warning("cannot read the token service's Secrets; retrying", extra={"error": str(err)[:300]})
            self.stop.wait(self.interval)


class ClusterSources:
    """``service.Sources`` from the cluster: the pull-keys Secret, the pushers' Secrets (polled) and an
    informer on Artifacts feeding ``access.ReadyIndex`` (updated and read on the event loop)."""

    def __init__(self, secrets: SecretPoller, pull_keys_secret: str, pusher_secrets: dict[str, str],
                 index: ReadyIndex, informer: Informer | None) -> None:
        self.secrets, self.pull_keys_secret, self.pusher_secrets = secrets, pull_keys_secret, pusher_secrets
        self.index, self.informer = index, informer

    def pull_keys(self) -> list[bytes]:
        data = self.secrets.data.get(self.pull_keys_secret, {})
        return [data[k] for k in pullcreds.KEY_FIELDS if data.get(k)]

    def pusher_password(self, component: str) -> str | None:
        name = self.pusher_secrets.get(component)
        raw = self.secrets.data.get(name, {}).get("credentials.yaml") if name else None
        if not raw:
            return None
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError:
            return None
        if not isinstance(doc, dict) or doc.get("username") != component or not doc.get("password"):
            return None
        return str(doc["password"])

    def ready(self, namespace: str) -> frozenset[str]:
        return self.index.ready(namespace)

    def synced(self) -> bool:
        return self.secrets.synced.is_set() and (self.informer is None or self.informer.synced.is_set())
