"""The pure parts of the webhook's worker supervisor (#20): how many workers fit, how fast to restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_registry.webhook.workers import PROCESS_BYTES, fit, memory_limit, restart_delay, worker_argv

MIB = 1 << 20


@pytest.mark.parametrize(
    ("wanted", "limit", "workers"),
    [
        (1, 256 * MIB, 1),  # the chart's default (500m): one process, no supervisor
        (2, None, 2),  # no memory limit: one per CPU
        (2, 256 * MIB, 1),  # 2 workers + supervisor would not fit in 256 Mi
        (2, 3 * 96 * MIB, 2),
        (64, 512 * MIB, 4),  # a 64-CPU node without a CPU limit
        (4, 10 * MIB, 1),  # never fewer than one
    ],
)
def test_workers_fit_the_memory_limit(wanted: int, limit: int | None, workers: int) -> None:
    assert PROCESS_BYTES == 96 * MIB
    assert fit(wanted, limit) == workers


def test_memory_limit_of_cgroup_v2_and_v1(tmp_path: Path) -> None:
    assert memory_limit(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(tmp_path) is None  # v1's "unlimited"
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert memory_limit(tmp_path) == 512 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(tmp_path) is None  # v2 first
    (tmp_path / "memory.max").write_text("268435456\n")
    assert memory_limit(tmp_path) == 256 * MIB


def test_restart_backs_off_only_while_a_worker_crash_loops() -> None:
    delays = [0.1]
    for _ in range(10):
        delays.append(restart_delay(delays[-1], lived=0.5))
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6] and delays[-1] == 10.0
    assert restart_delay(10.0, lived=60.0) == 0.1  # a long life: start again at once


def test_worker_argv_serves_only_and_overrides_the_count() -> None:
    argv = worker_argv(["--log-format", "json", "webhook", "--workers", "4", "--listen", "0.0.0.0:8443"])
    assert argv[1:3] == ["-m", "cluster_registry"]
    assert argv[-3:] == ["--workers", "1", "--serve-only"]  # click keeps the last --workers
