"""GC on object storage against the local cluster's API server: five distribution replicas on the
chart's own s3/azure config (moto's S3 server, Azurite: ci/objectstores) with ``auth: token``, each with
its own real ``cluster-registry token-service`` beside it as in a registry pod (the write lock's Lease,
the heartbeats and the push-credential Secrets live in the cluster), GC run as a local process the way
the chart's CronJob runs it (``--object-storage --registry-config``, the keys in its environment).

- usage is measured from the bucket/container: below the threshold nothing runs and the report's
  usage is exactly what the store holds; at it, images pushed within the grace period are kept (push
  times read from the store), past it the unreferenced images go and mark-and-sweep frees their blobs
  from the store (counted from the store, before and after);
- pushes through three of the five replicas during the run never corrupt: every token service
  acknowledges the lock, no push token is issued while GC holds it, every image pushed resolves
  afterwards and every blob it names hashes right, on every replica.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster_registry.gc import objectstore
from tests.e2e.test_gc import _shared_layer_image, integrity, locked_token_requests
from tests.support import objectstores
from tests.support.cluster import Cluster
from tests.support.ociimages import Pusher, push_image
from tests.support.registry import free_port
from tests.support.tokenfront import (
    PUSHERS,
    Pod,
    TokenService,
    create_push_secrets,
    env_for,
    new_signing,
    start_token_service,
    wait_issuing,
    write_gc_creds,
)

REPLICAS = 5
GRACE = 20  # seconds


@pytest.fixture(params=objectstores.BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[objectstores.Store]:
    with objectstores.fresh(str(request.param)) as s:
        yield s


@dataclass
class Site:
    rs: objectstores.Replicas
    pods: list[Pod]  # replica i and its own token service, as one registry pod
    gc_creds: Path


@pytest.fixture
def site(cluster: Cluster, namespace: str, store: objectstores.Store, tmp_path: Path) -> Iterator[Site]:
    create_push_secrets(cluster, namespace)
    signing = new_signing(tmp_path / "signing")
    ports = [free_port() for _ in range(REPLICAS)]
    # Every replica's challenge names the first token service (GC follows it); each writer asks its own pod's.
    auth = signing.auth(f"http://127.0.0.1:{ports[0]}/token")
    with objectstores.replicas(store, tmp_path, REPLICAS, token_auth=auth) as rs:
        services: list[TokenService] = []
        try:
            for i, (replica, port) in enumerate(zip(rs.members, ports)):
                services.append(start_token_service(cluster, namespace, signing, tmp_path / f"ts-{i}.log",
                                                    identity=f"ts-{i}", port=port, registry_debug=replica.debug))  # fmt: skip
            for ts in services:
                wait_issuing(ts)
            gc_creds = write_gc_creds(tmp_path)
            pods = [Pod(replica, ts, gc_creds) for replica, ts in zip(rs.members, services)]
            yield Site(rs, pods, gc_creds)
        finally:
            for ts in services:
                ts.stop()


def gc(cluster: Cluster, namespace: str, site: Site, pod: int, *extra: str) -> dict[str, Any]:
    """One GC run as the chart's CronJob makes it on object storage (the store's keys in its environment)."""
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gc", "--once", "--registry-url",
            site.pods[pod].registry.url, "--registry-config", str(site.rs.config), "--object-storage", "--lock-name",
            "gc-lock", "--namespace", namespace, "--artifact-namespace", namespace, "--registry-credentials-file",
            str(site.gc_creds), *extra]  # fmt: skip
    proc = subprocess.run(argv, env={**env_for(cluster), **site.rs.env}, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in report, (report, proc.stderr[-3000:])
    return report


def test_gc_measures_the_store_honours_the_threshold_and_sweeps_it(
    cluster: Cluster, namespace: str, site: Site
) -> None:
    for i in range(8):
        push_image(site.pods[i % REPLICAS].pusher(), f"site/old{i % 2}", f"t{i}", layers=[40_000 + i, 800], seed=i)
    store = objectstore.load(str(site.rs.config), site.rs.env)
    before = objectstore.blob_sizes(store)
    used = sum(before.values())
    # Threshold 50% of a store sized so that usage is just under it: nothing runs.
    size = used * 2 + 2
    report = gc(cluster, namespace, site, 0, "--threshold", "50", "--storage-size", str(size))
    assert (report["ran"], report["usageBytes"], report["storageSizeBytes"]) == (False, used, size), report
    assert objectstore.blob_sizes(store) == before
    # At the threshold it runs; the grace period keeps what was pushed within it (push times from the store).
    report = gc(cluster, namespace, site, 1, "--threshold", "50", "--storage-size", str(used * 2), "--grace", "1h")
    assert report["ran"] and report["manifestsKept"] == 8 and report["manifestsDeleted"] == 0, report
    assert objectstore.blob_sizes(store) == before
    # Past the grace: nothing is referenced, everything goes, the sweep empties the store's blobs.
    report = gc(cluster, namespace, site, 2, "--threshold", "50", "--storage-size", str(used * 2), "--grace", "0s")
    after = objectstore.blob_sizes(store)
    assert report["ran"] and report["usageBytes"] == used and report["manifestsDeleted"] == 8, report
    assert report["gatesAcked"] == REPLICAS, report
    assert report["blobsDeleted"] == len(before) - len(after) > 0 and report["bytesFreed"] == used - sum(after.values())
    assert report["usageBytesAfter"] == sum(after.values()), "usage after the run is what the store holds"
    assert after == {}, "every blob of the unreferenced images left the store"


def test_pushes_through_three_replicas_during_gc_never_corrupt(
    cluster: Cluster, namespace: str, site: Site
) -> None:
    shared = [os.urandom(4096) for _ in range(3)]
    for i in range(20):  # doomed: unreferenced, and they share layers with what is pushed during GC
        _shared_layer_image(site.pods[i % REPLICAS].pusher(), f"conc/old{i % 4}", f"t{i}", shared, os.urandom(512))
    time.sleep(GRACE + 1)  # the doomed images are past the grace period; what the writers push is within it
    stop = threading.Event()
    pushed: list[str] = []
    counter = itertools.count()

    def writer(pod: Pod) -> None:
        p = pod.pusher()  # tokens from the writer's own pod's token service
        while not stop.is_set():
            n = next(counter)
            _shared_layer_image(p, f"conc/new{n % 3}", f"n{n}", shared, os.urandom(256))
            pushed.append(f"conc/new{n % 3}:n{n}")

    threads = [threading.Thread(target=writer, args=(pod,)) for pod in site.pods[:3]]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        report = gc(cluster, namespace, site, 4, "--grace", f"{GRACE}s")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert report["gatesAcked"] == REPLICAS, report
    refused = sum(locked_token_requests(pod) for pod in site.pods[:3])
    assert refused > 0, "no push token was refused while GC held the lock"
    assert report["manifestsDeleted"] >= 20 and report["blobsDeleted"] > 0, report
    assert pushed, "the writers pushed nothing"
    for replica in site.rs.members:
        direct = Pusher(replica.host, auth=("gc", PUSHERS["gc"]))  # only GC may list the catalog
        for ref in pushed:
            repo, _, tag = ref.partition(":")
            assert direct.get_manifest(repo, tag) is not None, f"{ref} was pushed but is gone ({replica.host})"
    assert integrity(direct) >= len(pushed)
    lease = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)
    assert not lease["spec"].get("holderIdentity"), "the lock is released after the run"
    print(f"images pushed through {len(threads)} replicas during GC: {len(pushed)}; push tokens refused: {refused:.0f}; "
          f"drain {report['drainSeconds']}s, window {report['windowSeconds']}s")
