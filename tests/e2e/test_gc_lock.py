"""GC's write lock when things go wrong, against the real API server, a real distribution with
``auth: token`` and a real ``cluster-registry token-service`` (tests/support/tokenfront.py).

- the Lease taken over by another holder mid-sweep, and GC's renewals stalled past the TTL (a
  partition between GC and the API server): the sweep is killed before it deletes anything, the run
  reports a temporary failure, and the sweep is dead before the token service issues any push token;
- a push token alive past the drain timeout (an upload in flight on it): GC gives up before sweeping
  and frees writes;
- dead token service replicas (a heartbeat stale by the clock, one frozen while GC watches) are not
  waited for;
- two GC runs at once: the second refuses, the first completes with its lock untouched;
- usage below a non-zero threshold: nothing runs (``ran: false``).

The sweep is distribution's ``registry`` behind a wrapper that records its PID and sleeps first, so
"the sweep is running" is a window of known length and a sweep that was not stopped deletes blobs.
These runs use ``--sweep-mode distribution``, where that process is the window's sweep (in the
default online mode it is the mark, before the lock); the online mode's own lock losses are in
tests/integration/test_gc_online.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_gc import (  # noqa: F401 - fixtures, shared with the GC suite
    age_storage,
    ensure_crds,
    front,
    integrity,
    run_gc,
    start_gc,
)
from tests.support.cluster import Cluster, wait_for
from tests.support.ociimages import push_image
from tests.support.registry import registry_binary
from tests.support.stallproxy import StallProxy
from tests.support.tokenfront import Front, push_token_granted

LEASE_SECONDS = 15  # gc's default --lease-duration, the token service's hold after the last renewal it saw


def blobs(storage: Path) -> set[str]:
    return {p.name for p in (storage / "docker/registry/v2/blobs/sha256").glob("*/*")}


def doomed_images(front: Front, prefix: str, n: int = 6) -> None:  # noqa: F811
    """Unreferenced images pushed long ago: GC deletes their manifests, and its sweep their blobs."""
    p = front.pusher()
    for i in range(n):
        push_image(p, f"{prefix}/app{i % 2}", f"t{i}", layers=[1024, 512], seed=hash((prefix, i)) % 10**6)
    age_storage(front.registry.storage)


def sweep_started(marker: Path) -> int:
    """The PID of the slow sweep, once it runs (the lock is held and the gates drained by then)."""
    wait_for(lambda: marker.exists() and marker.read_text().strip(), 120, 0.05, what="the sweep to start")
    return int(marker.read_text())


def slow_sweep(tmp_path: Path, seconds: float) -> tuple[Path, Path]:
    """A `registry` wrapper: writes its PID to the marker, sleeps, then runs the real sweep."""
    marker = tmp_path / "sweep.pid"
    wrapper = tmp_path / "registry-slow"
    wrapper.write_text(f"#!/bin/sh\necho $$ > {marker}\nsleep {seconds}\nexec {registry_binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, marker


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, err[-3000:]
    return proc.returncode, json.loads(lines[-1]), err


def lease(cluster: Cluster, namespace: str, name: str = "gc-lock") -> dict[str, Any]:
    return dict(cluster.kubectl_json("get", "lease", name, "-n", namespace))


def micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class TokenProbe:
    """Asks the token service for a push token every 50 ms; remembers when one was issued (a write
    admitted) and when refused."""

    def __init__(self, realm: str) -> None:
        self.realm = realm
        self.admitted: list[float] = []
        self.refused: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            (self.admitted if push_token_granted(self.realm) else self.refused).append(t)
            time.sleep(0.05)

    def first_admitted_after(self, t: float) -> float | None:
        return next((a for a in self.admitted if a > t), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def probe(front: Front) -> Iterator[TokenProbe]:  # noqa: F811
    w = TokenProbe(front.realm)
    yield w
    w.stop()


# -- the lock lapses mid-sweep --------------------------------------------------------------------------


def test_lease_taken_over_mid_sweep_stops_the_sweep(
    cluster: Cluster, namespace: str, front: Front, tmp_path: Path  # noqa: F811
) -> None:
    doomed_images(front, "takeover")
    wrapper, marker = slow_sweep(tmp_path, 40)
    gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--sweep-mode", "distribution",
                  "--registry-binary", str(wrapper))  # fmt: skip
    try:
        sweep_pid = sweep_started(marker)
        before = blobs(front.registry.storage)
        ours = lease(cluster, namespace)["spec"]["holderIdentity"]
        assert ours.startswith("gc-")
        # Another holder writes the Lease (as a second GC would once it judged ours expired).
        cluster.kubectl("patch", "lease", "gc-lock", "-n", namespace, "--type=merge", "-p", json.dumps(
            {"spec": {"holderIdentity": "gc-intruder", "renewTime": micro(datetime.now(timezone.utc)),
                      "leaseDurationSeconds": LEASE_SECONDS}}))  # fmt: skip
        taken = time.monotonic()
        wait_for(lambda: not alive(sweep_pid), LEASE_SECONDS, 0.05, what="GC to kill its sweep")
        stopped = time.monotonic() - taken
        code, report, err = finish(gc)
    finally:
        if gc.poll() is None:
            gc.kill()
    # GC noticed at its next renewal (every third of the TTL), long before the sweep could start deleting.
    assert stopped < LEASE_SECONDS / 3 + 2, f"the sweep ran {stopped:.1f}s after the lock was taken over"
    assert code == 1 and "write lock" in report["error"], (report, err[-2000:])
    assert report["ran"] and report["manifestsDeleted"] > 0, report  # the soft delete before the window happened
    assert blobs(front.registry.storage) == before, "the sweep deleted blobs without the lock"
    # The lock is the intruder's: GC never cleared a lock it no longer held.
    assert lease(cluster, namespace)["spec"]["holderIdentity"] == "gc-intruder"
    integrity(front.pusher("gc"))


def test_renewals_stalled_past_the_ttl_stop_the_sweep_before_writes_resume(
    cluster: Cluster, namespace: str, front: Front, tmp_path: Path,  # noqa: F811
    probe: TokenProbe,
) -> None:
    doomed_images(front, "stall")
    wrapper, marker = slow_sweep(tmp_path, 60)
    host, _, port = cluster.apiserver.removeprefix("https://").rpartition(":")
    with StallProxy(host, int(port)) as proxy:
        # GC reaches the API server only through the proxy; the token service talks to it directly.
        kc = yaml.safe_load(cluster.kubeconfig.read_text())
        for c in kc["clusters"]:
            c["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        kubeconfig = tmp_path / "gc-kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kc))
        gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds,
                      "--sweep-mode", "distribution", "--registry-binary", str(wrapper), "--kubeconfig", str(kubeconfig))  # fmt: skip
        try:
            sweep_pid = sweep_started(marker)
            before = blobs(front.registry.storage)
            started = time.monotonic()
            wait_for(lambda: probe.refused and probe.refused[-1] > started, 5, 0.05, what="the window to refuse writes")
            proxy.stall()
            stalled = time.monotonic()
            wait_for(lambda: not alive(sweep_pid), LEASE_SECONDS + 5, 0.02, what="GC to kill its sweep")
            killed = time.monotonic()
            first_write = wait_for(lambda: probe.first_admitted_after(stalled), LEASE_SECONDS + 10, 0.05,
                                   what="writes to resume once the lock expired")  # fmt: skip
            proxy.resume()  # the partition heals: GC can report (and clear the Lease)
            healed = time.monotonic()
            code, report, err = finish(gc, timeout=180)
            exited = time.monotonic()
        finally:
            if gc.poll() is None:
                gc.kill()
    assert killed < first_write, (
        f"a write went through {killed - first_write:.1f}s before the sweep was stopped: the sweep ran unlocked")
    assert killed - stalled < LEASE_SECONDS, "the sweep outlived the lock"
    assert first_write - stalled < LEASE_SECONDS + 3, "writes stayed refused after GC's lock expired"
    assert code == 1 and "write lock" in report["error"], (report, err[-2000:])
    assert blobs(front.registry.storage) == before, "the sweep deleted blobs without the lock"
    # Once GC gave up, writes are refused on its behalf only while a renewal of its that was stuck
    # in the partition lands as it heals, until GC's release right after clears the Lease (a
    # renewal already sent cannot be recalled); never after GC exited.
    wait_for(lambda: probe.first_admitted_after(exited), 5, 0.05, what="a write after GC exited")
    late = [t for t in probe.refused if t > first_write]
    print(f"stall: sweep killed {killed - stalled:.1f}s after the stall, first write {first_write - stalled:.1f}s, "
          f"healed {healed - stalled:.1f}s, GC exited {exited - stalled:.1f}s; refused since the first write: "
          f"{[round(t - stalled, 2) for t in late]}")  # fmt: skip
    assert all(healed <= t <= exited for t in late), "a write was refused by a lock GC no longer held"
    assert not late or late[-1] - late[0] < 2, "a stale renewal held writes off for long"
    assert not lease(cluster, namespace)["spec"].get("holderIdentity"), "GC left its lock behind"
    integrity(front.pusher("gc"))


# -- drain -----------------------------------------------------------------------------------------------


def test_a_push_token_alive_past_the_drain_timeout_makes_gc_give_up_and_free_writes(
    cluster: Cluster, namespace: str, front: Front, tmp_path: Path,  # noqa: F811
) -> None:
    doomed_images(front, "drain")
    p = front.pusher()
    st, h, _ = p.request("POST", "/v2/drain/slow/blobs/uploads/", "drain/slow")
    assert st == 202
    loc = h["location"].split("://", 1)[-1].split("/", 1)[1]
    release_upload = threading.Event()
    result: dict[str, int] = {}

    def body() -> Iterator[bytes]:
        yield b"x" * 1024
        release_upload.wait(120)
        yield b"y" * 1024

    def upload() -> None:
        result["status"] = p.request("PATCH", f"/{loc}", "drain/slow", body=body(), chunked=True)[0]

    writer = threading.Thread(target=upload)
    writer.start()
    # A copy takes push tokens until GC locks: the last one lives TTL + grace (10 s) past the lock,
    # longer than GC's drain timeout.
    taking = TokenProbe(front.realm)
    try:
        wrapper, marker = slow_sweep(tmp_path, 0)
        before = blobs(front.registry.storage)
        gc = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds,
                      "--drain-timeout", "5s", "--sweep-mode", "distribution", "--registry-binary", str(wrapper))  # fmt: skip
        code, report, err = finish(gc)
        ended = time.monotonic()
        assert taking.refused, "GC never locked"
        assert code == 1 and "did not acknowledge the lock" in report["error"], (report, err[-2000:])
        assert not marker.exists(), "GC swept although a push token was still alive"
        assert blobs(front.registry.storage) == before
        # The lock is released at once, not left to expire: new push tokens are issued right away.
        assert not lease(cluster, namespace)["spec"].get("holderIdentity")
        wait_for(lambda: front.writable("drain/after"), 10, 0.1, what="writes to resume")
        assert time.monotonic() - ended < 5
    finally:
        taking.stop()
        release_upload.set()
        writer.join(30)
    assert result.get("status") == 202, "the upload in flight across the window completes normally afterwards"


def test_dead_token_service_replicas_are_not_waited_for(
    cluster: Cluster, namespace: str, front: Front  # noqa: F811
) -> None:
    """A heartbeat stale by the clock (5 minutes) is skipped at once; one that never changes while GC
    watches is skipped after a heartbeat duration (20 s). The live replica's ack is still required."""
    doomed_images(front, "dead")

    def heartbeat(name: str, renewed: datetime) -> None:
        cluster.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": name, "labels": {"clusterregistry.io/gate-for": "gc-lock"}},
                       "spec": {"holderIdentity": name, "leaseDurationSeconds": 20, "renewTime": micro(renewed)}},
                      namespace=namespace)  # fmt: skip

    heartbeat("gc-lock-gate-gone", datetime.now(timezone.utc) - timedelta(minutes=10))
    report = run_gc(cluster, namespace, front.registry.url, front.registry.storage, creds=front.gc_creds)
    assert report["gatesAcked"] == 1 and report["blobsDeleted"] > 0, report
    # The live replica acks once the push tokens of the pushes above died (TTL + grace = 10 s after
    # the last): well under the 20 s a heartbeat that is waited for costs.
    assert report["drainSeconds"] < 15, f"a heartbeat 10 minutes stale was waited for: {report}"
    heartbeat("gc-lock-gate-frozen", datetime.now(timezone.utc))
    report = run_gc(cluster, namespace, front.registry.url, front.registry.storage, creds=front.gc_creds)
    # The frozen one cost one heartbeat duration (20 s), not the drain timeout (60 s).
    assert report["gatesAcked"] == 1 and 20 <= report["drainSeconds"] < 40, report


# -- two runs, thresholds ----------------------------------------------------------------------------------


def test_a_second_gc_run_refuses_and_the_first_is_unaffected(
    cluster: Cluster, namespace: str, front: Front, tmp_path: Path  # noqa: F811
) -> None:
    doomed_images(front, "twice")
    wrapper, marker = slow_sweep(tmp_path, 30)
    first = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--sweep-mode", "distribution",
                     "--registry-binary", str(wrapper))  # fmt: skip
    try:
        first_sweep = sweep_started(marker)
        holder = lease(cluster, namespace)["spec"]["holderIdentity"]
        # The second run waits at most two of its lease durations (2 x 5 + 2 s) for the lock, then refuses.
        second = start_gc(cluster, namespace, front.registry.url, front.registry.storage, front.gc_creds, "--lease-duration", "5")
        code2, report2, err2 = finish(second)
        assert lease(cluster, namespace)["spec"].get("holderIdentity") == holder, "the second run touched the first's lock"
        assert alive(first_sweep), "the first run's sweep was disturbed"
        code1, report1, err1 = finish(first)
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
    assert code2 == 1 and "held by" in report2["error"] and report2["blobsDeleted"] == 0, (report2, err2[-2000:])
    assert code1 == 0 and "error" not in report1, (report1, err1[-2000:])
    assert report1["blobsDeleted"] > 0 and report1["gatesAcked"] == 1
    assert not lease(cluster, namespace)["spec"].get("holderIdentity")
    integrity(front.pusher("gc"))


def test_usage_below_a_nonzero_threshold_runs_nothing(
    cluster: Cluster, namespace: str, front: Front  # noqa: F811
) -> None:
    ensure_crds(cluster)
    storage = front.registry.storage
    doomed_images(front, "threshold")
    used = sum(f.stat().st_size for f in (storage / "docker/registry/v2/blobs").rglob("data"))
    size = used * 4  # usage is 25 %
    low = run_gc(cluster, namespace, front.registry.url, storage, "--threshold", "50", "--storage-size", str(size),
                 creds=front.gc_creds)  # fmt: skip
    assert low["ran"] is False and low["thresholdPercent"] == 50 and 20 < low["usagePercent"] < 30, low
    assert low["manifestsDeleted"] == 0 and low["blobsDeleted"] == 0 and low["usageBytesAfter"] == used
    assert len(front.pusher("gc").tags("threshold/app0")) == 3, "nothing was deleted"
    high = run_gc(cluster, namespace, front.registry.url, storage, "--threshold", "20", "--storage-size", str(size),
                  "--no-sweep", creds=front.gc_creds)  # fmt: skip
    assert high["ran"] is True and high["manifestsDeleted"] == 6, high
