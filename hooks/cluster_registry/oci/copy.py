"""The copy engine: one image (and everything attached to it) from a registry to a registry.

Order of work, so that a failure leaves nothing tagged at the destination:

1. fetch the source's top manifest (verified against the digest when the reference is pinned);
   if the destination tag already holds that digest, only attached artifacts are refreshed;
2. every blob of every platform, each at most once even when platforms share it, with bounded
   concurrency over pooled keep-alive connections: one POST asks the destination to mount the
   blob (from the source repository on the same registry, from a repository this session
   already pushed it to, else from the target repository itself, which doubles as the presence
   check); 201 means present or mounted, 202 opens the upload, and the blob is then streamed
   from a GET at the source into one PUT (Content-Length known), hashed and counted on the way,
   its last chunk held back until the digest and size verified. Registries that refuse the
   mount probe get the classic HEAD, POST, PUT;
3. child manifests pushed by digest, byte for byte;
4. attached artifacts of the image and, for an index, of each platform manifest: OCI 1.1
   referrers (API, else the ``sha256-<hex>`` tag schema) and cosign-style tags
   (``sha256-<hex>.sig``/``.att``/``.sbom``), looked up at the source while step 2 runs;
5. the top manifest, by tag (or by digest), last. A destination pinned to a digest is pushed by
   digest only: a ``repo:tag@digest`` copy never moves the tag, which another copy of the same
   repository (another namespace's Artifact) may hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster_registry.errors import ClusterRegistryError, PermanentError, TemporaryError, WriteLockedError
from cluster_registry.oci import blobio, media
from cluster_registry.oci.auth import Credentials
from cluster_registry.oci.client import USER_AGENT, Manifest, RegistrySession, Repository
from cluster_registry.oci.errors import (
    CorruptBlobError,
    NotFoundError,
    RateLimitedError,
    RegistryProtocolError,
)
from cluster_registry.reference import Reference

log = logging.getLogger(__name__)
LARGE_BLOB = 4 << 20


@dataclass(frozen=True)
class CopyOptions:
    """``concurrency``: blobs in flight at once (``large_concurrency`` of them over 4 MiB).
    ``attached``: copy referrers and cosign tags. ``mount``: try cross-repository mounts at the
    destination (and fold the presence check into the upload's POST where the registry allows)."""

    concurrency: int = 16
    large_concurrency: int = 6  # of which blobs over LARGE_BLOB bytes (bounds memory)
    attached: bool = True
    attached_suffixes: tuple[str, ...] = ("sig", "att", "sbom")
    thread_threshold: int = LARGE_BLOB  # blobs larger than this move in one worker-thread call; -1: never
    mount: bool = True
    max_image_size: int = 0  # bytes of blobs an image may declare (0: no limit); refused before fetching


class ImageTooLargeError(PermanentError):
    """An image whose blobs declare more than ``CopyOptions.max_image_size``: refused before any is fetched."""


@dataclass(frozen=True)
class Progress:
    blobs_done: int
    blobs_total: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class CopyResult:
    """What a copy did. ``size`` is the image's total (manifests + unique blobs) in bytes."""

    digest: str
    size: int
    media_type: str
    platforms: tuple[str, ...]
    blobs_copied: int
    blobs_skipped: int
    blobs_mounted: int
    bytes_copied: int
    seconds: float
    attached: tuple[str, ...] = ()  # digests of attached artifacts copied or present

    def to_json(self) -> str:
        doc: dict[str, Any] = asdict(self)
        doc["platforms"] = list(self.platforms)
        doc["attached"] = list(self.attached)
        doc["seconds"] = round(self.seconds, 3)
        return json.dumps(doc, sort_keys=True)


@dataclass
class _Stats:
    copied: int = 0
    skipped: int = 0
    mounted: int = 0
    bytes_copied: int = 0
    blobs_total: int = 0
    bytes_total: int = 0
    blobs_done: int = 0
    bytes_done: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # every blob and manifest of the image


@dataclass(frozen=True)
class _Attached:
    """What the source holds attached to one manifest: referrer descriptors, and tag -> digest."""

    referrers: list[media.Descriptor]
    tags: dict[str, str]


class _Copier:
    def __init__(
        self,
        session: RegistrySession,
        src: Repository,
        dst: Repository,
        options: CopyOptions,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.session = session
        self.src = src
        self.dst = dst
        self.options = options
        self.progress = progress
        self.sem = asyncio.Semaphore(max(1, options.concurrency))
        self.large = asyncio.Semaphore(max(1, min(options.concurrency, options.large_concurrency)))
        self.blobs: dict[str, asyncio.Task[None]] = {}
        self.manifests: dict[str, asyncio.Task[None]] = {}
        self.stats = _Stats()
        self.platforms: list[str] = []

    # -- blobs ----------------------------------------------------------------------------------

    def blob(self, desc: media.Descriptor) -> asyncio.Task[None]:
        digest = desc["digest"]
        task = self.blobs.get(digest)
        if task is None:
            self.stats.blobs_total += 1
            self.stats.bytes_total += desc["size"]
            self.stats.sizes[digest] = desc["size"]
            task = asyncio.ensure_future(self._copy_blob(digest, desc["size"]))
            self.blobs[digest] = task
        return task

    def _within_limit(self, blobs: list[media.Descriptor]) -> None:
        """Refuse, before any of them is fetched, blobs that take the image over ``max_image_size``
        (their sizes are the source registry's word, checked again while they stream)."""
        limit = self.options.max_image_size
        declared = self.stats.bytes_total + sum(d["size"] for d in blobs if d["digest"] not in self.blobs)
        if limit and declared > limit:
            raise ImageTooLargeError(
                f"image too large: its blobs declare {declared} bytes, over the maximum image size of {limit} bytes"
            )

    def _mount_source(self, digest: str) -> str | None:
        if not self.options.mount or not self.session.self_mount.get(self.dst.host, True):
            return None
        if self.src.host.lower() == self.dst.host.lower() and self.src.name != self.dst.name:
            return self.src.name
        known = self.session.known_blobs.get((self.dst.host, digest))
        return known if known != self.dst.name else None

    async def _copy_blob(self, digest: str, size: int) -> None:
        async with self.large if size > LARGE_BLOB else contextlib.nullcontext():
            async with self.sem:
                await self._place(digest, size)
        self.session.known_blobs[(self.dst.host, digest)] = self.dst.name
        self.stats.blobs_done += 1
        self.stats.bytes_done += size
        if self.progress:
            self.progress(
                Progress(self.stats.blobs_done, self.stats.blobs_total, self.stats.bytes_done, self.stats.bytes_total)
            )

    async def _place(self, digest: str, size: int) -> None:
        """Make ``digest`` present at the destination: skip, mount or stream it.

        On registries that accept it (distribution does), the presence check is folded into the
        upload's POST as a mount from the destination repository itself: 201 means the blob is
        already there, 202 starts the upload. Elsewhere: HEAD, then POST.
        """
        policy = self.session.options.retry
        host = self.dst.host
        mount_from = self._mount_source(digest)
        upload = None
        probe = self.options.mount and self.session.self_mount.get(host, True)
        if probe:
            try:
                upload = await self.dst.start_upload(digest, mount_from=mount_from or self.dst.name, allow_self=True)
            except (RegistryProtocolError, NotFoundError) as err:
                log.debug("mount probe refused by %s, using HEAD: %s", host, err)
                self.session.self_mount[host] = False
                probe = False
                mount_from = None
            else:
                if upload is None:
                    if mount_from:
                        self.stats.mounted += 1
                    else:
                        self.stats.skipped += 1
                    return
        if not probe and await self.dst.blob_size(digest) is not None:
            self.stats.skipped += 1
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                if upload is None:
                    upload = await self.dst.start_upload(digest, mount_from=mount_from)
                    if upload is None:
                        self.stats.mounted += 1
                        return
                mount_from = None
                if 0 <= self.options.thread_threshold < size:
                    await self._threaded(digest, size, upload)
                else:
                    stream = await self.src.open_blob(digest, size)
                    try:
                        await self.dst.finish_upload(upload, digest, size, stream)
                    finally:
                        await stream.aclose()
                self.stats.copied += 1
                self.stats.bytes_copied += size
                return
            except (TemporaryError, CorruptBlobError) as err:
                upload = None
                if isinstance(err, WriteLockedError) or not policy.should_retry(attempt):
                    raise
                delay = policy.delay(attempt, err.retry_after if isinstance(err, RateLimitedError) else None)
                log.warning("blob copy failed, retrying in %.1fs: %s", delay, err, extra={"digest": digest})
                await asyncio.sleep(delay)

    async def _threaded(self, digest: str, size: int, upload: str) -> None:
        """Stream one blob from GET to PUT within one worker-thread call (see ``blobio``), instead
        of a trip through the event loop per chunk; cancellation stops it."""
        ua = {"User-Agent": USER_AGENT}
        src = blobio.Endpoint(
            f"{self.src.base}/blobs/{digest}",
            ua | await self.src.authorization(),
            f"get blob {self.src.where}@{digest}",
            self.src.status_error,
        )
        dst = blobio.Endpoint(
            upload, ua | await self.dst.authorization(), f"push blob {self.dst.where}@{digest}", self.dst.status_error
        )
        cancel = threading.Event()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.session.executor,
                functools.partial(
                    blobio.transfer, self.session.pool, src, dst, digest, size, cancel, self.session.options.chunk_size,
                    self.session.options.insecure_hosts,  # redirects to the hosts the operator listed are allowed
                ),
            )
        except BaseException:
            cancel.set()
            raise

    # -- manifests ------------------------------------------------------------------------------

    async def tree(self, manifest: Manifest, push_ref: str | None) -> None:
        """Copy everything ``manifest`` references, then push it at ``push_ref`` (None: by digest)."""
        info = manifest.info
        self.stats.sizes[manifest.digest] = manifest.size
        if info.is_index:
            await _gather(*(self.child(d) for d in info.children))
        else:
            blobs = media.copyable_blobs(info)
            self._within_limit(blobs)
            await _gather(*(self.blob(d) for d in blobs))
        if push_ref is not None:
            await self.dst.put_manifest(push_ref, manifest.body, manifest.media_type)

    def child(self, desc: media.Descriptor) -> asyncio.Task[None]:
        digest = desc["digest"]
        if desc.get("platform", {}).get("os", "unknown") != "unknown":  # not buildx attestations
            self.platforms.append(media.platform_string(desc.get("platform")))
        task = self.manifests.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._copy_child(desc))
            self.manifests[digest] = task
        return task

    async def _copy_child(self, desc: media.Descriptor) -> None:
        digest = desc["digest"]
        child, present = await asyncio.gather(self.src.get_manifest(digest), self.dst.head_manifest(digest))
        await self.tree(child, None if present else digest)

    async def account(self, manifest: Manifest) -> None:
        """Sizes and platforms of an image already at the destination (no blob requests)."""
        info = manifest.info
        self.stats.sizes[manifest.digest] = manifest.size
        if info.is_index:
            children = await asyncio.gather(*(self.src.get_manifest(d["digest"]) for d in info.children))
            for desc in info.children:
                if desc.get("platform", {}).get("os", "unknown") != "unknown":
                    self.platforms.append(media.platform_string(desc.get("platform")))
            for child in children:
                await self.account(child)
        else:
            self.stats.sizes.update({d["digest"]: d["size"] for d in info.blobs})
            self.stats.skipped += len(info.blobs)

    async def single_platform(self, manifest: Manifest) -> None:
        """Record an image manifest's platform from its (small) config blob."""
        info = manifest.info
        config = info.blobs[0] if info.blobs else None
        if (
            info.is_index
            or config is None
            or info.artifact_type
            or config["size"] > 1 << 20
        ):
            return
        try:
            async with await self.src.open_blob(config["digest"], config["size"]) as stream:
                data = b"".join([c async for c in stream])
            doc = json.loads(data)
            self.platforms.append(media.platform_string({"os": doc.get("os", ""), "architecture": doc.get("architecture", ""), **({"variant": doc["variant"]} if doc.get("variant") else {})}))
        except (ValueError, AttributeError, ClusterRegistryError) as err:
            log.debug("no platform for %s: %s", manifest.digest, err)

    # -- attached artifacts ---------------------------------------------------------------------

    async def find_attached(self, digest: str) -> _Attached:
        """The referrers and cosign-style tags of ``digest`` at the source (reads only).

        Referrers come from the referrers API when the source has it; the tags probed are
        ``sha256-<hex>`` (the referrers tag schema) and ``sha256-<hex>.<suffix>`` for each of
        ``CopyOptions.attached_suffixes`` (HEAD requests: no tag listing, so cost is constant).
        """
        prefix = media.attached_tag_prefix(digest)
        candidates = [prefix] + [f"{prefix}.{suffix}" for suffix in self.options.attached_suffixes]
        referrers, heads = await asyncio.gather(
            self.src.referrers(digest), asyncio.gather(*(self.src.head_manifest(t) for t in candidates))
        )
        return _Attached(referrers or [], {t: h[0] for t, h in zip(candidates, heads) if h is not None})

    async def attached(self, digest: str, at_source: _Attached) -> list[str]:
        """Copy what :meth:`find_attached` found for ``digest``; returns the digests copied or present."""
        found: list[str] = []
        prefix = media.attached_tag_prefix(digest)
        referrers, tags = at_source.referrers, at_source.tags
        subject_supported = False
        pushed: list[media.Descriptor] = []
        for desc in referrers:
            ref_digest = desc["digest"]
            found.append(ref_digest)
            if await self.dst.head_manifest(ref_digest):
                continue
            m = await self.src.get_manifest(ref_digest)
            await self.tree(m, None)
            headers = await self.dst.put_manifest(ref_digest, m.body, m.media_type)
            subject_supported = subject_supported or "OCI-Subject" in headers
            pushed.append(desc)

        async def copy_tag(tag: str, src_digest: str) -> None:
            present = await self.dst.head_manifest(tag)
            if tag != prefix and src_digest and present and present[0] == src_digest:
                found.append(src_digest)
                return
            m = await self.src.get_manifest(tag)
            found.append(m.digest)
            if tag == prefix and m.media_type in media.INDEXES:
                found.extend(d["digest"] for d in m.info.children)
            if not (present and present[0] == m.digest):
                await self.tree(m, tag)

        await _gather(*(copy_tag(t, d) for t, d in sorted(tags.items())))
        if pushed and not subject_supported and prefix not in tags:
            await self._update_fallback_index(prefix, pushed)
        return found

    async def _update_fallback_index(self, tag: str, add: list[media.Descriptor]) -> None:
        """Keep referrers discoverable on a destination without the referrers API (tag schema)."""
        manifests: list[dict[str, Any]] = []
        try:
            current = await self.dst.get_manifest(tag)
            doc = json.loads(current.body)
            manifests = [d for d in doc.get("manifests", []) if isinstance(d, dict)]
        except NotFoundError:
            pass
        have = {d.get("digest") for d in manifests}
        manifests += [dict(d) for d in add if d["digest"] not in have]
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": manifests}, separators=(",", ":")
        ).encode()
        await self.dst.put_manifest(tag, body, media.OCI_INDEX)


async def _gather(*aws: asyncio.Future[Any] | Any) -> list[Any]:
    """Await all and return their results in order; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def copy_image(
    src: Reference,
    dst: Reference,
    *,
    session: RegistrySession | None = None,
    src_auth: Credentials | None = None,
    dst_auth: Credentials | None = None,
    options: CopyOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> CopyResult:
    """Copy ``src`` to ``dst`` (see the module docstring). Raises TemporaryError or PermanentError.

    ``dst`` keeps ``src``'s digest: a ``dst`` pinned to another digest is refused. A ``dst`` pinned
    to a digest is pushed by digest (its tag, if any, is left as it is); one with only a tag is tagged (last).
    """
    options = options or CopyOptions()
    own = session is None
    sess = session or RegistrySession()
    started = time.monotonic()
    try:
        src_repo = sess.repository(src.host, src.repository, src_auth)
        dst_repo = sess.repository(dst.host, dst.repository, dst_auth, push=True)
        copier = _Copier(sess, src_repo, dst_repo, options, progress)
        top = await src_repo.get_manifest(src.pull_ref)
        info = top.info  # an unsupported type (schema 1) raises a clear UnsupportedManifestError here
        if dst.digest and dst.digest != top.digest:
            raise PermanentError(f"destination {dst} is pinned to a digest other than the source's {top.digest}")
        push_ref = top.digest if dst.digest else dst.tag or top.digest
        present = await dst_repo.head_manifest(push_ref)
        # An index's platform manifests can carry their own signatures (`cosign sign --recursive`).
        subjects = [top.digest, *(d["digest"] for d in info.children)] if options.attached else []
        already_there = present is not None and present[0] == top.digest
        if already_there:
            log.debug("%s already at %s", top.digest, dst)
        # The look-ups at the source run while the blobs move; nothing attached is pushed before
        # the image's own content is in place.
        _, *at_source = await _gather(
            copier.account(top) if already_there else copier.tree(top, None), *map(copier.find_attached, subjects)
        )
        image_size = sum(copier.stats.sizes.values())
        found = await _gather(*map(copier.attached, subjects, at_source))
        attached = [d for digests in found for d in digests]
        if not already_there:
            await dst_repo.put_manifest(push_ref, top.body, top.media_type)
        if not info.is_index:
            await copier.single_platform(top)
        s = copier.stats
        return CopyResult(
            digest=top.digest,
            size=image_size,
            media_type=top.media_type,
            platforms=tuple(dict.fromkeys(copier.platforms)),
            blobs_copied=s.copied,
            blobs_skipped=s.skipped,
            blobs_mounted=s.mounted,
            bytes_copied=s.bytes_copied,
            seconds=time.monotonic() - started,
            attached=tuple(dict.fromkeys(attached)),
        )
    finally:
        if own:
            await sess.close()
