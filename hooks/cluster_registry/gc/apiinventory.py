"""Inventory through the registry API, for storage drivers GC cannot read directly (object storage).

Weaker than the filesystem inventory (``storage``): the API lists tags, not untagged manifests, and
gives no push times (so only Artifacts' sync times count for the grace period), and usage is the sum
of the blobs the tagged images name (garbage left by earlier runs is not counted).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any
from urllib.parse import urljoin

import aiohttp

from cluster_registry.errors import TemporaryError
from cluster_registry.gc.registry import BasicAuth
from cluster_registry.gc.select import Manifest

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


async def _paged(session: aiohttp.ClientSession, url: str, key: str) -> list[str]:
    out: list[str] = []
    next_url: str | None = url
    while next_url:
        async with session.get(next_url) as resp:
            if resp.status == 404:
                return out
            if resp.status != 200:
                raise TemporaryError(f"registry listing failed: HTTP {resp.status} for {next_url}")
            out += (await resp.json(content_type=None)).get(key) or []
            link = resp.headers.get("Link", "")
            next_url = urljoin(url, link[link.index("<") + 1 : link.index(">")]) if "<" in link else None
    return out


async def _inventory(base: str, auth: BasicAuth | None, concurrency: int) -> tuple[list[Manifest], dict[str, int]]:
    sem = asyncio.Semaphore(concurrency)
    basic = aiohttp.BasicAuth(auth.username, auth.password) if auth else None
    sizes: dict[str, int] = {}
    manifests: dict[tuple[str, str], dict[str, Any]] = {}  # key -> {media_type, tags, children}

    async def fetch(session: aiohttp.ClientSession, repo: str, ref: str, tag: str | None) -> None:
        async with sem, session.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}) as resp:
            if resp.status == 404:
                return
            if resp.status != 200:
                raise TemporaryError(f"cannot read manifest {repo}:{ref}: HTTP {resp.status}")
            body = await resp.read()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        doc = json.loads(body)
        entry = manifests.setdefault((repo, digest), {"media_type": "", "tags": set(), "children": (), "subject": None})
        if tag:
            entry["tags"].add(tag)
        if entry["media_type"]:
            return  # already read (another tag)
        entry["media_type"] = str(doc.get("mediaType") or "")
        sizes[digest] = len(body)
        children = [str(c["digest"]) for c in doc.get("manifests") or []]
        entry["children"] = tuple(children)
        subject = doc.get("subject")
        entry["subject"] = str(subject["digest"]) if isinstance(subject, dict) and subject.get("digest") else None
        for blob in ([doc["config"]] if "config" in doc else []) + list(doc.get("layers") or []):
            sizes[str(blob["digest"])] = int(blob.get("size") or 0)
        await asyncio.gather(*(fetch(session, repo, c, None) for c in children))

    async with aiohttp.ClientSession(auth=basic, timeout=aiohttp.ClientTimeout(total=120)) as session:
        repos = await _paged(session, f"{base}/v2/_catalog?n=1000", "repositories")
        for repo in repos:
            tags = await _paged(session, f"{base}/v2/{repo}/tags/list?n=1000", "tags")
            await asyncio.gather(*(fetch(session, repo, t, t) for t in tags))
    out = [
        Manifest(repo, digest, e["media_type"], frozenset(e["tags"]), e["children"], None, e["subject"])
        for (repo, digest), e in sorted(manifests.items())
    ]
    return out, sizes


def inventory_sizes(
    base_url: str, auth: BasicAuth | None = None, concurrency: int = 16
) -> tuple[list[Manifest], dict[str, int]]:
    """(every tagged manifest and its platform manifests, digest -> size of every blob they name)."""
    return asyncio.run(_inventory(base_url.rstrip("/"), auth, concurrency))


def inventory(base_url: str, auth: BasicAuth | None = None, concurrency: int = 16) -> tuple[list[Manifest], int]:
    """(every tagged manifest and its platform manifests, bytes of the blobs they name)."""
    manifests, sizes = inventory_sizes(base_url, auth, concurrency)
    return manifests, sum(sizes.values())
