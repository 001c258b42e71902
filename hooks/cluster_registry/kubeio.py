"""The package's Kubernetes I/O: custom objects, Secrets, Events, and the one list+watch loop (``Informer``).

Synchronous (the kubernetes client is); asyncio callers go through ``asyncio.to_thread``. Clients are
made by :mod:`cluster_registry.kube`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from cluster_registry.api import GROUP, VERSION

log = logging.getLogger(__name__)

Obj = dict[str, Any]


def key_of(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Kube:
    def __init__(self, api: client.ApiClient, timeout: tuple[float, float] = (10.0, 60.0)) -> None:
        self.api = api
        # (connect, read) seconds for every request: a half-open connection must not stall a worker
        self.timeout = timeout
        # Any: the client's models are typed, but bodies here are plain dicts (custom objects, patches)
        self.custom: Any = client.CustomObjectsApi(api)
        self.core: Any = client.CoreV1Api(api)
        self.events: Any = client.EventsV1Api(api)

    # -- custom objects -----------------------------------------------------------------------------

    def list(self, plural: str, label_selector: str | None = None, namespace: str | None = None) -> tuple[list[Obj], str]:
        kwargs: dict[str, Any] = {"label_selector": label_selector} if label_selector else {}
        if namespace:
            resp = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, _request_timeout=self.timeout, **kwargs
            )
        else:
            resp = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=self.timeout, **kwargs)
        return list(resp.get("items") or []), str((resp.get("metadata") or {}).get("resourceVersion") or "")

    def watch(
        self, plural: str, resource_version: str, label_selector: str | None, timeout: int, stopper: Callable[[Any], None],
        namespace: str | None = None,
    ) -> Iterator[tuple[str, Obj]]:
        """Events after ``resource_version``; raises ApiException(410) when it is too old."""
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        stopper(w)
        kwargs: dict[str, Any] = {
            "resource_version": resource_version,
            "timeout_seconds": timeout,
            "allow_watch_bookmarks": True,
            "_request_timeout": timeout + 30,
        }
        if label_selector:
            kwargs["label_selector"] = label_selector
        if namespace:
            stream = w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural, **kwargs)
        else:
            stream = w.stream(self.custom.list_cluster_custom_object, GROUP, VERSION, plural, **kwargs)
        for event in stream:
            yield str(event["type"]), event["raw_object"]

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        try:
            obj: Obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=self.timeout
            )
            return obj
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create(self, plural: str, namespace: str, body: Obj) -> Obj:
        obj: Obj = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body, _request_timeout=self.timeout
        )
        return obj

    def patch(self, plural: str, namespace: str, name: str, patch: Obj) -> Obj:
        """A JSON merge patch of the object (metadata/spec)."""
        obj: Obj = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, patch, _request_timeout=self.timeout
        )
        return obj

    def patch_status(self, plural: str, namespace: str, name: str, status_patch: Obj) -> Obj:
        """A JSON merge patch of ``status`` through the status subresource."""
        obj: Obj = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status_patch}, _request_timeout=self.timeout
        )
        return obj

    def delete(self, plural: str, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=self.timeout
            )
        except ApiException as err:
            if err.status != 404:
                raise

    def server_version(self) -> str | None:
        """The API server's version as ``v1.35.4`` (for ``helm template --kube-version``), or None."""
        try:
            info = client.VersionApi(self.api).get_code(_request_timeout=self.timeout)
        except Exception:  # noqa: BLE001 - unknown version: helm's default applies
            return None
        match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", str(getattr(info, "git_version", "") or ""))
        if not match or match.group(1) == "0":
            major, minor = str(getattr(info, "major", "")), re.sub(r"\D", "", str(getattr(info, "minor", "")))
            return f"v{major}.{minor}.0" if major.isdigit() and minor and major != "0" else None
        return f"v{match.group(1)}.{match.group(2)}.{match.group(3)}"

    # -- secrets and events ---------------------------------------------------------------------------

    def docker_config(self, namespace: str, name: str) -> bytes | None:
        """The docker config JSON held by a pull Secret (``.dockerconfigjson`` or ``.dockercfg``)."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        data = secret.data or {}
        for field in (".dockerconfigjson", ".dockercfg"):
            if data.get(field):
                return base64.b64decode(data[field])
        return None

    def event(
        self,
        obj: Obj,
        type_: str,
        reason: str,
        note: str,
        *,
        action: str,
        controller: str,
        instance: str,
    ) -> None:
        """Record an events.k8s.io/v1 Event about ``obj`` (best effort: failures are logged)."""
        meta = obj.get("metadata") or {}
        now = dt.datetime.now(dt.timezone.utc)
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name', 'x')[:200]}.{uuid.uuid4().hex[:12]}",
                "namespace": meta.get("namespace"),
            },
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "type": type_,
            "reason": reason,
            "note": note[:1024],
            "action": action,
            "reportingController": controller,
            "reportingInstance": instance[:128],
            "regarding": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
        }
        try:
            self.events.create_namespaced_event(meta.get("namespace"), body, _request_timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - an Event is never worth failing a reconcile for
            log.warning("could not record event %s on %s: %s", reason, key_of(obj), getattr(err, "status", type(err).__name__))


class Informer:
    """List then watch one resource kind cluster-wide on a thread; relist on 410 Gone and on errors.

    ``on_event(type, obj)`` is called on the asyncio loop for ``ADDED``/``MODIFIED``/``DELETED``;
    after every (re)list, objects that vanished meanwhile are reported ``DELETED`` and every listed
    object ``ADDED``. ``cache`` holds the latest object per ``namespace/name``.
    """

    def __init__(
        self,
        kube: Kube,
        plural: str,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[str, Obj], None],
        label_selector: str | None = None,
        watch_timeout: int = 240,
        namespace: str | None = None,
    ) -> None:
        self.namespace = namespace  # None: every namespace
        self.kube = kube
        self.plural = plural
        self.loop = loop
        self.on_event = on_event
        self.label_selector = label_selector
        self.watch_timeout = watch_timeout
        self.cache: dict[str, Obj] = {}
        self.synced = threading.Event()
        self.last_contact = 0.0
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _emit(self, type_: str, obj: Obj) -> None:
        if not self._stop.is_set():
            self.loop.call_soon_threadsafe(self.on_event, type_, obj)

    def _relist(self) -> str:
        items, rv = self.kube.list(self.plural, self.label_selector, self.namespace)
        fresh = {key_of(o): o for o in items}
        for key in set(self.cache) - set(fresh):
            self._emit("DELETED", self.cache.pop(key))
        self.cache.clear()
        self.cache.update(fresh)
        for obj in items:
            self._emit("ADDED", obj)
        self.synced.set()
        self.last_contact = time.monotonic()
        log.debug("listed %d %s", len(items), self.plural)
        return rv

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                rv = self._relist()
                failures = 0
                while not self._stop.is_set():
                    for type_, obj in self.kube.watch(
                        self.plural, rv, self.label_selector, self.watch_timeout, self._set_watch, self.namespace
                    ):
                        self.last_contact = time.monotonic()
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = str(new_rv)
                        if type_ == "BOOKMARK":
                            continue
                        key = key_of(obj)
                        if type_ == "DELETED":
                            self.cache.pop(key, None)
                        else:
                            self.cache[key] = obj
                        self._emit(type_, obj)
                        if self._stop.is_set():
                            return
                    self.last_contact = time.monotonic()  # the watch ended by its timeout: resume from rv
            except ApiException as err:
                if err.status == 410:
                    log.info("%s watch expired (410 Gone): relisting", self.plural)
                    continue
                failures += 1
                log.warning("%s list/watch failed: API %s", self.plural, err.status)
            except Exception as err:  # noqa: BLE001 - connection errors: back off and relist
                if self._stop.is_set():
                    return
                failures += 1
                log.warning("%s list/watch failed: %s", self.plural, type(err).__name__)
            self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)) * (0.8 + 0.4 * random.random()))

    def _set_watch(self, w: Any) -> None:
        self._watch = w
