"""The artifact reconciler: copies each Artifact's source into the cluster registry and reports status.

Flow: an :class:`~cluster_registry.kubeio.Informer` lists then watches Artifacts; each one maps to its destination
(``<registry host>/<reference.local_repository(source)>`` with tag and digest), and the destination
is the unit of work in a deduplicating :class:`~.queue.DelayQueue`, so Artifacts of the same source
in many namespaces cause one copy while each gets its own status. ``workers`` asyncio tasks take due
destinations; what to do and when to come back is decided by the pure core in :mod:`.status`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cluster_registry import reference
from cluster_registry.api import ARTIFACTS, Phase
from cluster_registry.errors import ClusterRegistryError, ConfigError, InvalidReferenceError
from cluster_registry.oci import (
    CopyOptions,
    CopyResult,
    Credentials,
    RegistryOptions,
    RegistrySession,
    copy_image,
    credentials_from_docker_config,
)
from cluster_registry.oci.auth import read_credentials_file
from cluster_registry.reconcile import status as st
from cluster_registry.kubeio import Informer, Kube, Obj, key_of
from cluster_registry.reconcile.metrics import ArtifactMetrics
from cluster_registry.reconcile.pullsecrets import PullSecrets
from cluster_registry.reconcile.queue import DelayQueue, Groups
from cluster_registry.reconcile.worker import next_due, reported_after, store_newer

log = logging.getLogger(__name__)

CONTROLLER = "clusterregistry.io/artifact-reconciler"
# Seconds one read of a pull Secret serves: a namespace's images, queued together, are copied with one
# GET of its Secret instead of one each (a fleet's 600 Artifacts in 50 namespaces: 50 reads, not 600).
# A changed Secret is seen by the next read after it; a retry for one (recheck_secrets) reads afresh.
SECRET_REUSE = 5.0

# (source, destination, source credentials) -> result; raises ClusterRegistryError
CopyFn = Callable[[reference.Reference, reference.Reference, Credentials | None], Awaitable[CopyResult]]
# destination -> the digest the cluster registry holds for it, or None when absent
VerifyFn = Callable[[reference.Reference], Awaitable[str | None]]


@dataclass(frozen=True)
class Config:
    registry_host: str
    registry_insecure: bool = False
    registry_credentials: Credentials | None = None
    # re-read on each use (the mounted Secret is refreshed by the kubelet): a rotated push password
    # is in use without a restart
    registry_credentials_file: str | None = None
    workers: int = 4
    insecure_registries: frozenset[str] = frozenset()
    ca_bundle: str | None = None
    verify_interval: float = 600.0
    policy: st.BackoffPolicy = field(default_factory=st.BackoffPolicy)
    identity: str = "artifact-reconciler"
    copy_concurrency: int = 8
    watch_namespace: str | None = None  # None: Artifacts of every namespace
    max_image_size: int = 0  # bytes an image's blobs may declare (0: no limit)
    namespace_quota: int = 0  # bytes of Ready images one namespace may hold (0: no quota)
    # Pending and Copying are written only for a copy still running this many seconds after it began
    # (no status already reads as Pending); 0: both at once, two more status writes and an Event each
    progress_delay: float = 0.0

    def registry_options(self) -> RegistryOptions:
        insecure = set(self.insecure_registries)
        if self.registry_insecure:
            insecure.add(self.registry_host)
        return RegistryOptions(insecure_hosts=frozenset(insecure), ca_bundle=self.ca_bundle)


class _Access(NamedTuple):
    """How one namespace reaches a source: its credentials (None: anonymous), the Secrets it names, those missing."""

    credentials: Credentials | None
    secrets: tuple[str, ...]
    missing: tuple[str, ...]


def _secret_digest(namespace: str, name: str, data: bytes | None) -> bytes:
    """A one-way digest of a pull secret's content (None: missing), for change detection only."""
    return hashlib.sha256(f"{namespace}/{name}\0".encode() + (b"\1" + data if data is not None else b"\0")).digest()


class ArtifactReconciler:
    def __init__(
        self,
        kube: Kube,
        config: Config,
        metrics: ArtifactMetrics,
        *,
        copy: CopyFn | None = None,
        verify: VerifyFn | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        pull_secrets: PullSecrets | None = None,
    ) -> None:
        self.kube = kube
        self.pull_secrets = pull_secrets  # registryAccess isolated: every Artifact's namespace gets the pull Secret
        self.config = config
        self.metrics = metrics
        self._copy = copy
        self._verify = verify
        self.rand = rand
        self.clock = clock
        self.objects: dict[str, Obj] = {}
        self.groups = Groups()
        self.queue = DelayQueue()
        self.handled: dict[str, int] = {}  # artifact key -> generation the scheduler owns
        self.copy_wanted: set[str] = set()  # destinations to copy (not just verify)
        self.lost: set[str] = set()  # destinations found missing from the cluster registry
        self.attempts: dict[str, int] = {}  # destination -> consecutive failures
        # destination -> fingerprint of its pull secrets when a copy failed for want of access; a
        # changed fingerprint (a Secret created or fixed) retries at once instead of after the backoff
        self.secrets_at_failure: dict[str, str] = {}
        self.informer: Informer | None = None
        self._push_credentials = config.registry_credentials
        self.session: RegistrySession | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}  # artifact key -> serialises its status writes
        self._events: dict[str, asyncio.Future[None]] = {}  # artifact key -> its last Event being sent
        # (namespace, Secret) -> when read, and the read (shared while under way and SECRET_REUSE after)
        self._secret_reads: dict[tuple[str, str], tuple[float, asyncio.Future[bytes | None]]] = {}

    # -- adapters to the copy engine ----------------------------------------------------------------

    def push_credentials(self) -> Credentials | None:
        """The cluster registry credential, read from its file now (the last good one if it cannot be)."""
        path = self.config.registry_credentials_file
        if path:
            try:
                self._push_credentials = read_credentials_file(path)
            except ConfigError as err:
                log.warning("cannot re-read the registry credentials; keeping the last ones: %s", err)
        return self._push_credentials

    async def copy(
        self, src: reference.Reference, dst: reference.Reference, creds: Credentials | None, max_size: int = 0
    ) -> CopyResult:
        """Copy ``src`` to ``dst``; ``max_size``: what the image may declare (0: no limit)."""
        if self._copy is not None:
            return await self._copy(src, dst, creds)
        assert self.session is not None
        return await copy_image(
            src, dst, session=self.session, src_auth=creds, dst_auth=self.push_credentials(),
            options=CopyOptions(concurrency=self.config.copy_concurrency, max_image_size=max_size),
        )

    async def verify(self, dst: reference.Reference) -> str | None:
        if self._verify is not None:
            return await self._verify(dst)
        assert self.session is not None
        repo = self.session.repository(dst.host, dst.repository, self.push_credentials())
        found = await repo.head_manifest(dst.pull_ref)  # a pinned copy is by digest: its tag is not ours
        return found[0] if found else None

    # -- events ---------------------------------------------------------------------------------

    def on_event(self, type_: str, obj: Obj) -> None:
        key = key_of(obj)
        if st.claimed_elsewhere(obj, self.config.registry_host):
            type_ = "DELETED"  # another installation's: not ours to touch (forget it if we knew it)
        if type_ == "DELETED":
            self.objects.pop(key, None)
            self.handled.pop(key, None)
            self._locks.pop(key, None)
            dest = self.groups.set(key, None)
            if dest is not None and not self.groups.members(dest):
                self._drop(dest)
            self._gauges()
            return
        store_newer(self.objects, obj)
        v = st.view(self.objects[key])
        if self.pull_secrets is not None:
            self.pull_secrets.add(v.namespace)
        try:
            dest = st.destination(v.source, self.config.registry_host)
        except InvalidReferenceError as err:
            self.groups.set(key, None)
            if self.handled.get(key) != v.generation:
                self.handled[key] = v.generation
                self._spawn(self._write(v, st.CopyFailed("InvalidReference", err.message, False)))
            return
        old = self.groups.set(key, dest)
        if old is not None and old != dest and not self.groups.members(old):
            self._drop(old)
        if self.handled.get(key) == v.generation and old == dest:
            return  # our own status write, or nothing the scheduler does not already own
        self.handled[key] = v.generation
        due, mode = st.first_due(v, self.clock(), self.config.verify_interval, self.rand(), self.config.policy, dest)
        if mode is st.Mode.COPY:
            self.copy_wanted.add(dest)
            if not v.observed:
                self.attempts.pop(dest, None)  # a new spec starts a fresh backoff
            if not v.phase and self.config.progress_delay <= 0:  # brand new: say it is queued (workers may all be busy)
                self._spawn(self._write(v, st.Queued(v.source, dest)))
        self.queue.add(dest, due)
        self._wake.set()
        self._gauges()

    def _drop(self, dest: str) -> None:
        """Forget a destination no Artifact points at any more."""
        self.queue.forget(dest)
        self.copy_wanted.discard(dest)
        self.lost.discard(dest)
        self.attempts.pop(dest, None)
        self.secrets_at_failure.pop(dest, None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gauges(self) -> None:
        now = self.clock()
        self.metrics.queue_depth.set(self.queue.due_count(now))
        self.metrics.queue_scheduled.set(len(self.queue))

    # -- workers ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled (the leader elector cancels it when leadership is lost)."""
        loop = asyncio.get_running_loop()
        # Leadership may have been lost and regained: start from a fresh list, not stale memory.
        self.objects, self.groups, self.queue = {}, Groups(), DelayQueue()
        self.handled, self.copy_wanted, self.lost, self.attempts, self.secrets_at_failure = {}, set(), set(), {}, {}
        self.session = RegistrySession(self.config.registry_options())
        self.informer = Informer(self.kube, ARTIFACTS, loop, self.on_event, namespace=self.config.watch_namespace)
        self.informer.start()
        workers = [asyncio.ensure_future(self.worker(i)) for i in range(max(1, self.config.workers))]
        helpers = [asyncio.ensure_future(self._phase_gauge()), asyncio.ensure_future(self._watch_secrets())]
        if self.pull_secrets is not None:
            self.pull_secrets.namespaces.clear()  # a new term: namespaces come from the fresh list
            self.pull_secrets.written.clear()
            helpers.append(asyncio.ensure_future(self.pull_secrets.run()))
        try:
            await asyncio.gather(*workers, *helpers)
        finally:
            self.informer.stop()
            for task in [*workers, *helpers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*workers, *helpers, *self._tasks, return_exceptions=True)
            await self.session.close()

    async def _watch_secrets(self, interval: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval * (0.8 + 0.4 * self.rand()))
            await self.recheck_secrets()

    async def recheck_secrets(self) -> list[str]:
        """Retry now every destination whose access failure may be fixed: its pull secrets changed."""
        retried = []
        for dest, before in list(self.secrets_at_failure.items()):
            members = self.members(dest)
            if not members or self.queue.processing(dest):
                continue
            if await self._secrets_fingerprint(members) != before:
                log.info("pull secrets changed: retrying now", extra={"destination": dest})
                self._secret_reads.clear()  # the retry reads what changed, not a copy read before
                self.secrets_at_failure.pop(dest, None)
                self.attempts.pop(dest, None)
                self.queue.add(dest, self.clock())
                self._wake.set()
                retried.append(dest)
        return retried

    async def _secrets_fingerprint(self, members: list[st.ArtifactView]) -> str:
        digest = hashlib.sha256()
        for m in members:
            for name in m.pull_secrets:
                try:
                    data = await asyncio.to_thread(self.kube.docker_config, m.namespace, name)
                except Exception:  # noqa: BLE001 - unknown: as when the copy could not read it
                    data = b"?"
                digest.update(_secret_digest(m.namespace, name, data))
        return digest.hexdigest()

    async def _phase_gauge(self) -> None:
        while True:
            counts = {p.value: 0 for p in Phase}
            for obj in list(self.objects.values()):
                phase = str((obj.get("status") or {}).get("phase") or Phase.PENDING.value)
                counts[phase] = counts.get(phase, 0) + 1
            for phase, n in counts.items():
                self.metrics.artifacts.labels(phase).set(n)
            self._gauges()
            await asyncio.sleep(5)

    async def worker(self, n: int) -> None:
        # Work starts on the first complete list: Artifacts that share a copy (two namespaces, one image)
        # are then in one attempt, not the second joining late and getting an attempt of its own.
        while self.informer is not None and not self.informer.synced.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # the list's events, queued before ``synced`` was set, are handled first
        while True:
            dest = await next_due(self.queue, self._wake, self.clock)
            self._gauges()
            next_at: float | None = None
            try:
                next_at = await self.process(dest)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug or an API outage: log, back off, carry on
                log.exception("reconciling %s failed", dest)
                attempt = self.attempts[dest] = self.attempts.get(dest, 0) + 1
                next_at = self.clock() + st.backoff_delay(attempt, True, self.rand(), self.config.policy)
            finally:
                self.queue.done(dest, next_at)
                self._wake.set()
                self._gauges()

    def members(self, dest: str) -> list[st.ArtifactView]:
        return [st.view(self.objects[k]) for k in self.groups.members(dest) if k in self.objects]

    async def process(self, dest: str) -> float | None:
        """Verify or copy one destination for all its Artifacts; return when to look again."""
        members = self.members(dest)
        if not members:
            return None
        src = reference.parse(members[0].source)
        dst = reference.parse(dest)
        cfg = self.config
        copy_needed = dest in self.copy_wanted or any(not m.observed or m.phase != Phase.READY for m in members)
        if not copy_needed:
            want = str(members[0].status.get("digest") or "")
            try:
                have = await self.verify(dst)
            except Exception as err:  # noqa: BLE001 - the registry may be briefly away
                self.metrics.verifications.labels("error").inc()
                attempt = self.attempts[dest] = self.attempts.get(dest, 0) + 1
                log.warning("verifying %s failed (%s); retrying later", dest, getattr(err, "message", type(err).__name__))
                return self.clock() + st.backoff_delay(attempt, True, self.rand(), cfg.policy)
            if have and (not want or have == want):
                self.metrics.verifications.labels("present").inc()
                self.attempts.pop(dest, None)
                return self.clock() + cfg.verify_interval * (0.9 + 0.2 * self.rand())
            self.metrics.verifications.labels("missing").inc()
            self.lost.add(dest)
            log.warning("%s is missing from the cluster registry (or holds another digest): copying again", dest)
            for m in members:
                await self._event(m, st.Event("Warning", "Missing", f"{dest} is gone from the cluster registry; copying it again"))
        self.copy_wanted.add(dest)

        def affected(m: st.ArtifactView) -> bool:
            # An Artifact already Ready stays Ready while the cluster registry holds its image: a copy
            # started for a newcomer (another namespace, a new spec) must not turn it Copying or
            # Failed when the source is unreachable, the very case the cluster registry is for.
            return dest in self.lost or not (m.observed and m.phase == Phase.READY)

        def intact(m: st.ArtifactView) -> bool:
            # Ready with this copy, but with a new spec (an owner or pull secret added: every new Job of a
            # CronJob adds one): the attempt re-checks the namespace's access, and only its verdict, not an
            # unreachable source, may take Ready away.
            return dest not in self.lost and m.phase == Phase.READY and m.status.get("localArtifact") == dest

        usage = st.namespace_usage(self.objects.values(), members[0].source) if cfg.namespace_quota else {}
        over = {m.key for m in members if affected(m) and usage.get(m.namespace, 0) >= cfg.namespace_quota > 0}
        for m in members:
            if m.key in over:
                await self._write(m, st.quota_exceeded(m.namespace, usage[m.namespace], cfg.namespace_quota))
        if over and all(m.key in over or not affected(m) for m in members):
            return self.clock() + st.backoff_delay(self.attempts.get(dest, 0) + 1, False, self.rand(), cfg.policy)
        # the image may take the namespaces it is copied for up to their quota, and no image past the maximum
        left = [cfg.namespace_quota - usage.get(m.namespace, 0) for m in members if affected(m) and m.key not in over]
        max_size = min([n for n in (cfg.max_image_size, *left) if n > 0], default=0)
        quota_limited = bool(left) and max_size in left and max_size != cfg.max_image_size
        # Each namespace reaches the source with its own pull secrets (or anonymously), never another's:
        # an Artifact is Ready only when ITS credentials fetched the manifest (a copy, or a few requests
        # when the image is already there). Namespaces with the same credentials share one attempt.
        targets = [m for m in members if m.key not in over and affected(m)] or [m for m in members if m.key not in over]
        access, secrets_fp = await self._credentials(members, src.host)  # a namespace: all its Artifacts' secrets
        attempts: dict[Credentials | None, list[st.ArtifactView]] = {}
        for m in targets:
            attempts.setdefault(access[m.namespace].credentials, []).append(m)
        outcomes: dict[str, st.Outcome] = {}

        async def started() -> None:
            for m in members:
                if m.key not in over and affected(m) and not intact(m):
                    await self._write(m, st.Started(str(src), dest))

        async with reported_after(cfg.progress_delay, started):
            for creds, group in attempts.items():
                outcome = await self._attempt(src, dst, creds, max_size)
                for m in group:
                    own = access[m.namespace]
                    outcomes[m.key] = st.for_namespace(outcome, m.namespace, own.secrets, own.missing)
                if isinstance(outcome, st.Locked):
                    break  # every other attempt would wait on the same lock
        late = False
        reports: list[tuple[st.ArtifactView, st.Outcome]] = []
        for m in self.members(dest):  # fresh: members may have changed during the copy
            if m.key in outcomes:
                outcome = outcomes[m.key]
                if intact(m) and (isinstance(outcome, st.Locked) or isinstance(outcome, st.CopyFailed) and outcome.temporary):
                    continue  # stays Ready; retried with the others
                reports.append((m, st.within_quota(outcome, m, usage, cfg.namespace_quota, quota_limited)))
            elif m.key not in over and not (m.observed and m.phase == Phase.READY):
                late = True  # joined during the copy: its own attempt comes next
        if reports:
            self._spawn(self._report(dest, reports))
        now = self.clock()
        self.secrets_at_failure.pop(dest, None)
        done = list(outcomes.values())
        if done and all(isinstance(o, st.Copied) for o in done):
            self.copy_wanted.discard(dest)
            self.lost.discard(dest)
            self.attempts.pop(dest, None)
            return now if late else now + cfg.verify_interval * (0.9 + 0.2 * self.rand())
        if not done or any(isinstance(o, st.Locked) for o in done):
            return now + st.deferred_delay(self.rand(), cfg.policy)
        if any(isinstance(o, st.Copied) for o in done):
            self.lost.discard(dest)  # the image is there again; what is left is a namespace's access
        failed = [o for o in done if isinstance(o, st.CopyFailed)]
        if any(o.reason in st.ACCESS_REASONS for o in failed):
            self.secrets_at_failure[dest] = secrets_fp  # as read before the copy: no change is missed
        attempt = self.attempts[dest] = self.attempts.get(dest, 0) + 1
        return now + st.backoff_delay(attempt, any(o.temporary for o in failed), self.rand(), cfg.policy)

    async def _report(self, dest: str, reports: list[tuple[st.ArtifactView, st.Outcome]]) -> None:
        """Write an attempt's statuses off the worker's path: the worker's next copy does not wait
        for the API server (a fleet's worth of status writes is one round trip per image). A write
        that fails queues ``dest`` again after a backoff, as a failed attempt would."""
        results = await asyncio.gather(*(self._write(m, outcome) for m, outcome in reports), return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            log.warning("writing the status of %s failed (%s); retrying later", dest, errors[0])
            attempt = self.attempts[dest] = self.attempts.get(dest, 0) + 1
            self.queue.add(dest, self.clock() + st.backoff_delay(attempt, True, self.rand(), self.config.policy))
            self._wake.set()

    async def settled(self) -> None:
        """Return once every status write and Event sent off the workers' paths is done."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _attempt(self, src: reference.Reference, dst: reference.Reference, creds: Credentials | None, max_size: int) -> st.Outcome:
        """One copy of ``src`` with ``creds``, classified, logged and counted."""
        dest = str(dst)
        started = time.monotonic()
        outcome: st.Outcome
        try:
            result = await self.copy(src, dst, creds, max_size)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below; unknown ones count as temporary
            outcome = st.failure(err)
            if not isinstance(err, ClusterRegistryError):
                log.exception("copying %s raised %s", dest, type(err).__name__)
            elif isinstance(outcome, st.CopyFailed):
                log.warning(
                    "copy failed", extra={"destination": dest, "reason": outcome.reason, "error": err.message, "detail": err.detail}
                )
            if isinstance(outcome, st.CopyFailed):
                self.metrics.failures.labels(outcome.reason, "temporary" if outcome.temporary else "permanent").inc()
        else:
            outcome = st.Copied(dest, result.digest, result.size, tuple(result.platforms))
            self.metrics.copy_bytes.inc(result.bytes_copied)
            log.info(
                "copied", extra={"destination": dest, "digest": result.digest, "size": result.size, "seconds": round(result.seconds, 3)}
            )
        result_label = {st.Copied: "ready", st.CopyFailed: "failed", st.Locked: "deferred"}[type(outcome)]
        self.metrics.copies.labels(result_label).inc()
        self.metrics.copy_seconds.labels(result_label).observe(time.monotonic() - started)
        return outcome

    async def _credentials(self, members: list[st.ArtifactView], host: str) -> tuple[dict[str, _Access], str]:
        """Each member namespace's own source credentials (the first of its Artifacts' pull secrets that
        has ``host``; None: anonymous), the Secrets tried and those missing; and a fingerprint of every
        pull secret read (to notice one created or fixed). Secrets are never shared across namespaces."""
        names: dict[str, list[str]] = {}
        for m in members:
            names.setdefault(m.namespace, [])
            names[m.namespace] += [n for n in m.pull_secrets if n not in names[m.namespace]]
        access: dict[str, _Access] = {}
        fingerprint = hashlib.sha256()
        for namespace, secrets in names.items():
            found: Credentials | None = None
            missing: list[str] = []
            for name in secrets:
                try:
                    data = await self._docker_config(namespace, name)
                except Exception as err:  # noqa: BLE001
                    log.warning("reading pull secret %s/%s failed: %s", namespace, name, getattr(err, "status", type(err).__name__))
                    data = b"?"
                fingerprint.update(_secret_digest(namespace, name, data))
                if data is None:
                    missing.append(f"{namespace}/{name}")
                    continue
                if found is not None or data == b"?":
                    continue
                try:
                    found = credentials_from_docker_config(data, host)
                except ClusterRegistryError as err:
                    log.warning("pull secret %s/%s: %s", namespace, name, err.message)
            access[namespace] = _Access(found, tuple(secrets), tuple(missing))
        return access, fingerprint.hexdigest()

    async def _docker_config(self, namespace: str, name: str) -> bytes | None:
        """A pull Secret's docker config, read at most once per SECRET_REUSE seconds (a failed read is not kept)."""
        key, now = (namespace, name), time.monotonic()
        held = self._secret_reads.get(key)
        if held is None or now - held[0] > SECRET_REUSE:
            if len(self._secret_reads) > 1000:  # Secrets no copy asked for lately
                self._secret_reads = {k: v for k, v in self._secret_reads.items() if now - v[0] <= SECRET_REUSE}
            read = asyncio.ensure_future(asyncio.to_thread(self.kube.docker_config, namespace, name))
            held = self._secret_reads[key] = (now, read)

            def failed(f: asyncio.Future[bytes | None], held: tuple[float, asyncio.Future[bytes | None]] = held) -> None:
                if (f.cancelled() or f.exception() is not None) and self._secret_reads.get(key) is held:
                    del self._secret_reads[key]

            read.add_done_callback(failed)
        return await asyncio.shield(held[1])

    async def _write(self, stale: st.ArtifactView, outcome: st.Outcome) -> None:
        """Write the status after ``outcome`` (only what changed) and the Event of the transition.

        Writes to one Artifact are serialised and computed from the latest known object, so a
        queued-write and a worker's write cannot interleave; an outcome for an older generation
        is dropped (the new spec is already queued).
        """
        lock = self._locks.setdefault(stale.key, asyncio.Lock())
        async with lock:
            current = self.objects.get(stale.key)
            if current is None:
                return
            m = st.view(current)
            if (m.generation, m.uid) != (stale.generation, stale.uid):
                return
            new = st.next_status(m.status, m.generation, outcome, self.clock())
            patch = st.status_patch(m.status, new)
            if patch is None:
                return
            try:
                obj = await asyncio.to_thread(self.kube.patch_status, ARTIFACTS, m.namespace, m.name, patch)
            except Exception as err:  # noqa: BLE001
                if getattr(err, "status", None) == 404:
                    return  # deleted meanwhile
                raise
            store_newer(self.objects, obj)
        event = st.transition_event(m.status, new)
        if event is not None:  # best effort, so off the worker's path: the next copy need not wait for it
            prev = self._events.get(stale.key)  # one Artifact's Events still go out in order
            task = asyncio.ensure_future(self._event_after(prev, st.view(obj), event, obj))
            self._events[stale.key] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._event_sent, stale.key))

    def _event_sent(self, key: str, task: asyncio.Future[None]) -> None:
        if self._events.get(key) is task:
            del self._events[key]

    async def _event_after(self, prev: asyncio.Future[None] | None, m: st.ArtifactView, event: st.Event, obj: Obj) -> None:
        if prev is not None:
            await asyncio.wait([prev])
        await self._event(m, event, obj)

    async def _event(self, m: st.ArtifactView, event: st.Event, obj: Obj | None = None) -> None:
        target = obj or self.objects.get(m.key)
        if target is None:
            return
        await asyncio.to_thread(
            self.kube.event, target, event.type, event.reason, event.note,
            action="Copy", controller=CONTROLLER, instance=self.config.identity,
        )
