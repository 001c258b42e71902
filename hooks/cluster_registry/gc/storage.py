"""Read the distribution filesystem driver's tree (``<root>/docker/registry/v2``): usage and inventory.

Layout (distribution's ``registry/storage/paths.go``)::

    blobs/sha256/<2 hex>/<64 hex>/data                          every blob and manifest's bytes
    repositories/<name>/_manifests/revisions/sha256/<hex>/link  a manifest in that repository
    repositories/<name>/_manifests/tags/<tag>/current/link      what a tag points to
    repositories/<name>/_layers/sha256/<hex>/link               a blob linked into the repository

Read-only: deletes go through the registry API, the sweep through ``registry garbage-collect``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

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


def _scandirs(path: Path) -> Iterator[os.DirEntry[str]]:
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
    """Every repository name (a directory holding ``_manifests``)."""
    base = v2_root(storage_root) / "repositories"

    def walk(path: Path, prefix: str) -> Iterator[str]:
        for entry in _scandirs(path):
            if entry.name == "_manifests":
                yield prefix
            elif not entry.name.startswith("_"):
                yield from walk(Path(entry.path), f"{prefix}/{entry.name}" if prefix else entry.name)

    yield from sorted(walk(base, ""))


def _read_link(path: Path) -> tuple[str, float] | None:
    try:
        return path.read_text().strip(), path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_blob(storage_root: str | Path, digest: str) -> bytes | None:
    try:
        return blob_path(storage_root, digest).read_bytes()
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
