"""GC's read-only window is bounded (#16 item 11): a sweep that hangs is killed at `--max-window`, the
run fails with a clear message (the caller releases the lock, sends a SweepAborted Warning Event on the
lock Lease and reports the error), instead of holding every write off until the Job's deadline."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from cluster_registry.gc import storage, sweep
from cluster_registry.gc.lock import DrainReport
from cluster_registry.gc.run import Options, Report, WindowExceeded, _locked
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import run_registry


class AlwaysSafe:
    def wait_drained(self, timeout: float) -> DrainReport:
        return DrainReport(acked=["gate-0"])

    def safe(self) -> bool:
        return True


def hanging_registry(tmp_path: Path) -> str:
    """A `registry` whose garbage-collect never ends (a stuck storage backend); it records its pid."""
    path = tmp_path / "registry"
    path.write_text(f"#!{sys.executable}\nimport os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\ntime.sleep(3600)\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("mode", ["distribution", "trash"])
def test_a_hanging_sweep_is_aborted_at_the_maximum_window(tmp_path: Path, mode: str) -> None:
    with run_registry(tmp_path / "r") as reg:
        push_image(Pusher(reg.host), "hang/app", "v1", layers=[4000], seed=7)
    config = sweep.default_config(str(reg.storage))
    try:
        opts = Options(registry_url=reg.url, storage_root=str(reg.storage), storage_size=1 << 30, sweep_mode=mode,
                       registry_binary=hanging_registry(tmp_path), max_window=1.5)  # fmt: skip
        rep = Report()
        start = time.monotonic()
        with pytest.raises(WindowExceeded, match="outlasted the maximum read-only window of 2s: it was aborted"):
            _locked(opts, AlwaysSafe(), config, rep, storage.blob_sizes(reg.storage))  # type: ignore[arg-type]
        assert time.monotonic() - start < 5
        pid = int((tmp_path / "pid").read_text())
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert rep.sweepSeconds == 0
        assert WindowExceeded("x").temporary  # the next scheduled run tries again
    finally:
        os.unlink(config)
