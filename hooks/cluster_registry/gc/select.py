"""GC selection, the pure core: which manifests and Artifacts to delete, and why the rest stay.

No I/O; the caller passes what the registry holds, what the cluster holds and ``now``.

A manifest (one repository, one digest) is **kept** when any of these holds:

- ``pod``: a live pod names it: a container image (source or rewritten reference) or a running
  container's ``imageID``. Pods that are terminating or finished still count while they exist.
- ``workload``: the pod template of a live workload names it: Deployment, ReplicaSet (also scaled to
  zero: rollback history), StatefulSet, DaemonSet, ReplicationController, Job, CronJob, or a
  ControllerRevision (a StatefulSet's or DaemonSet's rollback history). So a CronJob keeps its images
  between runs, a pod going down dereferences nothing, and deleting a Deployment's old ReplicaSet
  dereferences that revision's image even though the Deployment (the recorded top owner) lives on.
- ``owner``: an Artifact for it records an owner that still exists (by uid) and is of a kind
  without a pod template GC can read (a custom controller, say); the built-in workload kinds are
  judged by their templates above, which is stricter and exact.
- ``component``: it belongs to a Component (listed in its spec or status, or an Artifact labelled
  with a Component).
- ``sideloaded``: an Artifact for it was side loaded from a drive (label
  ``clusterregistry.io/loaded-by=sideload``): a disconnected site could not copy it again.
- ``grace``: an Artifact for it was synced (``status.lastSyncTime``; creation time while it has
  never synced) within the grace period, or the registry received it within the grace period.
- ``index``: it is a platform manifest of a kept index in the same repository.
- ``attached``: it is attached to a kept manifest in the same repository: an OCI 1.1 referrer
  (``subject``), or a cosign-style ``sha256-<hex>.sig|.att|.sbom`` / referrers-fallback
  ``sha256-<hex>`` tag. Attached artifacts go when their subject goes.

Every other manifest is deleted: indexes before their children so no index ever names a missing
manifest. An Artifact is deleted when nothing keeps it and its image is deleted in this run or is not
in the registry at all.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable

from cluster_registry import reference
from cluster_registry.errors import InvalidReferenceError
from cluster_registry.oci import media
from cluster_registry.oci.errors import UnsupportedManifestError

# Kinds whose pod template GC reads (their liveness alone keeps nothing: their template does).
TEMPLATED_KINDS = frozenset(
    {"Pod", "Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "ReplicationController", "Job",
     "CronJob", "ControllerRevision"}
)  # fmt: skip
_IMAGE_ID_PREFIXES = ("docker-pullable://", "docker://")
_ATTACHED_TAG = re.compile(r"sha256-([0-9a-f]{64})(?:\.[A-Za-z0-9_.-]+)?")


@dataclass(frozen=True)
class Manifest:
    """One manifest in the registry: ``repository`` is the local repository path."""

    repository: str
    digest: str
    media_type: str = ""
    tags: frozenset[str] = frozenset()
    children: tuple[str, ...] = ()  # an index's platform manifests (digests)
    pushed_at: datetime | None = None  # when the registry last received it (revision link mtime)
    subject: str | None = None  # OCI 1.1: the manifest this one is attached to

    @property
    def key(self) -> tuple[str, str]:
        return (self.repository, self.digest)

    @property
    def is_index(self) -> bool:
        return self.media_type in media.INDEXES or bool(self.children)

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}"


def parse_manifest(
    repository: str,
    digest: str,
    body: bytes | None,
    *,
    tags: frozenset[str] = frozenset(),
    pushed_at: datetime | None = None,
    content_type: str | None = None,
) -> tuple[Manifest, media.ManifestInfo]:
    """The Manifest GC sees for ``body`` (None: unreadable), and the blobs and children it names.

    Both inventories (the filesystem's and the registry API's) read manifests through this; a body
    that does not parse, or of a type the client does not copy (schema 1), names nothing.
    """
    info = media.ManifestInfo("")
    if body is not None:
        try:
            info = media.ManifestInfo(media.detect_media_type(body, content_type))
            info = media.inspect(body, info.media_type)
        except UnsupportedManifestError:
            pass
    subject = info.subject["digest"] if info.subject else None
    children = tuple(c["digest"] for c in info.children)
    return Manifest(repository, digest, info.media_type, tags, children, pushed_at, subject), info


@dataclass(frozen=True)
class Owner:
    api_version: str
    kind: str
    name: str
    uid: str


@dataclass(frozen=True)
class Artifact:
    namespace: str
    name: str
    source: str  # spec.sourceArtifact (normalised)
    uid: str = ""
    resource_version: str = ""
    digest: str | None = None  # status.digest
    owners: tuple[Owner, ...] = ()
    component: str | None = None  # the clusterregistry.io/component label
    sideloaded: bool = False  # labelled clusterregistry.io/loaded-by=sideload
    last_sync: datetime | None = None
    created: datetime | None = None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Workload:
    """A live object that names images: a pod (spec and status imageIDs) or a pod template holder."""

    kind: str
    namespace: str
    name: str
    uid: str
    images: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Component:
    namespace: str
    name: str
    images: tuple[str, ...] = ()  # spec.images and status.images[].sourceArtifact


@dataclass(frozen=True)
class Inputs:
    manifests: tuple[Manifest, ...]
    artifacts: tuple[Artifact, ...]
    workloads: tuple[Workload, ...]
    components: tuple[Component, ...]
    live_uids: frozenset[str]  # every object uid that exists (owners of any kind)
    now: datetime
    grace: timedelta
    local_hosts: frozenset[str] = frozenset()  # how pods name the cluster registry; empty: guess


@dataclass
class Selection:
    keep: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # manifest key -> reasons
    delete_manifests: list[Manifest] = field(default_factory=list)  # indexes first
    delete_waves: list[list[Manifest]] = field(default_factory=list)  # wave n+1 after wave n: parents first
    delete_artifacts: list[tuple[Artifact, str]] = field(default_factory=list)  # with the reason
    kept_artifacts: dict[str, list[str]] = field(default_factory=dict)  # "ns/name" -> reasons
    artifact_keys: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # "ns/name" -> manifests

    def reasons(self, repository: str, digest: str) -> list[str]:
        return self.keep.get((repository, digest), [])


Target = tuple[str, str | None, str | None]  # local repository, tag, digest


def targets(image: str, local_hosts: frozenset[str]) -> list[Target]:
    """The local repositories (with tag and digest) an image string may denote.

    A rewritten reference (host in ``local_hosts``) maps back through :func:`reference.source_of`;
    a source maps through :func:`reference.local_repository`. With no ``local_hosts`` known, both
    readings are returned (a source's repository path never collides with a local one: local ones
    start with an encoded registry host).
    """
    text = image
    for prefix in _IMAGE_ID_PREFIXES:
        text = text.removeprefix(prefix)
    try:
        ref = reference.parse(text)
    except InvalidReferenceError:
        return []
    out: list[Target] = []
    if local_hosts and any(reference.is_local(ref, h) for h in local_hosts):
        src = reference.source_of(ref, ref.host)
        if src is not None:
            out.append((reference.local_repository(src), src.tag, src.digest))
        return out
    out.append((reference.local_repository(ref), ref.tag, ref.digest))
    if not local_hosts and "/" in ref.repository:
        out.append((ref.repository, ref.tag, ref.digest))
    return out


def subjects(m: Manifest) -> set[str]:
    """The digests ``m`` is attached to (its OCI ``subject``, or a cosign-style tag's digest)."""
    out = {m.subject} if m.subject else set()
    for t in m.tags:
        if mt := _ATTACHED_TAG.fullmatch(t):
            out.add(f"sha256:{mt.group(1)}")
    return out


class _Index:
    def __init__(self, manifests: Iterable[Manifest]) -> None:
        self.by_key: dict[tuple[str, str], Manifest] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.attached: defaultdict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for m in manifests:
            self.by_key[m.key] = m
            for t in m.tags:
                self.tags[(m.repository, t)] = m.digest
            for subject in subjects(m):
                self.attached[(m.repository, subject)].append(m.key)

    def resolve(self, target: Target) -> list[tuple[str, str]]:
        repo, tag, digest = target
        out = []
        if digest and (repo, digest) in self.by_key:
            out.append((repo, digest))
        if tag and (repo, tag) in self.tags:
            out.append((repo, self.tags[(repo, tag)]))
        return out


def _recent(t: datetime | None, inputs: Inputs) -> bool:
    return t is not None and inputs.now - t < inputs.grace


def artifact_reasons(a: Artifact, inputs: Inputs, templated_uids: frozenset[str]) -> list[str]:
    """Why an Artifact keeps its image by itself (owner, component, grace); empty if it does not."""
    reasons = []
    if a.component:
        reasons.append(f"component {a.namespace}/{a.component}")
    if a.sideloaded:
        reasons.append(f"sideloaded: Artifact {a} has no source to copy it from again")
    synced = a.last_sync or a.created
    if _recent(synced, inputs):
        reasons.append(f"grace: Artifact {a} synced {synced:%Y-%m-%dT%H:%M:%SZ}")
    for o in a.owners:
        if o.uid in inputs.live_uids and o.kind not in TEMPLATED_KINDS and o.uid not in templated_uids:
            reasons.append(f"owner {o.kind} {a.namespace}/{o.name}")
    return reasons


def select(inputs: Inputs) -> Selection:
    """Decide what GC deletes (see the module docstring for the rules)."""
    idx = _Index(inputs.manifests)
    sel = Selection()
    keep: defaultdict[tuple[str, str], list[str]] = defaultdict(list)

    def mark(image: str, why: str) -> list[tuple[str, str]]:
        hit = []
        for t in targets(image, inputs.local_hosts):
            for key in idx.resolve(t):
                if why not in keep[key]:
                    keep[key].append(why)
                hit.append(key)
        return hit

    templated_uids = frozenset(w.uid for w in inputs.workloads if w.kind in TEMPLATED_KINDS)
    for w in inputs.workloads:
        why = f"pod {w.namespace}/{w.name}" if w.kind == "Pod" else f"workload {w}"
        for image in w.images:
            mark(image, why)
    for c in inputs.components:
        for image in c.images:
            mark(image, f"component {c.namespace}/{c.name}")

    artifact_keys: dict[Artifact, list[tuple[str, str]]] = {}
    for a in inputs.artifacts:
        keys = []
        for t in targets(a.source, frozenset()):
            keys += idx.resolve(t)
            if a.digest:
                keys += idx.resolve((t[0], None, a.digest))
        artifact_keys[a] = list(dict.fromkeys(keys))
        sel.artifact_keys[str(a)] = artifact_keys[a]
        reasons = artifact_reasons(a, inputs, templated_uids)
        for key in artifact_keys[a]:
            for why in reasons:
                if why not in keep[key]:
                    keep[key].append(why)
        if reasons:
            sel.kept_artifacts[str(a)] = reasons

    for m in inputs.manifests:
        if _recent(m.pushed_at, inputs):
            keep[m.key].append(f"grace: pushed {m.pushed_at:%Y-%m-%dT%H:%M:%SZ}")

    # A kept index keeps its platform manifests (children of children too, for nested indexes), and
    # a kept manifest keeps what is attached to it (signatures, attestations, SBOMs, referrers).
    stack = [k for k in keep if k in idx.by_key and keep[k]]
    while stack:
        parent = idx.by_key[stack.pop()]
        linked = [((parent.repository, c), f"index {parent.digest[:19]}") for c in parent.children]
        linked += [(k, f"attached to {parent.digest[:19]}") for k in idx.attached.get(parent.key, ())]
        for key, why in linked:
            if key in idx.by_key:
                if not keep[key]:
                    stack.append(key)
                if why not in keep[key]:
                    keep[key].append(why)

    sel.keep = {k: v for k, v in keep.items() if v and k in idx.by_key}
    doomed = [m for m in inputs.manifests if m.key not in sel.keep]
    # Parents before children: an index is deleted before the platform manifests it names.
    depth = _depths(idx)
    doomed.sort(key=lambda m: (depth.get(m.key, 0), m.repository, m.digest))
    sel.delete_manifests = doomed
    for m in doomed:
        level = depth.get(m.key, 0)
        while len(sel.delete_waves) <= level:
            sel.delete_waves.append([])
        sel.delete_waves[level].append(m)
    doomed_keys = {m.key for m in doomed}

    for a in inputs.artifacts:
        if str(a) in sel.kept_artifacts:
            continue
        keys = artifact_keys[a]
        in_use = [why for k in keys for why in keep.get(k, [])]
        if in_use:
            sel.kept_artifacts[str(a)] = list(dict.fromkeys(in_use))
        elif not keys:
            sel.delete_artifacts.append((a, "unreferenced; its image is not in the registry"))
        elif all(k in doomed_keys for k in keys):
            sel.delete_artifacts.append((a, "unreferenced: no live pod, workload, owner or component names it"))
    return sel


def _depths(idx: _Index) -> dict[tuple[str, str], int]:
    """0 for top-level manifests, parent depth + 1 for platform manifests."""
    depth: dict[tuple[str, str], int] = {}

    def visit(key: tuple[str, str], d: int, seen: frozenset[tuple[str, str]]) -> None:
        if key in seen or depth.get(key, -1) >= d:
            return
        depth[key] = d
        m = idx.by_key[key]
        for c in m.children:
            ck = (m.repository, c)
            if ck in idx.by_key:
                visit(ck, d + 1, seen | {key})

    children = {(m.repository, c) for m in idx.by_key.values() for c in m.children}
    for key in idx.by_key:
        if key not in children:
            visit(key, 0, frozenset())
    return depth
