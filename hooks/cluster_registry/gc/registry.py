"""A minimal registry API client for GC's deletes (DELETE manifest by digest).

Kept inside ``gc/`` on purpose: GC needs one call, with basic auth, and no copy-engine machinery.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import aiohttp
import yaml

from cluster_registry.errors import ConfigError, PermanentError, WriteLockedError
from cluster_registry.gate.protocol import LOCK_HEADER


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password=<redacted>)"


def load_credentials(path: str | None) -> BasicAuth | None:
    """``{username, password}`` from a YAML or JSON file; None without a file."""
    if not path:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the credentials file {path}") from err
    if not isinstance(data, dict) or not data.get("username") or "password" not in data:
        raise ConfigError(f"the credentials file {path} must hold username and password")
    return BasicAuth(str(data["username"]), str(data["password"]))


@dataclass
class DeleteOutcome:
    repository: str
    digest: str
    status: str  # deleted | absent | failed
    error: str = ""


async def _delete_one(
    session: aiohttp.ClientSession, base: str, repo: str, digest: str, sem: asyncio.Semaphore
) -> DeleteOutcome:
    async with sem:
        for attempt in range(4):
            try:
                async with session.delete(f"{base}/v2/{repo}/manifests/{digest}") as resp:
                    body = await resp.read()
                    if resp.status in (200, 202):
                        return DeleteOutcome(repo, digest, "deleted")
                    if resp.status == 404:
                        return DeleteOutcome(repo, digest, "absent")
                    if resp.status == 405:
                        raise PermanentError(
                            "the registry refuses deletes: set storage.delete.enabled: true in its config"
                        )
                    if resp.status == 503 and resp.headers.get(LOCK_HEADER):
                        raise WriteLockedError("the registry is write-locked")
                    if resp.status in (401, 403):
                        raise PermanentError(f"the registry refused GC's delete ({resp.status}): check credentials")
                    err = f"HTTP {resp.status}: {json.dumps(body[:200].decode(errors='replace'))}"
            except aiohttp.ClientError as exc:
                err = str(exc)
            await asyncio.sleep(0.2 * 2**attempt)
        return DeleteOutcome(repo, digest, "failed", err)


async def delete_manifests(
    base_url: str,
    waves: Iterable[Iterable[tuple[str, str]]],
    auth: BasicAuth | None = None,
    concurrency: int = 8,
) -> list[DeleteOutcome]:
    """DELETE each (repository, digest); wave after wave (indexes before the manifests they name),
    concurrently within a wave. ``base_url`` like ``http://host:5000``."""
    base = base_url.rstrip("/")
    sem = asyncio.Semaphore(concurrency)
    basic = aiohttp.BasicAuth(auth.username, auth.password) if auth else None
    timeout = aiohttp.ClientTimeout(total=60)
    out: list[DeleteOutcome] = []
    async with aiohttp.ClientSession(auth=basic, timeout=timeout) as session:
        for wave in waves:
            out += await asyncio.gather(*(_delete_one(session, base, r, d, sem) for r, d in wave))
    return out


def delete_sync(
    base_url: str, waves: Iterable[Iterable[tuple[str, str]]], auth: BasicAuth | None = None
) -> list[DeleteOutcome]:
    return asyncio.run(delete_manifests(base_url, [list(w) for w in waves], auth))
