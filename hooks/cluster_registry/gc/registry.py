"""GC's registry API calls, on the package's one registry client (``oci.RegistrySession``/``Repository``).

* :func:`inventory_sizes`: for storage drivers GC cannot read directly (object storage). Weaker than
  the filesystem inventory (``storage``): the API lists tags, not untagged manifests, and gives no push
  times (so only Artifacts' sync times count for the grace period), and usage is the sum of the blobs
  the tagged images name (garbage left by earlier runs is not counted).
* :func:`delete_sync`: DELETE manifests by digest, wave after wave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from cluster_registry.errors import ClusterRegistryError, ConfigError, PermanentError, WriteLockedError
from cluster_registry.gc.select import Manifest, parse_manifest
from cluster_registry.oci.auth import Credentials
from cluster_registry.oci.client import RegistryOptions, RegistrySession, Repository
from cluster_registry.oci.errors import (
    AccessDeniedError,
    AuthenticationError,
    NotFoundError,
    UnsupportedOperationError,
)


@dataclass
class DeleteOutcome:
    repository: str
    digest: str
    status: str  # deleted | absent | failed
    error: str = ""


def _session(base_url: str) -> tuple[RegistrySession, str]:
    """A session for ``base_url`` (``http://host:port`` or ``https://...``) and the registry's host."""
    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(f"the registry URL {base_url!r} must be http(s)://host[:port]")
    insecure = frozenset({url.netloc}) if url.scheme == "http" else frozenset()
    return RegistrySession(RegistryOptions(insecure_hosts=insecure)), url.netloc


async def _inventory(
    base_url: str, auth: Credentials | None, concurrency: int, untagged: Iterable[tuple[str, str]]
) -> tuple[list[Manifest], dict[str, int]]:
    sem = asyncio.Semaphore(concurrency)
    sizes: dict[str, int] = {}
    found: dict[tuple[str, str], Manifest] = {}

    async def fetch(repo: Repository, ref: str) -> Manifest | None:
        async with sem:
            try:
                got = await repo.get_manifest(ref)
            except NotFoundError:
                return None  # deleted meanwhile
        known = found.get((repo.name, got.digest))
        if known is not None:
            return known  # already read (another tag)
        entry, info = parse_manifest(repo.name, got.digest, got.body, content_type=got.media_type)
        found[entry.key] = entry
        sizes[got.digest] = got.size
        sizes.update((b["digest"], b["size"]) for b in info.blobs)
        await asyncio.gather(*(fetch(repo, c["digest"]) for c in info.children))
        return entry

    session, host = _session(base_url)
    async with session:
        for name in await session.catalog(host, auth):
            repo = session.repository(host, name, auth)
            tags = await repo.list_tags()
            for tag, entry in zip(tags, await asyncio.gather(*(fetch(repo, t) for t in tags))):
                if entry is not None:
                    found[entry.key] = replace(found[entry.key], tags=found[entry.key].tags | {tag})
        await asyncio.gather(*(fetch(session.repository(host, name, auth), digest)
                               for name, digest in untagged if (name, digest) not in found))  # fmt: skip
    return sorted(found.values(), key=lambda m: m.key), sizes


def inventory_sizes(
    base_url: str, auth: Credentials | None = None, concurrency: int = 16, untagged: Iterable[tuple[str, str]] = ()
) -> tuple[list[Manifest], dict[str, int]]:
    """(every tagged manifest, every (repository, digest) of ``untagged``, and their platform manifests;
    digest -> size of every blob they name)."""
    return asyncio.run(_inventory(base_url, auth, concurrency, untagged))


async def _delete_one(repo: Repository, digest: str, sem: asyncio.Semaphore) -> DeleteOutcome:
    async with sem:
        try:
            deleted = await repo.delete_manifest(digest)
        except UnsupportedOperationError as err:
            raise PermanentError("the registry refuses deletes: set storage.delete.enabled: true in its config") from err
        except (WriteLockedError, AuthenticationError, AccessDeniedError):
            raise
        except ClusterRegistryError as err:  # unreachable, 5xx after the client's retries, a bad answer
            return DeleteOutcome(repo.name, digest, "failed", str(err))
    return DeleteOutcome(repo.name, digest, "deleted" if deleted else "absent")


async def delete_manifests(
    base_url: str,
    waves: Iterable[Iterable[tuple[str, str]]],
    auth: Credentials | None = None,
    concurrency: int = 8,
) -> list[DeleteOutcome]:
    """DELETE each (repository, digest); wave after wave (indexes before the manifests they name),
    concurrently within a wave. ``base_url`` like ``http://host:5000``. A refusal (credentials, deletes
    disabled, the write lock) raises; a registry that stays unreachable fails only that manifest."""
    sem = asyncio.Semaphore(concurrency)
    out: list[DeleteOutcome] = []
    session, host = _session(base_url)
    async with session:
        for wave in waves:
            out += await asyncio.gather(
                *(_delete_one(session.repository(host, r, auth, push=True), d, sem) for r, d in wave)
            )
    return out


def delete_sync(
    base_url: str, waves: Iterable[Iterable[tuple[str, str]]], auth: Credentials | None = None
) -> list[DeleteOutcome]:
    return asyncio.run(delete_manifests(base_url, [list(w) for w in waves], auth))
