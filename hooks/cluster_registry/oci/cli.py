"""``cluster-registry copy SRC DST``: copy one image (with its signatures and referrers)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from cluster_registry import reference
from cluster_registry.errors import ClusterRegistryError, ConfigError
from cluster_registry.oci.auth import Credentials, credentials_from_docker_config
from cluster_registry.oci.client import RegistryOptions, RegistrySession
from cluster_registry.oci.copy import CopyOptions, CopyResult, copy_image
from cluster_registry.oci.retry import RetryPolicy


def _credentials(username: str | None, password: str | None, authfile: str | None, host: str) -> Credentials | None:
    if username:
        return Credentials(username=username, password=password or "")
    if authfile:
        try:
            data = Path(authfile).read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read auth file {authfile}: {err.strerror}") from None
        return credentials_from_docker_config(data, host)
    return None


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--src-insecure", is_flag=True, help="Talk to the source registry over plain HTTP.")
@click.option("--dest-insecure", is_flag=True, help="Talk to the destination registry over plain HTTP.")
@click.option("--src-username", help="Source registry user (password from --src-password or its env var).")
@click.option("--src-password", help="Source registry password (prefer the environment variable).")
@click.option("--src-authfile", type=click.Path(dir_okay=False), help="Docker config JSON for the source.")
@click.option("--dest-username", help="Destination registry user.")
@click.option("--dest-password", help="Destination registry password (prefer the environment variable).")
@click.option("--dest-authfile", type=click.Path(dir_okay=False), help="Docker config JSON for the destination.")
@click.option("--ca-bundle", type=click.Path(dir_okay=False), help="Extra CA certificates (PEM) to trust.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=16, show_default=True, help="Blobs in flight.")
@click.option("--retries", type=click.IntRange(0, 20), default=4, show_default=True, help="Retries per request.")
@click.option("--attached/--no-attached", default=True, show_default=True, help="Copy signatures and referrers.")
def copy(
    src: str,
    dst: str,
    src_insecure: bool,
    dest_insecure: bool,
    src_username: str | None,
    src_password: str | None,
    src_authfile: str | None,
    dest_username: str | None,
    dest_password: str | None,
    dest_authfile: str | None,
    ca_bundle: str | None,
    concurrency: int,
    retries: int,
    attached: bool,
) -> None:
    """Copy image SRC to DST (host[:port]/repo[:tag][@digest]); print a one-line JSON summary."""
    try:
        src_ref, dst_ref = reference.parse(src), reference.parse(dst)
        if dst_ref.digest is None and src_ref.digest is not None and dst.rfind(":") <= dst.rfind("/"):
            # `copy host/a@sha256:.. host/b`: keep the source's pinning instead of tagging :latest.
            dst_ref = reference.Reference(dst_ref.host, dst_ref.repository, src_ref.tag, src_ref.digest)
        insecure = set()
        if src_insecure:
            insecure.add(src_ref.host)
        if dest_insecure:
            insecure.add(dst_ref.host)
        options = RegistryOptions(
            insecure_hosts=frozenset(insecure), ca_bundle=ca_bundle, retry=RetryPolicy(attempts=retries + 1)
        )
        src_auth = _credentials(src_username, src_password, src_authfile, src_ref.host)
        dst_auth = _credentials(dest_username, dest_password, dest_authfile, dst_ref.host)
        result = asyncio.run(
            _run(src_ref, dst_ref, options, src_auth, dst_auth, CopyOptions(concurrency=concurrency, attached=attached))
        )
    except ClusterRegistryError as err:
        click.echo(json.dumps({"error": str(err), "reason": err.reason, "temporary": err.temporary}))
        sys.exit(1)
    click.echo(json.dumps({"source": str(src_ref), "destination": str(dst_ref), **json.loads(result.to_json())}))


async def _run(
    src: reference.Reference,
    dst: reference.Reference,
    options: RegistryOptions,
    src_auth: Credentials | None,
    dst_auth: Credentials | None,
    copy_options: CopyOptions,
) -> CopyResult:
    async with RegistrySession(options) as session:
        return await copy_image(
            src, dst, session=session, src_auth=src_auth, dst_auth=dst_auth, options=copy_options
        )
