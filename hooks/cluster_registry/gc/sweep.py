"""Run distribution's mark-and-sweep (``registry garbage-collect``) under the write lock."""

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


def trash_root(storage_root: str) -> Path:
    return Path(storage_root) / "docker" / "registry" / "v2" / TRASH


def run_trash(
    config: str,
    storage_root: str,
    *,
    binary: str | None = None,
    keep_going: Callable[[], bool] = lambda: True,
) -> SweepResult:
    """The filesystem driver's fast sweep: distribution's own mark (``garbage-collect --dry-run``)
    decides; its verdict is carried out by *renaming* each unreferenced blob directory and layer
    link into a trash directory the registry never reads (the same paths distribution's sweep would
    delete), which is metadata-only and quick. ``empty_trash`` then unlinks them after the window:
    deleting tens of thousands of files is what makes the plain sweep slow on real disks.
    """
    res = run(config, binary=binary, keep_going=keep_going, dry_run=True)
    v2 = Path(storage_root) / "docker" / "registry" / "v2"
    trash = trash_root(storage_root) / f"{int(time.time())}-{os.getpid()}"
    (trash / "blobs").mkdir(parents=True, exist_ok=True)
    (trash / "links").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    moved = 0
    for i, digest in enumerate(res.deleted_digests):
        if i % 256 == 0 and not keep_going():
            raise TemporaryError("sweep stopped: the write lock could not be renewed")
        algo, _, hexd = digest.partition(":")
        try:
            os.rename(v2 / "blobs" / algo / hexd[:2] / hexd, trash / "blobs" / hexd)
            moved += 1
        except FileNotFoundError:
            continue
    for i, (repo, digest) in enumerate(res.layer_links):
        if i % 256 == 0 and not keep_going():
            raise TemporaryError("sweep stopped: the write lock could not be renewed")
        algo, _, hexd = digest.partition(":")
        try:
            os.rename(v2 / "repositories" / repo / "_layers" / algo / hexd / "link", trash / "links" / str(i))
        except FileNotFoundError:
            continue
    res.blobs_deleted = moved
    res.seconds += time.monotonic() - start
    return res


def empty_trash(storage_root: str) -> None:
    """Unlink what ``run_trash`` moved aside (also what a run killed before this point left)."""
    shutil.rmtree(trash_root(storage_root), ignore_errors=True)
