"""``cluster-registry sideload PATH``: import OCI layouts and docker archives from a mounted drive.

1. read every input under PATH (:func:`layout.discover`), mapping each image to its source;
2. verify every blob (SHA-256 and size) and manifest of every image: a corrupt or partial input
   fails here, naming the file and the digest, before anything is pushed;
3. push blobs and manifests by digest into the cluster registry under
   ``reference.local_repository(source)``, then, only once all of that worked, the tags;
4. create Ready Artifacts (status through the status subresource) in each ``--namespace``, so pods
   are rewritten exactly as for copied images.

Exit codes: 0 imported; 1 an input is bad or the push failed (nothing is tagged when an input is
bad); 2 usage. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cluster_registry import api, kube, reference
from cluster_registry.errors import ClusterRegistryError
from cluster_registry.install import artifacts as A
from cluster_registry.oci import layout as L
from cluster_registry.oci import Credentials, RegistryOptions, RegistrySession
from cluster_registry.oci.auth import read_credentials_file

log = logging.getLogger(__name__)


@dataclass
class Summary:
    images: int = 0
    referrers: int = 0
    blobs_pushed: int = 0
    blobs_present: int = 0
    bytes_pushed: int = 0
    bytes_verified: int = 0
    tags: int = 0
    artifacts: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        doc: dict[str, Any] = dict(vars(self))
        doc["seconds"] = round(self.seconds, 3)
        return json.dumps(doc, sort_keys=True)


def load(path: Path, default_repository: str | None = None) -> list[L.Entry]:
    """Read and verify every input under ``path``; raises layout.InputError. No registry I/O."""
    entries: list[L.Entry] = []
    for src in L.discover(path):
        entries += L.read_input(src, default_repository)
    return entries


def artifact_source(entry: L.Entry) -> str:
    """What pods reference: ``name:tag`` when the image had a tag, else ``name@digest``."""
    s = entry.source
    return f"{s.name}:{s.tag}" if s.tag else f"{s.name}@{s.digest}"


async def _chunks(src: L.Input, member: str) -> AsyncIterator[bytes]:
    for chunk in src.chunks(member):
        yield chunk


async def push(
    entries: list[L.Entry],
    *,
    registry_host: str,
    insecure: bool,
    credentials: Credentials | None,
    summary: Summary,
) -> None:
    """Push every blob and manifest by digest, then every tag. Raises ClusterRegistryError."""
    options = RegistryOptions(insecure_hosts=frozenset({registry_host}) if insecure else frozenset())
    async with RegistrySession(options) as session:
        pushed_in: dict[str, str] = {}  # blob digest -> a repository that has it (for mounts)
        for entry in entries:
            repo = session.repository(registry_host, reference.local_repository(entry.source), credentials, push=True)
            for blob in entry.blobs:
                if await repo.blob_size(blob.digest) is not None:
                    summary.blobs_present += 1
                    pushed_in.setdefault(blob.digest, repo.name)
                    continue
                upload = await repo.start_upload(blob.digest, mount_from=pushed_in.get(blob.digest))
                if upload is not None:
                    await repo.finish_upload(upload, blob.digest, blob.size, _chunks(entry.origin, blob.member))
                    summary.bytes_pushed += blob.size
                summary.blobs_pushed += 1
                pushed_in[blob.digest] = repo.name
            for manifest in entry.manifests:
                await repo.put_manifest(manifest.digest, manifest.body, manifest.media_type)
            log.info("pushed %s (%d blobs) by digest", entry.source, len(entry.blobs))
        for entry in entries:  # tags last: a failure above leaves nothing tagged
            if entry.source.tag:
                repo = session.repository(registry_host, reference.local_repository(entry.source), credentials, push=True)
                await repo.put_manifest(entry.source.tag, entry.top.body, entry.top.media_type)
                summary.tags += 1


def create_artifacts(
    entries: list[L.Entry], *, namespaces: tuple[str, ...], registry_host: str, kubeconfig: str | None, summary: Summary
) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube.api_client(kubeconfig))
    now = datetime.datetime.now(datetime.timezone.utc)
    for entry in entries:
        if entry.referrer_of:
            continue
        source = artifact_source(entry)
        local = str(reference.rewrite(entry.source, registry_host))
        for ns in namespaces:
            body = api.artifact_body(
                source, ns, labels={A.LABEL_LOADED_BY: "sideload"}, annotations={A.ANNOTATION_SIDELOADED: entry.origin.where[-200:]}
            )
            obj = A.ensure(custom, body)
            status = A.ready_status(
                digest=entry.top.digest,
                size=entry.size,
                platforms=entry.platforms,
                local=local,
                generation=int(obj["metadata"].get("generation") or 1),
                now=now,
                reason="Sideloaded",
                message=f"imported from {entry.origin.where}",
            )
            A.set_status(custom, ns, obj["metadata"]["name"], status)
            summary.artifacts += 1


@click.command("sideload")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--registry-host", required=True, envvar="CLUSTER_REGISTRY_REGISTRY_HOST", help="the cluster registry, HOST:PORT")
@click.option("--registry-insecure", is_flag=True, help="plain HTTP to the cluster registry")
@click.option("--registry-credentials-file", default=None, type=click.Path(dir_okay=False), help="YAML {username, password} for pushes")
@click.option("--namespace", "namespaces", multiple=True, help="namespace of the Artifacts (repeatable; default: the pod's namespace)")
@click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False))
@click.option("--no-artifacts", is_flag=True, help="push only; create no Artifacts")
@click.option("--default-repository", default=None, help="HOST/REPO for layout entries annotated with a bare tag only")
@click.option("--dry-run", is_flag=True, help="read and verify every input, print what would be pushed, push nothing")
def sideload(
    path: Path,
    registry_host: str,
    registry_insecure: bool,
    registry_credentials_file: str | None,
    namespaces: tuple[str, ...],
    kubeconfig: str | None,
    no_artifacts: bool,
    default_repository: str | None,
    dry_run: bool,
) -> None:
    """Import OCI image layouts and docker archives under PATH into the cluster registry."""
    started = time.monotonic()
    summary = Summary()
    try:
        credentials = read_credentials_file(registry_credentials_file) if registry_credentials_file else None
    except ClusterRegistryError as err:
        raise click.UsageError(err.message) from None
    try:
        entries = load(path, default_repository)
        summary.images = sum(1 for e in entries if not e.referrer_of)
        summary.referrers = len(entries) - summary.images
        log.info("read %d images and %d referrers from %s; verifying every blob", summary.images, summary.referrers, path)
        summary.bytes_verified = L.verify(entries)
    except L.InputError as err:
        click.echo(f"sideload: refused, nothing pushed: {err}", err=True)
        sys.exit(1)
    if dry_run:
        for entry in entries:
            target = reference.rewrite(entry.source, registry_host)
            kind = f"referrer of {entry.referrer_of}" if entry.referrer_of else "image"
            click.echo(f"would push {kind} {entry.source} -> {target} ({len(entry.blobs)} blobs, {entry.size} bytes)")
        summary.seconds = time.monotonic() - started
        click.echo(summary.to_json())
        return
    try:
        asyncio.run(push(entries, registry_host=registry_host, insecure=registry_insecure, credentials=credentials, summary=summary))
    except ClusterRegistryError as err:
        click.echo(f"sideload: push failed ({summary.tags} tags written): {err}", err=True)
        sys.exit(1)
    if not no_artifacts:
        ns = namespaces or (kube.pod_namespace("default"),)
        try:
            create_artifacts(entries, namespaces=ns, registry_host=registry_host, kubeconfig=kubeconfig, summary=summary)
        except Exception as err:  # noqa: BLE001 (API errors: the images are in; say what is missing)
            click.echo(f"sideload: images pushed, but creating Artifacts failed: {err}", err=True)
            sys.exit(1)
    summary.seconds = time.monotonic() - started
    click.echo(summary.to_json())
