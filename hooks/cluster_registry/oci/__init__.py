"""OCI registry client and copy engine.

Public API (everything importable from ``cluster_registry.oci``)::

    from cluster_registry import reference
    from cluster_registry.oci import (
        CopyOptions, CopyResult, Credentials, RegistryOptions, RegistrySession, copy_image,
        credentials_from_docker_config,
    )

    async with RegistrySession(RegistryOptions(insecure_hosts=frozenset({"127.0.0.1:5000"}))) as s:
        result: CopyResult = await copy_image(
            reference.parse("ghcr.io/org/app:1.0"),
            reference.parse("127.0.0.1:5000/ghcr.io/org/app:1.0"),
            session=s,                    # optional; share one per process (pool, tokens, mounts)
            src_auth=credentials_from_docker_config(secret_bytes, "ghcr.io"),  # or None: anonymous
            dst_auth=Credentials(username="u", password="p"),
            options=CopyOptions(concurrency=8, attached=True),
            progress=None,                # or a callable receiving Progress after each blob
        )
        result.digest, result.size, result.media_type, result.platforms  # -> Artifact status
        result.to_json()                  # the `cluster-registry copy` summary line

* ``copy_image`` copies Docker schema 2 / manifest list / OCI manifest / OCI index images (every
  platform of an index), byte for byte, streaming blobs with SHA-256 and size verification and
  bounded memory, plus cosign-style ``sha256-<hex>.sig|.att|.sbom`` tags and OCI 1.1 referrers.
  The destination tag is written last: a failed copy leaves nothing tagged. Re-copying an image
  already at the destination costs a few requests (HEAD on the tag, the referrers API, HEADs on
  the ``sha256-<hex>[.sig|.att|.sbom]`` tags); about 0.05 s in process on loopback.
  Only the top digest's attached artifacts are copied (not those of each platform manifest).
  A ``WriteLockedError`` or any other failure mid-copy may leave untagged blobs and by-digest
  manifests at the destination (GC collects them); a rerun skips what is already there.
* ``CopyOptions(concurrency=16, large_concurrency=6, attached=True, mount=True,
  thread_threshold=4 MiB)``: blobs in flight, how many of them large; a blob over
  ``thread_threshold`` streams from GET to PUT within one worker-thread call (``blobio``: the GIL
  is released in recv/send/SHA-256, so a copy uses more than one core); a smaller one as a
  verified stream that the event loop forwards chunk by chunk.
* Transport: ``http.client`` connections (keep-alive, pooled per host) driven from the session's
  own worker threads (``RegistryOptions.connections_per_host``, default 32), never the loop's
  default executor; the async API above is unchanged. No aiohttp on this path: importing it was
  most of ``cluster-registry copy``'s start-up. The TLS context (system trust plus ``ca_bundle``)
  is made on the first https connection only. A cancelled request's connection is closed, never
  pooled.
* ``RegistryOptions(insecure_hosts, ca_bundle, retry, ...)``: plain-HTTP hosts, an extra CA
  bundle, the :class:`RetryPolicy` (retries on connection errors, 429 honouring ``Retry-After``,
  and 5xx; bounded exponential backoff with full jitter), ``connect_timeout``/``read_timeout``.
* ``Credentials(username, password)`` or ``Credentials(token=...)``; ``repr`` hides secrets.
  ``credentials_from_docker_config(json_bytes, host)`` reads ``.dockerconfigjson``/``.dockercfg``.
  Anonymous, basic and the bearer-token flow (``WWW-Authenticate`` realm/service/scope) work.

Errors (all from ``cluster_registry.errors``; ``err.temporary`` tells which; messages are safe
for status and Events and never hold a credential):

* ``WriteLockedError`` (temporary): the destination answered ``503`` with
  ``X-Cluster-Registry-Lock: gc``; the GC holds the write lock; retry later (Artifact: Deferred).
* ``RegistryUnavailableError``, ``RateLimitedError`` (temporary): unreachable, 5xx or 429 after
  retries.
* ``AuthenticationError`` (401), ``AccessDeniedError`` (403), ``NotFoundError`` (404),
  ``CorruptBlobError`` (digest/size mismatch after retries), ``UnsupportedManifestError``
  (e.g. schema 1), ``TLSError``, ``RegistryProtocolError`` (permanent).

Read API for ``gc``/``export``/``sideload`` (on a :class:`Repository` from
``session.repository(host, name, auth, push=False)``):

* ``await repo.get_manifest(tag_or_digest) -> Manifest(body, media_type, digest)`` (digest verified
  when pinned; ``.info`` parses it once); ``head_manifest(ref) -> (digest, media_type, size) | None``;
  ``put_manifest(ref, body, media_type)``; ``delete_manifest(digest) -> bool``;
  ``list_tags() -> list[str]``; ``referrers(digest) -> list[Descriptor] | None``;
  ``session.catalog(host) -> list[str]`` (every repository).
* ``blob_size(digest) -> int | None``; ``async with await repo.open_blob(digest, size) as s: async for chunk in s``
  (verified stream); ``start_upload(digest) -> str | None`` (the upload URL) then ``finish_upload(url, digest, size, async_chunks)``
  (streamed, for sideloading large layers).
* ``media.inspect(body, media_type) -> ManifestInfo`` (blobs, children, subject) is pure.
"""

from __future__ import annotations

from cluster_registry.oci import media
from cluster_registry.oci.auth import Credentials, credentials_from_docker_config
from cluster_registry.oci.client import Manifest, RegistryOptions, RegistrySession, Repository
from cluster_registry.oci.copy import CopyOptions, CopyResult, Progress, copy_image
from cluster_registry.oci.errors import (
    AccessDeniedError,
    AuthenticationError,
    CorruptBlobError,
    NotFoundError,
    RateLimitedError,
    RegistryProtocolError,
    RegistryUnavailableError,
    TLSError,
    UnsupportedManifestError,
    WriteLockedError,
)
from cluster_registry.oci.retry import RetryPolicy

__all__ = [
    "AccessDeniedError",
    "AuthenticationError",
    "CopyOptions",
    "CopyResult",
    "CorruptBlobError",
    "Credentials",
    "Manifest",
    "NotFoundError",
    "Progress",
    "RateLimitedError",
    "RegistryOptions",
    "RegistryProtocolError",
    "RegistrySession",
    "RegistryUnavailableError",
    "Repository",
    "RetryPolicy",
    "TLSError",
    "UnsupportedManifestError",
    "WriteLockedError",
    "copy_image",
    "credentials_from_docker_config",
    "media",
]

