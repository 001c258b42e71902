"""Run distribution's mark-and-sweep (``registry garbage-collect``) under the write lock."""

from __future__ import annotations

import ctypes
import logging
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
_SUMMARY = re.compile(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion")


@dataclass
class SweepResult:
    blobs_marked: int = 0
    blobs_deleted: int = 0
    manifests_deleted: int = 0
    deleted_digests: list[str] = field(default_factory=list)
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
