"""``cluster-registry copy`` as a process: killed midway then resumed, and a large blob copied
with the engine's peak RSS measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ociimages import Pusher, assert_copied, push_image
from tests.support.registry import run_measured, run_registry

ROOT = Path(__file__).resolve().parents[2]
LARGE = int(os.environ.get("CLUSTER_REGISTRY_TEST_LARGE_BLOB", str(512 << 20)))
RSS_LIMIT_MB = 100


def copy_cmd(src: str, dst: str) -> list[str]:
    return [sys.executable, "-m", "cluster_registry", "copy", src, dst, "--src-insecure", "--dest-insecure"]


def run_copy(cmd: list[str]) -> tuple[int, str, int]:
    m = run_measured(cmd, timeout=600, cwd=ROOT)
    assert m.code == 0, m.stdout + m.stderr[-2000:]
    return m.code, m.stdout, m.rss_kib


def test_killed_midway_then_resumed(tmp_path: Path) -> None:
    with run_registry(tmp_path / "src") as src, run_registry(tmp_path / "dst") as dst:
        sp, dp = Pusher(src.host), Pusher(dst.host)
        img = push_image(sp, "big/app", "1", layers=[48 << 20] * 4, seed=31)
        proc = subprocess.Popen(copy_cmd(f"{src.host}/big/app:1", f"{dst.host}/big/app:1") + ["--concurrency", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        # kill once the destination holds a whole layer but before the copy could finish
        layers = dst.storage / "docker/registry/v2/repositories/big/app/_layers/sha256"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if layers.exists() and any(layers.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "copy finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        there = {f"sha256:{d.name}" for d in layers.iterdir()}
        sizes = dict(img.all_blobs())
        assert there and there <= sizes.keys()
        assert dp.get_manifest("big/app", "1") is None, "a killed copy left a tag"
        code, out, _ = run_copy(copy_cmd(f"{src.host}/big/app:1", f"{dst.host}/big/app:1"))
        assert code == 0, out
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["digest"] == img.digest
        assert summary["blobs_copied"] + summary["blobs_skipped"] == 5
        # Resumed, not redone: what the killed run finished is skipped, its bytes not sent again.
        assert summary["blobs_skipped"] >= len(there), summary
        assert summary["bytes_copied"] <= sum(sizes.values()) - sum(sizes[d] for d in there), summary
        assert_copied(sp, dp, img, "big/app")  # downloads and hashes every blob


def test_large_blob_bounded_memory(tmp_path: Path) -> None:
    with run_registry(tmp_path / "src") as src, run_registry(tmp_path / "dst") as dst:
        sp, dp = Pusher(src.host), Pusher(dst.host)
        img = push_image(sp, "large", "1", layers=[LARGE], seed=41)
        code, out, rss_kib = run_copy(copy_cmd(f"{src.host}/large:1", f"{dst.host}/large:1"))
        assert code == 0, out
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["bytes_copied"] >= LARGE
        assert_copied(sp, dp, img, "large", hash_blobs=False)  # the registry verified the digest on upload
        print(f"large blob: {LARGE >> 20} MiB, peak RSS {rss_kib // 1024} MiB, {summary['seconds']} s")
        assert rss_kib < RSS_LIMIT_MB * 1024, f"peak RSS {rss_kib // 1024} MiB"
