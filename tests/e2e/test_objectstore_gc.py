"""GC on object storage against the local cluster's API server: five distribution replicas on the
chart's own s3/azure config (moto's S3 server, Azurite: ci/objectstores), each behind a real gate
(the write lock's Lease and heartbeats live in the cluster), GC run as a local process the way the
chart's CronJob runs it (``--object-storage --registry-config``, the keys in its environment).

- usage is measured from the bucket/container: below the threshold nothing runs and the report's
  usage is exactly what the store holds; at it, images pushed within the grace period are kept (push
  times read from the store), past it the unreferenced images go and mark-and-sweep frees their blobs
  from the store (counted from the store, before and after);
- pushes through all five gates during the run never corrupt: every gate acknowledges its drain,
  every image pushed resolves afterwards and every blob it names hashes right, on every replica.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.gc import objectstore
from tests.e2e.test_gc import PASSWORD, USER, _shared_layer_image, _writable, creds, env_for, integrity  # noqa: F401 (creds: a fixture)
from tests.support import objectstores
from tests.support.cluster import Cluster, wait_for
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import free_port

REPLICAS = 5
GRACE = 20  # seconds


@pytest.fixture(params=objectstores.BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[objectstores.Store]:
    with objectstores.fresh(str(request.param)) as s:
        yield s


@pytest.fixture
def rs(store: objectstores.Store, tmp_path: Path) -> Iterator[objectstores.Replicas]:
    with objectstores.replicas(store, tmp_path, REPLICAS) as r:
        yield r


@pytest.fixture
def gates(cluster: Cluster, namespace: str, rs: objectstores.Replicas, creds: Path, tmp_path: Path) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[bytes]] = []
    hosts: list[str] = []
    try:
        for i, replica in enumerate(rs.members):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gate", "--listen", f"127.0.0.1:{port}",
                 "--upstream", replica.url, "--credentials-file", str(creds), "--lock-name", "gc-lock", "--namespace",
                 namespace, "--identity", f"gate-{i}"],
                env=env_for(cluster), stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"gate-{i}.log", "wb"),
            ))  # fmt: skip
            hosts.append(f"127.0.0.1:{port}")
        for h in hosts:
            wait_for(lambda h=h: _writable(h), timeout=60, what=f"gate {h} to accept writes")  # type: ignore[misc]
        yield hosts
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def gc(cluster: Cluster, namespace: str, rs: objectstores.Replicas, gate: str, creds: Path, *extra: str) -> dict[str, Any]:
    """One GC run as the chart's CronJob makes it on object storage (the store's keys in its environment)."""
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gc", "--once", "--registry-url",
            f"http://{gate}", "--registry-config", str(rs.config), "--object-storage", "--lock-name", "gc-lock",
            "--namespace", namespace, "--artifact-namespace", namespace, "--registry-credentials-file", str(creds),
            *extra]  # fmt: skip
    proc = subprocess.run(argv, env={**env_for(cluster), **rs.env}, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in report, (report, proc.stderr[-3000:])
    return report


def test_gc_measures_the_store_honours_the_threshold_and_sweeps_it(
    cluster: Cluster, namespace: str, rs: objectstores.Replicas, gates: list[str], creds: Path
) -> None:
    for i in range(8):
        push_image(Pusher(gates[i % REPLICAS], auth=(USER, PASSWORD)), f"site/old{i % 2}", f"t{i}", layers=[40_000 + i, 800], seed=i)
    store = objectstore.load(str(rs.config), rs.env)
    before = objectstore.blob_sizes(store)
    used = sum(before.values())
    # Threshold 50% of a store sized so that usage is just under it: nothing runs.
    size = used * 2 + 2
    report = gc(cluster, namespace, rs, gates[0], creds, "--threshold", "50", "--storage-size", str(size))
    assert (report["ran"], report["usageBytes"], report["storageSizeBytes"]) == (False, used, size), report
    assert objectstore.blob_sizes(store) == before
    # At the threshold it runs; the grace period keeps what was pushed within it (push times from the store).
    report = gc(cluster, namespace, rs, gates[1], creds, "--threshold", "50", "--storage-size", str(used * 2), "--grace", "1h")
    assert report["ran"] and report["manifestsKept"] == 8 and report["manifestsDeleted"] == 0, report
    assert objectstore.blob_sizes(store) == before
    # Past the grace: nothing is referenced, everything goes, the sweep empties the store's blobs.
    report = gc(cluster, namespace, rs, gates[2], creds, "--threshold", "50", "--storage-size", str(used * 2), "--grace", "0s")
    after = objectstore.blob_sizes(store)
    assert report["ran"] and report["usageBytes"] == used and report["manifestsDeleted"] == 8, report
    assert report["gatesAcked"] == REPLICAS, report
    assert report["blobsDeleted"] == len(before) - len(after) > 0 and report["bytesFreed"] == used - sum(after.values())
    assert report["usageBytesAfter"] == sum(after.values()), "usage after the run is what the store holds"
    assert after == {}, "every blob of the unreferenced images left the store"


def test_pushes_through_five_gates_during_gc_never_corrupt(
    cluster: Cluster, namespace: str, rs: objectstores.Replicas, gates: list[str], creds: Path
) -> None:
    shared = [os.urandom(4096) for _ in range(3)]
    for i in range(20):  # doomed: unreferenced, and they share layers with what is pushed during GC
        _shared_layer_image(Pusher(gates[i % REPLICAS], auth=(USER, PASSWORD)), f"conc/old{i % 4}", f"t{i}", shared, os.urandom(512))
    time.sleep(GRACE + 1)  # the doomed images are past the grace period; what the writers push is within it
    stop = threading.Event()
    pushed: list[str] = []
    counter = itertools.count()

    def writer(gate: str) -> None:
        p = Pusher(gate, auth=(USER, PASSWORD))
        while not stop.is_set():
            n = next(counter)
            _shared_layer_image(p, f"conc/new{n % 3}", f"n{n}", shared, os.urandom(256))
            pushed.append(f"conc/new{n % 3}:n{n}")

    threads = [threading.Thread(target=writer, args=(g,)) for g in gates[:3]]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        report = gc(cluster, namespace, rs, gates[4], creds, "--grace", f"{GRACE}s")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert report["gatesAcked"] == REPLICAS, report
    assert report["manifestsDeleted"] >= 20 and report["blobsDeleted"] > 0, report
    assert pushed, "the writers pushed nothing"
    for replica in rs.members:
        direct = Pusher(replica.host)
        for ref in pushed:
            repo, _, tag = ref.partition(":")
            assert direct.get_manifest(repo, tag) is not None, f"{ref} was pushed but is gone ({replica.host})"
    assert integrity(Pusher(rs.members[0].host)) >= len(pushed)
    lease = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)
    assert not lease["spec"].get("holderIdentity"), "the lock is released after the run"
    print(f"images pushed through {len(threads)} gates during GC: {len(pushed)}; window {report['windowSeconds']}s")
