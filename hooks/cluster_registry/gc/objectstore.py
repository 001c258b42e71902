"""Usage of an object-storage registry, read from its S3 bucket or Azure blob container.

The store is the one distribution's own config names (the chart's ConfigMap), with the keys the chart
passes in distribution's environment (``REGISTRY_STORAGE_<DRIVER>_<KEY>``), so GC lists exactly what
the registry writes: one ``<root>/docker/registry/v2/blobs/<algo>/<2 hex>/<hex>/data`` object per blob,
and one ``repositories/<name>/_manifests/revisions/<algo>/<hex>/link`` per manifest (its push time).
Read-only, like ``storage``: deletes go through the registry API, the sweep through distribution.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import yaml

from cluster_registry.errors import ConfigError, TemporaryError
from cluster_registry.gc.select import Manifest

DRIVERS = ("s3", "azure")


@dataclass(frozen=True)
class ObjectStore:
    driver: str  # s3 | azure
    params: Mapping[str, Any]  # distribution's driver parameters, environment overrides applied

    def prefix(self, sub: str) -> str:
        """The object key of ``/docker/registry/v2/<sub>/`` as both drivers spell it (root trimmed of slashes)."""
        root = str(self.params.get("rootdirectory") or "").rstrip("/")
        return f"{root}/docker/registry/v2/{sub}/".lstrip("/")


def from_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> ObjectStore:
    """The object store of a distribution config; ``REGISTRY_STORAGE_<DRIVER>_<KEY>`` override its keys
    as distribution reads them (``true``/``false`` as booleans, the rest as strings: keys stay keys)."""
    storage = config.get("storage") or {}
    driver = next((d for d in DRIVERS if d in storage), None)
    if driver is None:
        raise ConfigError(f"the registry config names no object storage driver ({' or '.join(DRIVERS)})")
    params = dict(storage[driver] or {})
    head = f"REGISTRY_STORAGE_{driver.upper()}_"
    for name, value in environ.items():
        if name.startswith(head) and "_" not in name[len(head):]:
            params[name[len(head):].lower()] = value.lower() == "true" if value.lower() in ("true", "false") else value
    return ObjectStore(driver, params)


def load(path: str, environ: Mapping[str, str] | None = None) -> ObjectStore:
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the registry config {path}: {err}") from err
    return from_config(config, os.environ if environ is None else environ)


def blob_digest(key: str, prefix: str) -> str | None:
    """``<prefix>sha256/ab/ab12.../data`` -> ``sha256:ab12...``; None for any other object (pure)."""
    parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
    if len(parts) != 4 or parts[3] != "data" or not parts[2].startswith(parts[1]):
        return None
    return f"{parts[0]}:{parts[2]}"


def blob_sizes(store: ObjectStore) -> dict[str, int]:
    """digest -> size of every blob (manifests included) in the bucket or container."""
    prefix = store.prefix("blobs")
    out: dict[str, int] = {}
    for key, size, _ in _objects(store, prefix):
        digest = blob_digest(key, prefix)
        if digest:
            out[digest] = size
    return out


def revision_key(key: str, prefix: str) -> tuple[str, str] | None:
    """``<prefix><repo>/_manifests/revisions/sha256/<hex>/link`` -> (repo, ``sha256:<hex>``); else None (pure)."""
    repo, sep, rest = key[len(prefix):].partition("/_manifests/revisions/") if key.startswith(prefix) else ("", "", "")
    parts = rest.split("/")
    if not sep or not repo or len(parts) != 3 or parts[2] != "link":
        return None
    return repo, f"{parts[0]}:{parts[1]}"


def revisions(store: ObjectStore) -> dict[tuple[str, str], datetime]:
    """(repository, digest) -> when the registry last wrote that manifest's revision link, for every manifest
    stored, tagged or not: the registry API lists only tags, and an image pinned by digest has none."""
    prefix = store.prefix("repositories")
    times: dict[tuple[str, str], datetime] = {}
    for key, _, modified in _objects(store, prefix):
        rev = revision_key(key, prefix)
        if rev:
            times[rev] = modified
    return times


def has_repositories(store: ObjectStore) -> bool:
    """False for a registry that has never stored an image (distribution's sweep fails on it)."""
    return next(iter(_objects(store, store.prefix("repositories"))), None) is not None


def _objects(store: ObjectStore, prefix: str) -> Iterator[tuple[str, int, datetime]]:
    """(key, size, last modified) of every object under ``prefix``."""
    try:
        yield from (_s3_objects if store.driver == "s3" else _azure_objects)(store.params, prefix)
    except ConfigError:
        raise
    except Exception as err:  # the SDKs' errors share no base: a store unreachable or refusing
        raise TemporaryError(f"cannot list the registry's {store.driver} storage: {err}") from err


def _s3_objects(p: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, int, datetime]]:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        region_name=p.get("region") or None,
        endpoint_url=p.get("regionendpoint") or None,
        aws_access_key_id=p.get("accesskey") or None,  # None: the default chain (instance role, IRSA)
        aws_secret_access_key=p.get("secretkey") or None,
        aws_session_token=p.get("sessiontoken") or None,
        verify=not p.get("skipverify"),
        config=Config(s3={"addressing_style": "path" if p.get("forcepathstyle") else "auto"}, retries={"max_attempts": 5}),
    )
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=p["bucket"], Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield obj["Key"], int(obj["Size"]), obj["LastModified"]


def _azure_objects(p: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, int, datetime]]:
    from azure.storage.blob import ContainerClient

    if p.get("connectionstring"):
        container = ContainerClient.from_connection_string(p["connectionstring"], p["container"])
    elif p.get("accountkey"):
        url = p.get("serviceurl") or f"https://{p['accountname']}.blob.{p.get('realm') or 'core.windows.net'}"
        key = {"account_name": p["accountname"], "account_key": p["accountkey"]}
        container = ContainerClient(url, p["container"], credential=key)
    else:
        raise ConfigError("GC reads an Azure container's usage with the shared key (storage.azure.secretName)")
    with container:
        for blob in container.list_blobs(name_starts_with=prefix):
            yield blob.name, int(blob.size), blob.last_modified
