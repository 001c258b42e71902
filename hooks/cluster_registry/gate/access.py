"""Who may do what in the cluster registry: the token service's decisions (pure, no I/O).

distribution (``auth: token``) asks its realm for a token naming the scopes a request needs
(``repository:<name>:pull,push``, ``repository:<name>:delete``, ``registry:catalog:*``) and checks the
signed grant itself; these functions decide that grant.

- **Pushers** (a credential per component: the artifact reconciler, sideload, GC) get what their
  role allows: the reconcilers and sideload ``pull``/``push``, GC ``pull``/``delete`` and the catalog.
  While GC holds its write lock (or its state is unknown) a request for ``push`` is refused as a whole:
  the caller is told to retry after the lock (``Decision.locked``), never handed a read-only token it
  would mistake for a permission problem.
- **A namespace** (its pull credential, ``pullcreds``) gets ``pull`` on a repository only if an
  Artifact in that namespace whose source maps to it is Ready; never push, delete or the catalog.
- **Anonymous** callers get nothing, unless the operator chose ``registryAccess: shared`` (AOSM's
  behaviour): then anyone, anonymous too, gets ``pull`` on every repository and the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from cluster_registry import reference
from cluster_registry.errors import InvalidReferenceError

# What each component's push credential may do (its username is the component's name).
PUSHERS: Mapping[str, frozenset[str]] = {
    "artifact-reconciler": frozenset({"pull", "push"}),
    "sideload": frozenset({"pull", "push"}),
    "gc": frozenset({"pull", "delete", "catalog"}),
}
WRITES = frozenset({"push"})  # held off by the GC lock; GC's own deletes happen before it locks


class Kind(str, Enum):
    ANONYMOUS = "anonymous"
    NAMESPACE = "namespace"
    PUSHER = "pusher"


@dataclass(frozen=True)
class Caller:
    kind: Kind
    name: str = ""  # the namespace or the component

    def __str__(self) -> str:
        return self.kind.value if self.kind is Kind.ANONYMOUS else f"{self.kind.value}:{self.name}"


ANONYMOUS = Caller(Kind.ANONYMOUS)


@dataclass(frozen=True)
class Scope:
    """One requested or granted ``type:name:actions`` (a JWT ``access`` entry)."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes as clients send them (several per parameter, space-separated). Repository names may
    hold a ``:`` (``host:port/repo``), so the actions are after the last one; malformed ones are dropped."""
    out: list[Scope] = []
    for value in values:
        for item in value.split():
            kind, sep, rest = item.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if sep and sep2 and kind and name and actions:
                out.append(Scope(kind, name, tuple(a for a in actions.split(",") if a)))
    return out


@dataclass(frozen=True)
class Decision:
    grants: tuple[Scope, ...]
    locked: bool = False  # a push was asked for while writes are held off: retry after the lock


def _allowed(caller: Caller, scope: Scope, *, shared: bool, ready: frozenset[str]) -> frozenset[str]:
    if caller.kind is Kind.PUSHER:
        role = PUSHERS.get(caller.name, frozenset())
        if scope.type == "registry":
            return frozenset({"*"}) if scope.name == "catalog" and "catalog" in role else frozenset()
        return role - {"catalog"} if scope.type == "repository" else frozenset()
    if scope.type == "registry":
        return frozenset({"*"}) if shared and scope.name == "catalog" else frozenset()
    if scope.type != "repository":
        return frozenset()
    if shared or (caller.kind is Kind.NAMESPACE and scope.name in ready):
        return frozenset({"pull"})
    return frozenset()


def decide(caller: Caller, scopes: Iterable[Scope], *, shared: bool, ready: frozenset[str] = frozenset(),
           writes_open: bool = True) -> Decision:
    """The grant for ``caller`` asking for ``scopes``. ``ready``: the repositories the caller's namespace
    has a Ready Artifact for; ``writes_open``: the GC lock is certainly free."""
    grants: list[Scope] = []
    for s in scopes:
        allowed = _allowed(caller, s, shared=shared, ready=ready)
        granted = tuple(a for a in s.actions if a in allowed)
        if not writes_open and WRITES & set(granted):
            return Decision((), locked=True)
        if granted:
            grants.append(Scope(s.type, s.name, granted))
    return Decision(tuple(grants))


def repository_of(source: str) -> str | None:
    """The cluster registry's repository holding an Artifact's ``sourceArtifact``, None if unparsable."""
    try:
        return reference.local_repository(reference.parse(source))
    except InvalidReferenceError:
        return None


class ReadyIndex:
    """Which repositories each namespace has a Ready Artifact for, kept from Artifact events."""

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[str, str]] = {}  # "ns/name" -> (namespace, repository)
        self._count: dict[str, dict[str, int]] = {}  # namespace -> repository -> Ready Artifacts

    def update(self, event: str, obj: Mapping[str, object]) -> None:
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        old = self._by_key.pop(key, None)
        if old is not None:
            repos = self._count[old[0]]
            repos[old[1]] -= 1
            if not repos[old[1]]:
                del repos[old[1]]
        entry = None if event == "DELETED" else ready_entry(obj)
        if entry is not None:
            self._by_key[key] = entry
            repos = self._count.setdefault(entry[0], {})
            repos[entry[1]] = repos.get(entry[1], 0) + 1

    def ready(self, namespace: str) -> frozenset[str]:
        return frozenset(self._count.get(namespace, ()))


def ready_entry(obj: Mapping[str, object]) -> tuple[str, str] | None:
    """(namespace, repository) of an Artifact whose condition Ready is True, else None."""
    meta, spec, status = (obj.get(k) for k in ("metadata", "spec", "status"))
    if not isinstance(meta, dict) or not isinstance(spec, dict) or not isinstance(status, dict):
        return None
    conditions = status.get("conditions")
    if not isinstance(conditions, list) or not any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    ):
        return None
    source = spec.get("sourceArtifact")
    repo = repository_of(source) if isinstance(source, str) else None
    namespace = meta.get("namespace")
    return (namespace, repo) if repo and isinstance(namespace, str) else None
