"""Read the distribution filesystem driver's tree (``<root>/docker/registry/v2``): usage and inventory.

Layout (distribution's ``registry/storage/paths.go``)::

    blobs/sha256/<2 hex>/<64 hex>/data                          every blob and manifest's bytes
    repositories/<name>/_manifests/revisions/sha256/<hex>/link  a manifest in that repository
    repositories/<name>/_manifests/tags/<tag>/current/link      what a tag points to
    repositories/<name>/_layers/sha256/<hex>/link               a blob linked into the repository

Read-only: deletes go through the registry API, the sweep through ``registry garbage-collect`` (or
``sweep``'s renames of what it judged unreferenced).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

from cluster_registry.gc.select import Manifest, parse_manifest

V2 = Path("docker/registry/v2")


@dataclass(frozen=True)
class Usage:
    bytes: int
    blobs: int


def v2_root(storage_root: str | Path) -> Path:
    return Path(storage_root) / V2


def blob_path(storage_root: str | Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return v2_root(storage_root) / "blobs" / algo / hexd[:2] / hexd / "data"


def blob_sizes(storage_root: str | Path) -> dict[str, int]:
    """digest -> size of every blob (manifests included) in the store."""
    out: dict[str, int] = {}
    blobs = v2_root(storage_root) / "blobs"
    for algo in _scandirs(blobs):
        for prefix in _scandirs(Path(algo.path)):
            for entry in _scandirs(Path(prefix.path)):
                try:
                    out[f"{algo.name}:{entry.name}"] = os.stat(os.path.join(entry.path, "data")).st_size
                except FileNotFoundError:
                    continue  # a blob directory being written or swept
    return out


def usage(storage_root: str | Path) -> Usage:
    """What the registry stores: the sum of its blob sizes (not what the volume's filesystem says)."""
    sizes = blob_sizes(storage_root)
    return Usage(sum(sizes.values()), len(sizes))


def _scandirs(path: Path | str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    yield from entries


def has_repositories(storage_root: str | Path) -> bool:
    """False for a registry that has never stored an image (distribution's sweep fails on it)."""
    return (v2_root(storage_root) / "repositories").is_dir()


def repositories(storage_root: str | Path) -> Iterator[str]:
    """Every repository name (a directory holding ``_manifests``, or only ``_layers``: blobs uploaded,
    no manifest yet)."""
    base = v2_root(storage_root) / "repositories"

    def walk(path: Path, prefix: str) -> Iterator[str]:
        entries = list(_scandirs(path))
        if any(e.name in ("_manifests", "_layers") for e in entries):
            yield prefix
        for entry in entries:
            if not entry.name.startswith("_"):
                yield from walk(Path(entry.path), f"{prefix}/{entry.name}" if prefix else entry.name)

    yield from sorted(walk(base, ""))


def _read_link(path: Path) -> tuple[str, float] | None:
    try:
        return path.read_text().strip(), path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_blob(storage_root: str | Path, digest: str) -> bytes | None:
    return _read(blob_path(storage_root, digest))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def inventory(storage_root: str | Path) -> list[Manifest]:
    """Every manifest of every repository, with its tags, media type, children and push time."""
    out: list[Manifest] = []
    repo_base = v2_root(storage_root) / "repositories"
    cache: dict[str, bytes | None] = {}
    for repo in repositories(storage_root):
        mdir = repo_base / repo / "_manifests"
        tags: dict[str, set[str]] = {}
        for tag in _scandirs(mdir / "tags"):
            link = _read_link(Path(tag.path) / "current" / "link")
            if link:
                tags.setdefault(link[0], set()).add(tag.name)
        for algo in _scandirs(mdir / "revisions"):
            for rev in _scandirs(Path(algo.path)):
                link = _read_link(Path(rev.path) / "link")
                if not link:
                    continue
                digest, mtime = link
                if digest not in cache:
                    cache[digest] = _read_blob(storage_root, digest)
                pushed_at = datetime.fromtimestamp(mtime, timezone.utc)
                out.append(parse_manifest(repo, digest, cache[digest], tags=frozenset(tags.get(digest, ())), pushed_at=pushed_at)[0])
    return out


def _mtime(path: str | Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None


def _new_entries(directory: str, since: float, *, prune: bool) -> Iterator[str]:
    """``<algo>:<hex>`` of each ``<algo>/<hex>/link`` under ``directory`` written at or after ``since``.
    With ``prune``, an ``<algo>`` directory older than ``since`` is skipped with one stat (an entry
    added or removed under it moves its mtime). Revisions cannot be pruned so: distribution's delete
    removes only the ``link`` file, and pushing that manifest again writes it into the old entry."""
    for algo in _scandirs(directory):
        if prune and (_mtime(algo.path) or 0) < since:
            continue
        for entry in _scandirs(algo.path):  # plain strings: this runs inside the window, per revision
            # the link's own mtime: a delete (the soft delete just before the mark) moves the entry's
            if (_mtime(os.path.join(entry.path, "link")) or 0) >= since:
                yield f"{algo.name}:{entry.name}"


def referenced_since(storage_root: str | Path, since: float, aside: Mapping[str, str] | None = None) -> set[str]:
    """Every digest that something written into the repositories at or after ``since`` (the storage's
    clock: file mtimes) names: a manifest revision linked since then, with everything it references
    (platform manifests followed), and each blob linked into a repository since then (an upload or
    mount whose manifest may still be on its way). Costs a stat per repository and per manifest
    revision and a read per new manifest. A blob linked again into an entry emptied earlier is not
    seen: as with distribution's own locked sweep, an upload whose manifest is not pushed before the
    window may lose that blob. ``aside``: digest -> the directory a blob was renamed to (GC's
    set-aside), read when the blob is not in its place.
    """
    base = str(v2_root(storage_root) / "repositories")
    out: set[str] = set()
    pending: list[str] = []
    for repo in repositories(storage_root):
        out.update(_new_entries(f"{base}/{repo}/_layers", since, prune=True))
        pending += _new_entries(f"{base}/{repo}/_manifests/revisions", since, prune=False)
    read: set[str] = set()
    while pending:  # manifests, and the platform manifests their indexes name
        digest = pending.pop()
        if digest in read:
            continue
        read.add(digest)
        out.add(digest)
        body = _read_blob(storage_root, digest)
        if body is None and aside and digest in aside:
            body = _read(Path(aside[digest]) / "data")
        if body is None:
            continue
        _, info = parse_manifest("", digest, body)
        out.update(d["digest"] for d in info.blobs)
        if info.subject:
            out.add(info.subject["digest"])
        pending += [c["digest"] for c in info.children]
    return out
