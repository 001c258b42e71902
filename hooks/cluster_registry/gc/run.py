"""One GC run: threshold -> references -> soft delete -> online mark -> read-only window (lock, drain,
reconcile what was written since the mark, sweep) -> report. The design is in ``sweep``'s docstring."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from kubernetes import client

from cluster_registry.errors import ClusterRegistryError, ConfigError, TemporaryError
from cluster_registry.gc import objectstore, registry, storage, sweep
from cluster_registry.gc.cluster import ClusterView
from cluster_registry.gc.lock import GCLock
from cluster_registry.gc.select import Inputs, Manifest, Selection, select
from cluster_registry.gc.threshold import decide
from cluster_registry.oci.auth import Credentials

log = logging.getLogger(__name__)


@dataclass
class Options:
    registry_url: str
    storage_root: str | None  # the filesystem driver's root; None: inventory and usage through the API
    storage_size: int  # bytes
    threshold: int = 0  # percent
    grace: int = 3600  # seconds
    lock_name: str = "cluster-registry-gc"
    namespace: str = "default"
    registry_config: str | None = None
    registry_binary: str | None = None
    credentials: Credentials | None = None
    local_hosts: frozenset[str] = frozenset()
    drain_timeout: float = 60.0
    quiet_wait: float = 30.0  # before the lock: wait for the replicas' push tokens to die (GCLock.wait_quiet)
    max_window: float = 300.0  # the read-only window's bound: past it the sweep is aborted, writes resume
    lease_seconds: int = 15
    dry_run: bool = False
    artifact_namespaces: frozenset[str] = frozenset()  # only these namespaces' Artifacts may be deleted
    sweep: bool = True  # run the read-only window (mark-and-sweep) after the soft delete
    sweep_mode: str = "online"  # or "trash" (mark and renames inside the window) or "distribution" (its own sweep)
    say: Callable[[str], None] = print  # where --dry-run's "would delete" lines go
    object_store: objectstore.ObjectStore | None = None  # usage and blobs freed read from the bucket/container


@dataclass
class Report:
    """The counters printed as the run's last line (camelCase keys, like the CRDs)."""

    dryRun: bool = False
    ran: bool = False
    usageBytes: int = 0
    usagePercent: float = 0.0
    storageSizeBytes: int = 0
    thresholdPercent: int = 0
    manifestsSeen: int = 0
    manifestsKept: int = 0
    manifestsDeleted: int = 0
    manifestsDeleteFailed: int = 0
    artifactsSeen: int = 0
    artifactsDeleted: int = 0
    artifactsChanged: int = 0  # changed since read (e.g. a new owner): kept, with their images
    manifestsRaced: int = 0  # deleted, but referenced again by the time the deletes were done
    blobsDeleted: int = 0
    bytesFreed: int = 0
    usageBytesAfter: int = 0
    gatesAcked: int = 0
    quietWaitSeconds: float = 0.0  # before the window, writes going on: for push tokens issued just before to die
    drainSeconds: float = 0.0
    markSeconds: float = 0.0  # the online mark, before the window (writes go on)
    markCpuSeconds: float = 0.0
    setAsideSeconds: float = 0.0  # after the mark, before the window: the renames of what goes (writes go on)
    sparedSinceMark: int = 0  # blobs and layer links the mark judged unreferenced, written or named since: kept
    sweepSeconds: float = 0.0
    sweepCpuSeconds: float = 0.0  # user + system time of the sweep process (wall time suffers on a busy node)
    windowSeconds: float = 0.0
    runSeconds: float = 0.0
    error: str = ""
    deleted: list[str] = field(default_factory=list)

    def window_line(self) -> str:
        """The read-only window for people: printed before the JSON report and sent as an Event."""
        return (
            f"read-only window: writes were held off for {self.windowSeconds:.3f}s "
            f"(drain {self.drainSeconds:.3f}s, sweep {self.sweepSeconds:.3f}s)"
        )

    def as_dict(self, with_lists: bool = False) -> dict[str, Any]:
        out = dict(vars(self))
        for k in ("drainSeconds", "quietWaitSeconds", "markSeconds", "markCpuSeconds", "setAsideSeconds", "sweepSeconds", "sweepCpuSeconds", "windowSeconds",
                  "runSeconds", "usagePercent"):  # fmt: skip
            out[k] = round(out[k], 3)
        if not with_lists:
            out.pop("deleted")
        if not out["error"]:
            out.pop("error")
        return out


def blob_sizes(opts: Options) -> dict[str, int]:
    """digest -> size of what the registry stores (filesystem), or of what its tagged images name (API)."""
    if opts.storage_root:
        return storage.blob_sizes(opts.storage_root)
    if opts.object_store:
        return objectstore.blob_sizes(opts.object_store)
    return registry.inventory_sizes(opts.registry_url, opts.credentials)[1]


def usage_bytes(opts: Options) -> int:
    return sum(blob_sizes(opts).values())


def gather(view: ClusterView, opts: Options, now: datetime) -> tuple[Inputs, list[Manifest]]:
    if opts.storage_root:
        manifests = storage.inventory(opts.storage_root)
    else:
        # On object storage the store's revision links name every manifest, untagged ones too (the API
        # lists only tags), and give the push times the API lacks. The times are listed again AFTER the
        # API's listing: a manifest pushed between the two listings would otherwise have no push time and
        # count as past the grace period.
        store = opts.object_store
        untagged = objectstore.revisions(store) if store else {}
        manifests = registry.inventory_sizes(opts.registry_url, opts.credentials, untagged=untagged)[0]
        if store:
            times = objectstore.revisions(store)
            manifests = [replace(m, pushed_at=times.get(m.key, m.pushed_at)) for m in manifests]
    workloads = view.workloads()
    artifacts = view.artifacts()
    components = view.components()
    uids = {w.uid for w in workloads}
    uids |= view.live_owner_uids(artifacts, uids)
    inputs = Inputs(
        manifests=tuple(manifests),
        artifacts=tuple(artifacts),
        workloads=tuple(workloads),
        components=tuple(components),
        live_uids=frozenset(uids),
        now=now,
        grace=timedelta(seconds=opts.grace),
        local_hosts=opts.local_hosts,
    )
    return inputs, manifests


def run_once(opts: Options, api: client.ApiClient) -> Report:
    t0 = time.monotonic()
    rep = Report(dryRun=opts.dry_run, storageSizeBytes=opts.storage_size, thresholdPercent=opts.threshold)
    try:
        _run(opts, api, rep)
    except ClusterRegistryError as err:
        rep.error = str(err)
        log.error("gc failed", extra={"error": str(err), "detail": err.detail})
    finally:
        rep.runSeconds = time.monotonic() - t0
    return rep


def _run(opts: Options, api: client.ApiClient, rep: Report) -> None:
    sizes = blob_sizes(opts)
    used = sum(sizes.values())
    dec = decide(used, opts.storage_size, opts.threshold)
    rep.usageBytes, rep.usagePercent = used, dec.percent
    if not dec.run:
        log.info("usage below the threshold; nothing to do", extra={"percent": round(dec.percent, 2)})
        rep.usageBytesAfter = used
        return
    rep.ran = True
    view = ClusterView(api)
    inputs, manifests = gather(view, opts, datetime.now(timezone.utc))
    sel = select(inputs)
    if opts.artifact_namespaces:
        sel.delete_artifacts = [(a, w) for a, w in sel.delete_artifacts if a.namespace in opts.artifact_namespaces]
    rep.manifestsSeen, rep.artifactsSeen = len(manifests), len(inputs.artifacts)
    rep.manifestsKept = len(sel.keep)

    if opts.dry_run:
        for m in sel.delete_manifests:
            opts.say(f"would delete manifest {m} tags={sorted(m.tags)}")
        for a, why in sel.delete_artifacts:
            opts.say(f"would delete Artifact {a} ({a.source}): {why}")
        rep.manifestsDeleted = len(sel.delete_manifests)
        rep.artifactsDeleted = len(sel.delete_artifacts)
        rep.usageBytesAfter = used
        return

    log.info("soft delete starting", extra={"manifests": len(sel.delete_manifests), "artifacts": len(sel.delete_artifacts)})
    _soft_delete(opts, view, sel, rep)
    _recheck(opts, view, inputs, sel, rep)
    if opts.sweep:
        if opts.storage_root:
            sweep.empty_trash(opts.storage_root)  # left by a killed run: put back what it had not settled
        try:
            _window(opts, api, rep, sizes)
        except WindowExceeded as err:
            view.window_event(opts.namespace, opts.lock_name, err.message, type_="Warning", reason="SweepAborted")
            raise
        finally:
            if rep.windowSeconds:
                view.window_event(opts.namespace, opts.lock_name, rep.window_line())
        if opts.storage_root:
            sweep.empty_trash(opts.storage_root)
    after = blob_sizes(opts)
    rep.usageBytesAfter = sum(after.values())
    if opts.sweep and (opts.storage_root or opts.object_store):
        gone = sizes.keys() - after.keys()
        rep.blobsDeleted, rep.bytesFreed = len(gone), sum(sizes[d] for d in gone)


def _soft_delete(opts: Options, view: ClusterView, sel: Selection, rep: Report) -> None:
    """Artifacts first (each only if unchanged since read; a changed one protects its repository),
    then the manifests through the registry API, indexes before their platform manifests."""
    protected_repos: set[str] = set()
    for a, why in sel.delete_artifacts:
        if view.delete_artifact(a):
            rep.artifactsDeleted += 1
            view.event(a, "GarbageCollected", f"deleted by cluster-registry gc: {why}")
        else:
            rep.artifactsChanged += 1
            protected_repos |= {repo for repo, _ in sel.artifact_keys.get(str(a), [])}
            log.info("Artifact changed since read; keeping its images", extra={"artifact": str(a)})
    waves = [[(m.repository, m.digest) for m in wave if m.repository not in protected_repos] for wave in sel.delete_waves]
    outcomes = registry.delete_sync(opts.registry_url, waves, opts.credentials)
    for o in outcomes:
        if o.status == "failed":
            rep.manifestsDeleteFailed += 1
            log.warning("manifest delete failed", extra={"manifest": f"{o.repository}@{o.digest}", "error": o.error})
        else:
            rep.manifestsDeleted += 1
            rep.deleted.append(f"{o.repository}@{o.digest}")
    log.info("soft delete done", extra={"manifests": rep.manifestsDeleted, "artifacts": rep.artifactsDeleted})


def _recheck(opts: Options, view: ClusterView, before: Inputs, sel: Selection, rep: Report) -> None:
    """Read the references again after the deletes: a pod or Artifact that appeared meanwhile may name
    an image just deleted (the race every registry GC has). Say so on its Artifacts, with a Warning
    Event, so the copy is redone (the reconciler re-verifies Ready Artifacts) and the report shows it."""
    if not rep.deleted:
        return
    deleted = {tuple(d.rsplit("@", 1)) for d in rep.deleted}
    gone = tuple(m for m in sel.delete_manifests if m.key in deleted)
    artifacts = view.artifacts()
    workloads = view.workloads()
    fresh = Inputs(gone, tuple(artifacts), tuple(workloads), tuple(view.components()),
                   frozenset(w.uid for w in workloads) | before.live_uids, before.now, before.grace,
                   before.local_hosts)  # fmt: skip
    again = select(fresh)
    raced = {k for k, why in again.keep.items() if any(not w.startswith("grace: pushed") for w in why)}
    rep.manifestsRaced = len(raced)
    for a in artifacts:
        if any(k in raced for k in again.artifact_keys.get(str(a), [])):
            view.event(a, "ImageGarbageCollected", "cluster-registry gc deleted this image while it was being "
                       "referenced again; it must be copied again", type_="Warning")  # fmt: skip
    if raced:
        log.warning("images deleted while referenced again", extra={"manifests": sorted(f"{r}@{d}" for r, d in raced)})


def _window(opts: Options, api: client.ApiClient, rep: Report, sizes: dict[str, int]) -> None:
    """The read-only window: take the lock, wait for every gate to drain, sweep, release.

    Nothing but the sweep itself runs inside it: blobs and bytes freed are counted from the sizes read
    at the start of the run (blobs there then and gone after the sweep, or the sweep's own list when
    there is no filesystem to look at), so a blob first written after that read and swept as an
    unfinished upload is not counted."""
    if not opts.registry_config and not opts.storage_root:
        raise ConfigError("the sweep needs --registry-config (the registry's own config) or --storage-root")
    if opts.storage_root and not storage.has_repositories(opts.storage_root):
        log.info("the registry has never stored an image: nothing to sweep")
        return
    if opts.object_store and not objectstore.has_repositories(opts.object_store):
        log.info("the registry has never stored an image: nothing to sweep")
        return
    config = opts.registry_config or sweep.default_config(str(opts.storage_root))
    lock = GCLock(api, opts.namespace, opts.lock_name, duration=opts.lease_seconds)
    w0 = time.monotonic()
    marked = None
    try:
        marked = _mark_online(opts, config, rep)
        if marked is not None and opts.storage_root:
            rep.setAsideSeconds = sweep.set_aside(opts.storage_root, marked)
        rep.quietWaitSeconds = lock.wait_quiet(opts.quiet_wait)
        w0 = time.monotonic()
        lock.acquire()
        _locked(opts, lock, config, rep, sizes, marked)
    finally:
        rep.windowSeconds = time.monotonic() - w0
        lock.release(window_seconds=rep.windowSeconds)  # the gates export it as a metric
        if marked is not None:
            marked.aside.restore()  # not settled inside the window (it failed): nothing set aside is lost
        if not opts.registry_config:
            os.unlink(config)
    if marked is not None and opts.storage_root:  # writes go on: see sweep.unlink_after
        sweep.unlink_after(opts.storage_root, marked)
    log.info(
        "read-only window closed",
        extra={"seconds": round(rep.windowSeconds, 3), "blobs": rep.blobsDeleted, "bytes": rep.bytesFreed},
    )


def _mark_online(opts: Options, config: str, rep: Report) -> sweep.Mark | None:
    """The online mark (filesystem driver; without the lock). distribution's mark fails when a manifest
    it listed is deleted before it reads it (another client's delete): the mark is then taken inside
    the window as in the ``trash`` mode. Object storage always marks inside the window (``sweep.run``)."""
    if opts.sweep_mode != "online" or not opts.storage_root:
        return None
    try:
        marked = sweep.mark(config, opts.storage_root, binary=opts.registry_binary)
    except TemporaryError as err:
        log.warning("the online mark failed; marking inside the window", extra={"error": str(err), "detail": err.detail})
        return None
    rep.markSeconds, rep.markCpuSeconds = marked.result.seconds, marked.result.cpu_seconds
    return marked


class WindowExceeded(TemporaryError):
    """The sweep outlasted ``--max-window``: it was killed and the lock released (the next run retries)."""


def _locked(
    opts: Options, lock: GCLock, config: str, rep: Report, sizes: dict[str, int], marked: sweep.Mark | None = None
) -> None:
    """Inside the window: wait for the gates to drain, then sweep, all within ``opts.max_window``
    (a hung sweep must not hold every write off until the Job's deadline). A sweep that renames aside
    puts everything back when it loses the lock before it is done."""
    deadline = time.monotonic() + opts.max_window
    drained = lock.wait_drained(min(opts.drain_timeout, opts.max_window))
    rep.gatesAcked, rep.drainSeconds = len(drained.acked), drained.seconds
    # With the filesystem or the bucket at hand the sweep runs quiet and the deleted blobs are counted after
    # the window (what was there at the start and is gone now); otherwise from its output.
    quiet = bool(opts.storage_root or opts.object_store)

    def keep_going() -> bool:
        return lock.safe() and time.monotonic() < deadline

    trash = marked.aside if marked is not None else sweep.Trash()
    try:
        if marked is not None and opts.storage_root:
            res = sweep.settle(opts.storage_root, marked, keep_going=keep_going)
            rep.sparedSinceMark = marked.spared
        elif opts.sweep_mode != "distribution" and opts.storage_root:
            res = sweep.run_trash(config, opts.storage_root, binary=opts.registry_binary, keep_going=keep_going,
                                  trash=trash)  # fmt: skip
        else:
            res = sweep.run(config, binary=opts.registry_binary, keep_going=keep_going, quiet=quiet)
    except TemporaryError:
        trash.restore()
        if time.monotonic() >= deadline:
            raise WindowExceeded(
                f"the sweep outlasted the maximum read-only window of {opts.max_window:.0f}s: it was aborted, "
                "the write lock released and writes resumed; nothing it had not finished was deleted"
            ) from None
        raise
    if not lock.safe():
        trash.restore()
        raise TemporaryError("the write lock lapsed during the sweep")
    if marked is not None:
        sweep.commit(marked)
    rep.sweepSeconds, rep.sweepCpuSeconds = res.seconds, res.cpu_seconds
    if not quiet:
        rep.blobsDeleted = res.blobs_deleted
        rep.bytesFreed = sum(sizes.get(d, 0) for d in res.deleted_digests)
