"""An in-memory, watch-fed view of the cluster's Artifacts, read by the request path without I/O.

A daemon thread lists every Artifact, then watches from the list's resourceVersion; a watch that
expires (410 Gone) or fails makes it list again (after a back-off on errors). Readers look entries
up in a dict that the thread replaces or updates one key at a time, so no lock is needed to read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cluster_registry import api

log = logging.getLogger(__name__)


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


@dataclass(frozen=True)
class ArtifactState:
    name: str
    phase: str
    owner_uids: frozenset[str]
    pull_secrets: frozenset[str]
    owners: tuple[dict[str, str], ...]  # spec.owners as stored
    resource_version: str

    @property
    def ready(self) -> bool:
        return self.phase == api.Phase.READY.value


def state_of(obj: dict[str, Any]) -> tuple[tuple[str, str], ArtifactState] | None:
    """The view's key (namespace, source) and state for one Artifact object, None if malformed."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    source = spec.get("sourceArtifact")
    if not isinstance(source, str) or not meta.get("namespace"):
        return None
    owners = tuple(o for o in spec.get("owners") or () if isinstance(o, dict))
    return (meta["namespace"], source), ArtifactState(
        name=str(meta.get("name", "")),
        phase=str((obj.get("status") or {}).get("phase") or ""),
        owner_uids=frozenset(str(o.get("uid", "")) for o in owners),
        pull_secrets=frozenset(str(s) for s in spec.get("pullSecrets") or ()),
        owners=owners,
        resource_version=str(meta.get("resourceVersion", "")),
    )


class ArtifactSource(Protocol):
    def list(self) -> tuple[list[dict[str, Any]], str]:
        """Every Artifact and the list's resourceVersion."""

    def watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, object) pairs from ``resource_version`` on; raises Gone on 410."""


class KubeArtifactSource:
    """Artifacts in every namespace through the Kubernetes client (blocking: used from a thread)."""

    def __init__(self, api_client: Any, watch_timeout: int = 240) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.watch_timeout = watch_timeout

    def list(self) -> tuple[list[dict[str, Any]], str]:
        got: Any = self.api.list_cluster_custom_object(api.GROUP, api.VERSION, api.ARTIFACTS, _request_timeout=60)
        return list(got.get("items") or []), str(got["metadata"].get("resourceVersion", ""))

    def watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in w.stream(
                self.api.list_cluster_custom_object,
                api.GROUP,
                api.VERSION,
                api.ARTIFACTS,
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


class ArtifactView:
    """Readiness of Artifacts per (namespace, normalised source); ``synced`` after the first list."""

    def __init__(self, source: ArtifactSource | None, backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self._source = source
        self._items: dict[tuple[str, str], ArtifactState] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.relists = 0
        if source is None:  # offline: nothing is Ready, and that is the whole truth
            self._synced.set()

    # -- the request path: dict lookups only
    def is_ready(self, namespace: str, source: str) -> bool:
        state = self._items.get((namespace, source))
        return state is not None and state.phase == "Ready"

    def get(self, namespace: str, source: str) -> ArtifactState | None:
        return self._items.get((namespace, source))

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def __len__(self) -> int:
        return len(self._items)

    # -- the feeding thread
    def start(self) -> None:
        if self._source is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="artifact-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """Apply one watch event (ADDED, MODIFIED, DELETED; BOOKMARK is ignored)."""
        if kind == "BOOKMARK":
            return
        keyed = state_of(obj)
        if keyed is None:
            return
        key, state = keyed
        if kind == "DELETED":
            current = self._items.get(key)
            if current is not None and current.name == state.name:
                self._items.pop(key, None)
        else:
            self._items[key] = state

    def replace_all(self, items: list[dict[str, Any]]) -> None:
        fresh: dict[tuple[str, str], ArtifactState] = {}
        for obj in items:
            keyed = state_of(obj)
            if keyed is not None:
                fresh[keyed[0]] = keyed[1]
        self._items = fresh

    def _run(self) -> None:
        assert self._source is not None
        delay = self.backoff
        while not self._stop.is_set():
            try:
                items, rv = self._source.list()
                self.replace_all(items)
                self.relists += 1
                self._synced.set()
                delay = self.backoff
                while not self._stop.is_set():
                    for kind, obj in self._source.watch(rv):
                        if self._stop.is_set():
                            return
                        if kind == "BOOKMARK":
                            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                            continue
                        self.apply(kind, obj)
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            except Gone:
                log.info("artifact watch expired; listing again")
            except Exception as err:  # noqa: BLE001 - keep the view alive whatever the API does
                log.warning("artifact view: %s; retrying in %.0fs", err, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_backoff)
        log.debug("artifact view stopped")

    # for tests: a view fed by hand
    @classmethod
    def static(cls, items: list[dict[str, Any]]) -> ArtifactView:
        view = cls(None)
        view.replace_all(items)
        return view


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (a helper for tests and startup)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
