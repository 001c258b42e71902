"""GC's read-only window when the write lock lapses at the very end of the sweep, against a real
registry's storage and the real `registry garbage-collect`.

The sweep itself stops when the lock can no longer be vouched for (``sweep.run`` polls it; the e2e
tests in tests/e2e/test_gc_lock.py take the Lease over and stall its renewals). What is left is a
lapse between the last poll and the sweep's exit: the run must then report a temporary failure
rather than a clean window, since writes may already have resumed while the sweep was finishing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cluster_registry.errors import TemporaryError
from cluster_registry.gc import storage, sweep
from cluster_registry.gc.lock import DrainReport
from cluster_registry.gc.run import Options, Report, _locked
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import run_registry


class LapsesAsTheSweepExits:
    """The lock as GC sees it when its renewal fails just as the sweep ends: ``safe()`` holds while a
    child process of the calling thread (the sweep, as ``sweep.run`` polls it) exists, and fails
    from the moment it has exited and been reaped."""

    def __init__(self) -> None:
        self.calls = 0

    def wait_drained(self, timeout: float) -> DrainReport:
        return DrainReport(acked=["gate-0"])

    def safe(self) -> bool:
        self.calls += 1
        return bool(Path(f"/proc/self/task/{threading.get_native_id()}/children").read_text().strip())


@pytest.mark.parametrize("mode", ["distribution", "trash"])
def test_a_lock_lapsing_as_the_sweep_ends_fails_the_window(tmp_path: Path, mode: str) -> None:
    with run_registry(tmp_path / "r") as reg:
        push_image(Pusher(reg.host), "lapse/app", "v1", layers=[4000], seed=5)
    config = sweep.default_config(str(reg.storage))
    try:
        opts = Options(registry_url=reg.url, storage_root=str(reg.storage), storage_size=1 << 30, sweep_mode=mode)
        lock = LapsesAsTheSweepExits()
        rep = Report()
        with pytest.raises(TemporaryError, match="lapsed"):
            _locked(opts, lock, config, rep, storage.blob_sizes(reg.storage))  # type: ignore[arg-type]
        assert lock.calls >= 2, "the sweep polled the lock while it ran, and the run asked again after it"
        assert rep.sweepSeconds == 0, "a sweep whose lock lapsed is not reported as a clean window"
    finally:
        os.unlink(config)
