"""An in-memory view of the cluster's Artifacts, read by the request path without I/O.

Fed by the shared :class:`~cluster_registry.kubeio.Informer` (list, then watch; relist on 410 Gone
and on errors), whose events arrive on the event loop that also serves requests: no lock needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster_registry import api
from cluster_registry.kubeio import Informer, Kube

@dataclass(frozen=True)
class ArtifactState:
    name: str
    phase: str
    owner_uids: frozenset[str]
    pull_secrets: frozenset[str]
    owners: tuple[dict[str, str], ...]  # spec.owners as stored
    resource_version: str
    digest: str = ""  # status.digest: what the copy or the upstream check verified for this namespace

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
        digest=str((obj.get("status") or {}).get("digest") or ""),
    )


class ArtifactView:
    """Readiness of Artifacts per (namespace, normalised source); ``synced`` after the first list.

    ``on_deleted(namespace, source)``, when set, is called for every Artifact deleted, so that pods
    still using its image record it again.
    """

    def __init__(self, kube: Kube | None) -> None:
        self._kube = kube
        self._items: dict[tuple[str, str], ArtifactState] = {}
        self._informer: Informer | None = None
        self.on_deleted: Callable[[str, str], None] | None = None

    # -- the request path: dict lookups only
    def is_ready(self, namespace: str, source: str) -> bool:
        state = self._items.get((namespace, source))
        return state is not None and state.phase == "Ready"

    def digest(self, namespace: str, source: str) -> str:
        state = self._items.get((namespace, source))
        return state.digest if state is not None and state.phase == "Ready" else ""

    def get(self, namespace: str, source: str) -> ArtifactState | None:
        return self._items.get((namespace, source))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def synced(self) -> bool:
        """Offline (no API server), nothing is Ready, and that is the whole truth."""
        return self._kube is None or (self._informer is not None and self._informer.synced.is_set())

    def start(self) -> None:
        """Start the informer (on the running event loop, where its events are applied)."""
        if self._kube is None or self._informer is not None:
            return
        self._informer = Informer(self._kube, api.ARTIFACTS, asyncio.get_running_loop(), self.apply)
        self._informer.start()

    def stop(self) -> None:
        if self._informer is not None:
            self._informer.stop()

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """One event: ADDED, MODIFIED or DELETED (a relist reports vanished objects as DELETED)."""
        keyed = state_of(obj)
        if keyed is None:
            return
        key, state = keyed
        if kind == "DELETED":
            current = self._items.get(key)
            if current is not None and current.name == state.name:
                del self._items[key]
                if self.on_deleted is not None:
                    self.on_deleted(*key)
        else:
            self._items[key] = state

    # for tests: a view fed by hand
    @classmethod
    def static(cls, items: list[dict[str, Any]]) -> ArtifactView:
        view = cls(None)
        for obj in items:
            view.apply("ADDED", obj)
        return view
