"""The mark and the sweep: distribution's ``registry garbage-collect`` decides what is unreferenced.

Three modes (``--sweep-mode``):

* ``online`` (the filesystem driver's default), in four steps, only the third behind the write lock:
  ``mark`` runs distribution's own mark (``--dry-run``) while pushes go on; ``set_aside`` renames
  every blob directory it judged unreferenced, and that nothing written since the mark began names,
  into a ``pending-`` trash directory the registry never reads; inside the window ``settle`` puts
  back each one something written since the mark began names (``storage.referenced_since``) and
  ``commit`` declares the rest garbage; after it, ``unlink_after`` takes their layer links and
  ``empty_trash`` unlinks it all. The window costs one stat per repository and per manifest
  revision plus one rename per blob put back: it follows what changed since the mark, not the size
  of the registry nor how much goes (146.5 s at 50,000 images when the whole mark-and-sweep ran
  inside it; 32 s when the 250,000 renames did).
* ``trash``: the mark and the renames inside the window (``sweep_marked``).
* ``distribution``: distribution's mark-and-sweep inside the window. Object storage always runs
  this way: its "directories" have no mtimes to find what was written since a mark, and listing a
  bucket is the slow part anyway.

Why a set-aside settled under the lock rather than no lock at all: zot collects online under each
repository's own lock (pushes to that repository wait) and skips blobs younger than ``gcDelay``;
Harbor (since 2.1) collects without a read-only mode, skips blobs written within a 2-hour time
window, and before deleting a blob marks its database row ``deleting``: its proxy then answers a
HEAD for that blob with 404 (the client uploads it again) and refuses a manifest naming it, and a
push that touched the row first wins (an optimistic version check). Both need a registry that
keeps its own locks or a database; distribution has neither, and a manifest pushed after a mark
may name a blob the mark judged unreferenced (an image deleted by this very run and copied again,
a HEAD or a cross-repository mount that found the blob still there). The rename out of
distribution's tree is our ``deleting`` state: distribution itself then answers 404 and refuses
manifests that name the blob, and the version check is the locked ``settle``, where "written since
the mark" can be read exactly from the files' times and nothing else changes. Nothing is deleted
before ``commit``; a window that fails puts back what was set aside (``Trash.restore``), and so
does the next run for a run killed before it (``empty_trash``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import resource
import signal
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster_registry.errors import ConfigError, TemporaryError
from cluster_registry.gc import storage

log = logging.getLogger(__name__)
_ELIGIBLE = re.compile(r"blob eligible for deletion: (\S+)")
_LAYER_LINK = re.compile(r"^(\S+): layer link eligible for deletion: (\S+)$", re.M)
_SUMMARY = re.compile(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion")


@dataclass
class SweepResult:
    blobs_marked: int = 0
    blobs_deleted: int = 0
    manifests_deleted: int = 0
    deleted_digests: list[str] = field(default_factory=list)
    layer_links: list[tuple[str, str]] = field(default_factory=list)  # (repository, digest)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def registry_binary(explicit: str | None = None) -> str:
    """The ``registry`` binary: explicit, then PATH, then the dev toolchain's ``.cache/bin``."""
    if explicit:
        return explicit
    found = shutil.which("registry")
    if found:
        return found
    dev = Path(__file__).resolve().parents[3] / ".cache" / "bin" / "registry"
    if dev.exists():
        return str(dev)
    raise ConfigError("the distribution `registry` binary is neither on PATH nor in .cache/bin")


def default_config(storage_root: str) -> str:
    """A minimal registry config over ``storage_root`` (when no --registry-config is given)."""
    fd, path = tempfile.mkstemp(prefix="gc-registry-", suffix=".yml")
    with open(fd, "w") as f:
        f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {storage_root}\n  delete:\n    enabled: true\n")
    return path


def _die_with_parent() -> None:
    """In the child: get SIGKILL when GC dies, so a killed GC never leaves a sweep running unlocked."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux/glibc: the container's end kills it instead
        pass


def parse_output(text: str) -> SweepResult:
    res = SweepResult()
    res.deleted_digests = _ELIGIBLE.findall(text)
    res.layer_links = [(m.group(1), m.group(2)) for m in _LAYER_LINK.finditer(text)]
    if m := _SUMMARY.search(text):
        res.blobs_marked, res.blobs_deleted, res.manifests_deleted = (int(g) for g in m.groups())
    else:
        res.blobs_deleted = len(res.deleted_digests)
    return res


def run(
    config: str,
    *,
    binary: str | None = None,
    keep_going: Callable[[], bool] = lambda: True,
    dry_run: bool = False,
    quiet: bool = False,
    poll: float = 0.1,
) -> SweepResult:
    """Run ``registry garbage-collect --delete-untagged=false CONFIG``; kill it when ``keep_going()``
    turns false (the write lock can no longer be guaranteed) and raise TemporaryError."""
    argv = [registry_binary(binary), "garbage-collect", "--delete-untagged=false"]
    if dry_run:
        argv.append("--dry-run")
    if quiet:  # no line per marked/deleted blob: less work inside the window (the caller counts)
        argv.append("--quiet")
    argv.append(config)
    start = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        while proc.poll() is None:
            if not keep_going():
                proc.kill()
                proc.wait()
                raise TemporaryError("mark-and-sweep stopped: the write lock could not be renewed")
            time.sleep(poll)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-5:])
        raise TemporaryError(f"registry garbage-collect failed (exit {proc.returncode})", detail=tail)
    res = parse_output(text)
    res.seconds = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res.cpu_seconds = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return res


TRASH = ".gc-trash"  # under docker/registry/v2, beside blobs/ and repositories/: never read by the registry
MTIME_SLACK = 2.0  # seconds taken off the mark's start: file systems with coarse (1-2 s) timestamps


def trash_root(storage_root: str) -> Path:
    return Path(storage_root) / "docker" / "registry" / "v2" / TRASH


@dataclass
class Mark:
    """distribution's verdict (``garbage-collect --dry-run``): the blobs and layer links no manifest
    referenced when the mark ``started`` (the storage's clock, compared with file mtimes), as the
    renames that carry it out: (digest, path, name in the trash), blob directories first. Paths are
    plain strings made before the window, so the window spends its time on the renames alone."""

    started: float
    result: SweepResult
    moves: list[tuple[str, str, str]] = field(default_factory=list)
    blobs: int = 0  # how many of ``moves`` are blob directories (the rest are layer links)
    spared: int = 0  # candidates written or named since the mark began, kept
    after: list[tuple[str, str, str]] = field(default_factory=list)  # links of blobs the window took: ``unlink_after``
    aside: Trash = field(default_factory=lambda: Trash())  # the blobs ``set_aside`` took, until ``commit``


def verdict(storage_root: str, started: float, res: SweepResult) -> Mark:
    """``res`` as a Mark: the renames of each blob directory and layer link distribution's sweep would delete."""
    v2 = os.path.join(storage_root, "docker", "registry", "v2")
    moves = []
    for d in res.deleted_digests:
        algo, _, hexd = d.partition(":")
        moves.append((d, f"{v2}/blobs/{algo}/{hexd[:2]}/{hexd}", f"blobs/{algo}-{hexd}"))
    for i, (repo, d) in enumerate(res.layer_links):
        algo, _, hexd = d.partition(":")
        moves.append((d, f"{v2}/repositories/{repo}/_layers/{algo}/{hexd}/link", f"links/{i}"))
    return Mark(started, res, moves, len(res.deleted_digests))


def mark(config: str, storage_root: str, *, binary: str | None = None) -> Mark:
    """The mark, taken online (writes go on meanwhile). distribution lists blobs after it has read
    every manifest, so a blob or link written while it ran may be listed although a manifest pushed
    meanwhile names it: those, written since the mark began, are dropped here (the locked phase
    catches the rest, see ``sweep_marked``). The start is read from the storage's own clock (a file
    written there now), as every mtime compared with it is: an NFS server's clock may not be ours."""
    started = _storage_now(storage_root)
    marked = verdict(storage_root, started, run(config, binary=binary, dry_run=True))
    since = started - MTIME_SLACK
    fresh = [i for i, (_, path, _) in enumerate(marked.moves) if _newer(path, since)]
    for i in reversed(fresh):
        del marked.moves[i]
    marked.blobs -= sum(1 for i in fresh if i < marked.blobs)
    marked.spared = len(fresh)
    return marked


def _storage_now(storage_root: str) -> float:
    clock = trash_root(storage_root) / "clock"
    clock.parent.mkdir(parents=True, exist_ok=True)
    clock.touch()
    os.utime(clock)  # "now" as the file system sets it (NFS: the server's time)
    return clock.stat().st_mtime


def _newer(path: str, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except (FileNotFoundError, NotADirectoryError):
        return False


@dataclass
class Trash:
    """What a sweep renamed aside, as (from, to), so a sweep that lost its lock can put it back;
    ``root`` is the directory it renamed into."""

    moved: list[tuple[str, str]] = field(default_factory=list)
    root: str = ""

    def restore(self) -> int:
        """Rename everything back (safe without the lock: it only re-adds content-addressed data).
        A path written again meanwhile (a new upload of the same digest) wins; the copy stays in the
        trash for ``empty_trash``."""
        back = 0
        for src, dst in reversed(self.moved):
            try:
                os.rename(dst, src)
                back += 1
            except OSError:
                continue
        self.moved.clear()
        return back


def _trash_dir(storage_root: str, prefix: str, *subdirs: str) -> str:
    trash_root(storage_root).mkdir(parents=True, exist_ok=True)
    to = tempfile.mkdtemp(prefix=f"{prefix}{int(time.time())}-", dir=trash_root(storage_root))
    for sub in subdirs:
        os.mkdir(f"{to}/{sub}")
    return to


def sweep_marked(
    storage_root: str,
    marked: Mark,
    *,
    keep_going: Callable[[], bool] = lambda: True,
    trash: Trash | None = None,
) -> SweepResult:
    """Inside the window (``trash`` mode: the mark was taken there too): carry out ``marked``'s
    verdict by *renaming* each unreferenced blob directory and layer link into a trash directory the
    registry never reads (the paths distribution's sweep would delete): metadata only;
    ``empty_trash`` unlinks them after the window."""
    start, cpu0 = time.monotonic(), time.process_time()
    to = _trash_dir(storage_root, "", "blobs", "links")
    trash = trash if trash is not None else Trash()
    deleted: list[str] = []
    for i, (digest, src, name) in enumerate(marked.moves):
        if i % 256 == 0 and not keep_going():
            raise TemporaryError("sweep stopped: the write lock could not be renewed")
        try:
            os.rename(src, f"{to}/{name}")
        except FileNotFoundError:
            continue
        trash.moved.append((src, f"{to}/{name}"))
        if i < marked.blobs:
            deleted.append(digest)
    seconds = time.monotonic() - start + marked.result.seconds
    cpu = time.process_time() - cpu0 + marked.result.cpu_seconds
    return SweepResult(marked.result.blobs_marked, len(deleted), 0, deleted, [], seconds, cpu)


PENDING, SETTLED = "pending-", "settled-"  # set aside, not yet settled under the lock / settled: garbage


def set_aside(
    storage_root: str, marked: Mark, *, keep: set[str] | None = None, keep_going: Callable[[], bool] = lambda: True
) -> float:
    """Before the window, writes going on (``online`` mode): rename each blob directory the mark
    judged unreferenced, and that nothing written since the mark began names (``keep``, read here
    with ``storage.referenced_since``), into a ``pending-`` trash directory. The renames are what
    the window used to spend its time on (one per blob that goes: 250,000 at 50,000 images).

    From its rename on, distribution answers for such a blob as for one never uploaded: a HEAD says
    404 (the client uploads it), a cross-repository mount falls back to an upload, and a manifest
    naming it is refused (MANIFEST_BLOB_UNKNOWN): no push can end with a manifest whose blob is in
    the trash, except one whose manifest was linked after ``keep`` was read and before its blob's
    rename (the manifest PUT checks its blobs first). Those are put back by a second look once the
    renames are done (``_put_back``), so they are unpullable for about as long as the renames took;
    ``settle`` puts back, inside the window, the few a push in flight during that second look leaves.
    Layer links wait for ``unlink_after``. A run killed before ``settle`` leaves the directory
    ``pending-``: the next ``empty_trash`` puts it all back. Returns the seconds it took."""
    start = time.monotonic()
    if keep is None:
        keep = storage.referenced_since(storage_root, marked.started - MTIME_SLACK)
    marked.aside.root = _trash_dir(storage_root, PENDING, "blobs")
    for i, (digest, src, name) in enumerate(marked.moves):
        if i % 256 == 0 and not keep_going():
            raise TemporaryError("set-aside stopped")
        if digest in keep:
            marked.spared += 1
        elif i >= marked.blobs:
            marked.after.append((digest, src, name))
        else:
            try:
                os.rename(src, f"{marked.aside.root}/{name}")
            except FileNotFoundError:
                continue
            marked.aside.moved.append((src, f"{marked.aside.root}/{name}"))
    _put_back(storage_root, marked)
    return time.monotonic() - start


def settle(storage_root: str, marked: Mark, *, keep_going: Callable[[], bool] = lambda: True) -> SweepResult:
    """Inside the window (writes held off): put back every blob ``set_aside`` took that something
    written since the mark began names (``storage.referenced_since``: a stat per repository and per
    manifest revision, a read per new manifest), so the cost follows what changed, not what goes.
    What stays in the trash is then garbage for good: ``commit`` makes it so."""
    start, cpu0 = time.monotonic(), time.process_time()
    deleted = _put_back(storage_root, marked, keep_going)
    seconds, cpu = time.monotonic() - start, time.process_time() - cpu0
    return SweepResult(marked.result.blobs_marked, len(deleted), 0, deleted, [], seconds, cpu)


def _put_back(storage_root: str, marked: Mark, keep_going: Callable[[], bool] = lambda: True) -> list[str]:
    """Put back each blob set aside that something written since the mark began names (and keep its
    layer links); returns the digests left in the trash."""
    aside = {_trashed_digest(dst): (src, dst) for src, dst in marked.aside.moved}
    # a manifest pushed again since the mark may itself be set aside: it is read there
    keep = storage.referenced_since(storage_root, marked.started - MTIME_SLACK, {d: dst for d, (_, dst) in aside.items()})
    left: list[str] = []
    for i, (digest, (src, dst)) in enumerate(aside.items()):
        if i % 256 == 0 and not keep_going():
            raise TemporaryError("sweep stopped: the write lock could not be renewed")
        if digest not in keep:
            left.append(digest)
        elif Trash([(src, dst)]).restore():
            marked.spared += 1
    marked.aside.moved = [aside[d] for d in left]
    marked.after = [a for a in marked.after if a[0] not in keep]
    return left


def _trashed_digest(path: str | Path) -> str:
    """The digest of a blob directory renamed to ``<trash>/blobs/<algo>-<hex>`` (``verdict``'s names)."""
    return os.path.basename(path).replace("-", ":", 1)


def commit(marked: Mark) -> None:
    """Still inside the window, once the lock is known to have held: the set-aside is garbage for good
    (one rename; a run killed from here on has its trash emptied, not put back, by the next run)."""
    if marked.aside.root:
        os.rename(marked.aside.root, marked.aside.root.replace(f"/{PENDING}", f"/{SETTLED}"))
        marked.aside = Trash()


def unlink_after(storage_root: str, marked: Mark) -> int:
    """After the window (writes go on): rename aside the layer links of the blobs the window took.
    Each one whose blob is there again (uploaded since the window; the upload writes the blob, then
    its link, which may be the one just renamed) is put back at once, so a link never stays missing
    while its blob exists; the only trace of the race is a push or pull refused for microseconds."""
    to = _trash_dir(storage_root, "links-", "links")
    v2 = os.path.join(storage_root, "docker", "registry", "v2")
    gone = 0
    for digest, src, name in marked.after:
        try:
            os.rename(src, f"{to}/{name}")
        except FileNotFoundError:
            continue
        algo, _, hexd = digest.partition(":")
        if os.path.exists(f"{v2}/blobs/{algo}/{hexd[:2]}/{hexd}/data"):
            Trash([(src, f"{to}/{name}")]).restore()
        else:
            gone += 1
    marked.after.clear()
    return gone


def run_trash(
    config: str,
    storage_root: str,
    *,
    binary: str | None = None,
    keep_going: Callable[[], bool] = lambda: True,
    trash: Trash | None = None,
) -> SweepResult:
    """The filesystem driver's fast sweep inside the window: distribution's own mark
    (``garbage-collect --dry-run``) decides, ``sweep_marked`` renames. Deleting tens of thousands of
    files is what makes the plain sweep slow on real disks; ``empty_trash`` does that after the window."""
    res = run(config, binary=binary, keep_going=keep_going, dry_run=True)
    return sweep_marked(storage_root, verdict(storage_root, 0.0, res), keep_going=keep_going, trash=trash)


def empty_trash(storage_root: str) -> int:
    """Unlink the trash, after putting back what a run killed between ``set_aside`` and ``commit``
    left ``pending-`` (safe without the lock, as ``Trash.restore``). A pending directory is emptied
    entry by entry and never removed whole, so a second run started by hand while this one sets
    aside into it loses nothing (a blob renamed into a directory removed under it stays where it
    was). Returns how many blobs were put back."""
    root, back = trash_root(storage_root), 0
    for entry in root.glob(f"{PENDING}*/blobs/*"):
        home = storage.blob_path(storage_root, _trashed_digest(entry)).parent
        home.parent.mkdir(parents=True, exist_ok=True)
        if Trash([(str(home), str(entry))]).restore():
            back += 1
        elif home.exists():  # uploaded again meanwhile: that copy serves, this one is a duplicate
            shutil.rmtree(entry, ignore_errors=True)
    for d in root.glob("*"):
        if d.name.startswith(PENDING):
            continue
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)
    for d in [*root.glob(f"{PENDING}*/blobs"), *root.glob(f"{PENDING}*"), root]:
        try:
            d.rmdir()
        except OSError:
            continue  # not empty: in use
    return back
