"""The webhook on every core: a supervisor process and one serving worker per CPU.

A Python process answers on one core, so the pod runs ``count`` workers, each a whole
``cluster-registry webhook --serve-only`` process with its own TLS, its own watch-fed view and
its own event loop, all bound to the same port with ``SO_REUSEPORT`` (the kernel spreads
connections over them; none shares a lock with another). The supervisor serves nothing itself: it
starts the workers, starts a worker again when one exits (reported in the log and in
``cluster_registry_webhook_worker_restarts_total``), and runs what must happen once per pod rather
than once per worker: the leader-elected pod watch that records Artifacts. On SIGTERM it passes the
signal on, waits for the workers to drain, then drains its recorder and releases the Lease.

Workers are spawned (a fresh interpreter), not forked: the supervisor runs threads (the Kubernetes
client's) by the time it replaces a worker, and forking a threaded process is unsafe. Metrics are
prometheus_client's multiprocess files in a directory the supervisor owns, so a scrape of any
worker reports the pod's totals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, multiprocess, values

from cluster_registry.leader import LeaderElector
from cluster_registry.webhook.recorder import Recording
from cluster_registry.webhook.server import PREFIX, RecordingMetrics, record, refresh_every

log = logging.getLogger(__name__)

# What one webhook process holds (measured: 87 MiB RSS, 68 MiB PSS, serving a small cluster's view;
# the supervisor about as much): the budget each process gets from the container's memory limit.
PROCESS_BYTES = 96 << 20


def memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This container's memory limit in bytes (cgroup v2, then v1), None without one."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (root / name).read_text().strip()
        except OSError:
            continue
        return None if text == "max" or int(text) >= 1 << 60 else int(text)  # v1 says "no limit" with ~2^63
    return None


def fit(wanted: int, limit: int | None, per_process: int = PROCESS_BYTES) -> int:
    """Workers whose processes, and their supervisor's, fit in ``limit`` (1: one process, no supervisor).

    Without a CPU limit the chart's worker count is the node's CPUs: this keeps a big node from
    starting more processes than the memory limit holds."""
    if limit is None or wanted <= 1:
        return wanted
    return max(1, min(wanted, limit // per_process - 1))


def restart_delay(previous: float, lived: float) -> float:
    """Seconds before starting a worker again: at once after a long life, doubling while it crash-loops."""
    return 0.1 if lived > 10.0 else min(10.0, max(0.1, previous * 2))


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line of a worker: this one's, serving only (later options override earlier ones)."""
    return [sys.executable, "-m", "cluster_registry", *argv, "--workers", "1", "--serve-only"]


@dataclass
class Supervisor:
    argv: list[str]
    count: int
    env: dict[str, str]
    grace: float = 20.0  # seconds a worker gets to drain after SIGTERM before SIGKILL
    restarts: Counter | None = None
    procs: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)

    async def _slot(self, slot: int, stop: asyncio.Event) -> None:
        """Keep worker ``slot`` running until ``stop``."""
        delay = 0.1
        while not stop.is_set():
            began = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env)
            self.procs[slot] = proc
            log.info("webhook worker started", extra={"worker": slot, "pid": proc.pid})
            code = await proc.wait()
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                proc.pid, self.env["PROMETHEUS_MULTIPROC_DIR"]
            )
            if stop.is_set():
                return
            log.error("webhook worker exited; starting it again", extra={"worker": slot, "pid": proc.pid, "code": code})
            if self.restarts is not None:
                self.restarts.inc()
            delay = restart_delay(delay, time.monotonic() - began)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def run(self, stop: asyncio.Event) -> None:
        """Run the workers until ``stop``; then SIGTERM them and wait (SIGKILL after ``grace``)."""
        slots = [asyncio.create_task(self._slot(n, stop)) for n in range(self.count)]
        await stop.wait()
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in live]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.grace)
            for proc in live:
                if proc.returncode is None:
                    log.error("webhook worker did not drain in time; killed", extra={"pid": proc.pid})
                    proc.kill()
            await asyncio.gather(*late)
        await asyncio.gather(*slots)


async def supervise(
    argv: Sequence[str],
    count: int,
    recording: Recording | None,
    elector: LeaderElector | None,
    drain: float = 5.0,
) -> None:
    """Serve with ``count`` workers (see the module's text) until SIGTERM or SIGINT."""
    metrics_dir = tempfile.mkdtemp(prefix="webhook-metrics-")
    # Only now do this process's metrics go to files the workers' scrapes read.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    restarts = Counter(f"{PREFIX}_worker_restarts", "Webhook workers started again after exiting", registry=registry)
    tasks: list[asyncio.Task[None]] = []
    stopping = asyncio.Event()
    if recording is not None:
        recording.recorder.view.start()
        tasks.append(record(recording, elector, stopping))
        tasks.append(asyncio.create_task(refresh_every(1.0, RecordingMetrics(registry, recording))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if tasks:  # the recording ended (its work failed, or the Lease is gone): exit, and be restarted
        tasks[0].add_done_callback(lambda _: stop.set())
    supervisor = Supervisor(worker_argv(argv), count, dict(os.environ), restarts=restarts)
    log.info("webhook supervisor running", extra={"workers": count})
    try:
        await supervisor.run(stop)
    finally:
        log.info("shutting down")
        if recording is not None:
            await recording.recorder.drained(drain)
        stopping.set()  # the elector releases its Lease
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if recording is not None:
            recording.recorder.view.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
