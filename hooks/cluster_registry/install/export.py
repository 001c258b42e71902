"""``cluster-registry export IMAGE... --output DIR``: write images from a registry to an OCI layout.

For sites with no link to the artifact store: export where there is one, carry the directory on a
drive, ``sideload`` it at the site. Every platform of an index is written, with the image's
referrers (OCI 1.1 referrers API) and cosign-style ``sha256-<hex>.sig|.att|.sbom`` tags. Blobs are
verified as they stream (size and digest) and land atomically; running again adds to the layout
and skips blobs already there. Annotations: see :mod:`cluster_registry.oci.layout`.

Exit codes: 0 written; 1 a registry or write error; 2 usage. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cluster_registry import reference
from cluster_registry.errors import ClusterRegistryError, InvalidReferenceError
from cluster_registry.oci import layout as L
from cluster_registry.oci import Credentials, RegistryOptions, RegistrySession, Repository, media
from cluster_registry.oci.auth import read_credentials_file

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    images: int = 0
    referrers: int = 0
    blobs_written: int = 0
    blobs_present: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        doc: dict[str, Any] = dict(vars(self))
        doc["seconds"] = round(self.seconds, 3)
        return json.dumps(doc, sort_keys=True)


async def _write_tree(repo: Repository, writer: L.LayoutWriter, ref: str, summary: ExportSummary) -> L.ManifestDoc:
    """Write the manifest at ``ref`` with every child and blob under it; returns the top manifest."""
    m = await repo.get_manifest(ref)
    info = m.info
    for child in info.children:
        await _write_tree(repo, writer, child["digest"], summary)
    for blob in media.copyable_blobs(info):
        if writer.has(blob["digest"], blob["size"]):
            summary.blobs_present += 1
            continue
        with writer.sink(blob["digest"], blob["size"]) as f:
            async for chunk in await repo.open_blob(blob["digest"], blob["size"]):
                f.write(chunk)
        summary.blobs_written += 1
        summary.bytes_written += blob["size"]
    if not writer.has(m.digest, m.size):
        writer.write_bytes(m.digest, m.body)
    return L.ManifestDoc(m.digest, m.media_type, m.body)


async def export_images(
    images: list[reference.Reference],
    output: Path,
    *,
    insecure: frozenset[str],
    credentials: Credentials | None,
    referrers: bool,
    as_host: str | None,
    summary: ExportSummary,
) -> None:
    writer = L.LayoutWriter(output)
    async with RegistrySession(RegistryOptions(insecure_hosts=insecure)) as session:
        for ref in images:
            repo = session.repository(ref.host, ref.repository, credentials)
            top = await _write_tree(repo, writer, ref.pull_ref, summary)
            source = reference.Reference(as_host or ref.host, ref.repository, ref.tag, None)
            writer.add(L.index_descriptor(top, source))
            summary.images += 1
            log.info("exported %s (%s)", ref, top.digest)
            if not referrers:
                continue
            for desc in await repo.referrers(top.digest) or []:
                doc = await _write_tree(repo, writer, desc["digest"], summary)
                writer.add(L.index_descriptor(doc, reference.Reference(source.host, source.repository, None, None), top.digest))
                summary.referrers += 1
            for tag in sorted(t for t in await repo.list_tags() if media.is_attached_tag(t, top.digest)):
                doc = await _write_tree(repo, writer, tag, summary)
                writer.add(L.index_descriptor(doc, reference.Reference(source.host, source.repository, tag, None), top.digest))
                summary.referrers += 1
    writer.save()


@click.command("export")
@click.argument("images", nargs=-1)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="the OCI layout directory (created or added to)")
@click.option("--images-file", default=None, type=click.File("r"), help="more image references, one a line")
@click.option("--insecure-registry", "insecure", multiple=True, help="HOST[:PORT] spoken to over plain HTTP (repeatable)")
@click.option("--credentials-file", default=None, type=click.Path(dir_okay=False), help="YAML {username, password} for the source registry")
@click.option("--referrers/--no-referrers", default=True, show_default=True, help="also export signatures, attestations and other referrers")
@click.option("--as-host", default=None, help="record this registry host as the images' source (exporting from a mirror)")
def export(
    images: tuple[str, ...],
    output: Path,
    images_file: Any,
    insecure: tuple[str, ...],
    credentials_file: str | None,
    referrers: bool,
    as_host: str | None,
) -> None:
    """Write IMAGE... (and their referrers) from their registries to an OCI image layout."""
    texts = list(images) + ([ln.strip() for ln in images_file if ln.strip() and not ln.startswith("#")] if images_file else [])
    if not texts:
        raise click.UsageError("give at least one image (IMAGE... or --images-file)")
    try:
        refs = [reference.parse(t) for t in texts]
    except InvalidReferenceError as err:
        raise click.UsageError(str(err)) from None
    started = time.monotonic()
    summary = ExportSummary()
    try:
        asyncio.run(
            export_images(
                refs,
                output,
                insecure=frozenset(insecure),
                credentials=read_credentials_file(credentials_file) if credentials_file else None,
                referrers=referrers,
                as_host=as_host,
                summary=summary,
            )
        )
    except (ClusterRegistryError, OSError) as err:
        click.echo(f"export: failed after {summary.images} images: {err}", err=True)
        sys.exit(1)
    summary.seconds = time.monotonic() - started
    click.echo(summary.to_json())
