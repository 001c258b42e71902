"""GC end to end on the local cluster: real owners of every kind, real Artifacts and Components, a real
distribution registry on loopback with ``auth: token`` and a real ``cluster-registry token-service`` as
its realm (tests/support/tokenfront.py), GC run as a local process.

- which images GC deletes and keeps, per owner kind and rule (one GC run over a table of cases);
- the write lock: no push token is issued during the window, and the token service acknowledges the
  lock once every push token it issued before has died;
- concurrency: pushes sharing layers with deleted images run during GC; afterwards every tagged
  manifest resolves and every blob it names exists and hashes correctly;
- crash: GC SIGKILLed in each phase leaves the registry writable within the Lease TTL, uncorrupted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from cluster_registry import reference
from tests.support.cluster import ROOT, Cluster, wait_for
from tests.support.ociimages import (
    PLATFORMS,
    HTTPError,
    Image,
    Pusher,
    canonical,
    push_image,
    push_index,
)
from tests.support.registry import Registry, registry_binary, run_registry
from tests.support.tokenfront import Front, Pod, env_for, push_token_granted, token_front

HOST = "gc-e2e.example.com"
TWO_HOURS_AGO = time.time() - 7200


# -- helpers ---------------------------------------------------------------------------------------


def source(ns: str, case: str, tag: str = "v1") -> str:
    return f"{HOST}/{ns}/{case}:{tag}"


def local_repo(ns: str, case: str) -> str:
    return reference.local_repository(reference.parse(source(ns, case)))


def age_storage(storage: Path, seconds_ago: float = 7200) -> None:
    """Make everything stored look written long ago: manifests past the grace period, and blobs and links
    older than the online mark's start (it spares whatever was written just before it, see gc/sweep.py)."""
    t = time.time() - seconds_ago
    for path in (storage / "docker/registry/v2").rglob("*"):
        os.utime(path, (t, t))


def integrity(p: Pusher) -> int:
    """Every tagged manifest resolves (digest = hash of its bytes) and every blob it names exists and
    hashes to its digest with its size; returns how many manifests were checked."""
    st, _, body = p.request("GET", "/v2/_catalog?n=1000", "")
    assert st == 200
    checked = 0

    def check(repo: str, ref: str) -> None:
        nonlocal checked
        got = p.get_manifest(repo, ref)
        assert got is not None, f"{repo}:{ref} does not resolve"
        data, _ = got
        if ref.startswith("sha256:"):
            assert "sha256:" + hashlib.sha256(data).hexdigest() == ref, f"{repo}@{ref} bytes differ"
        doc = json.loads(data)
        checked += 1
        for child in doc.get("manifests") or []:
            check(repo, child["digest"])
        for blob in [doc["config"], *doc.get("layers", [])] if "config" in doc else []:
            assert p.blob_sha256(repo, blob["digest"]) == (blob["digest"], blob["size"]), f"{repo} blob {blob['digest']}"

    for repo in json.loads(body).get("repositories") or []:
        for tag in p.tags(repo):
            check(repo, tag)
    return checked


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def front(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Front]:
    """distribution with ``auth: token`` and its token service, as a registry pod runs them."""
    with token_front(cluster, namespace, tmp_path) as f:
        yield f


def run_gc(cluster: Cluster, namespace: str, registry_url: str, storage: Path, *extra: str,
           creds: Path | None = None, timeout: float = 300) -> dict[str, Any]:  # fmt: skip
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gc", "--once", "--registry-url",
            registry_url, "--storage-root", str(storage), "--storage-size", "1Gi", "--lock-name", "gc-lock",
            "--namespace", namespace, "--artifact-namespace", namespace, *extra]  # fmt: skip
    if creds:
        argv += ["--registry-credentials-file", str(creds)]
    proc = subprocess.run(argv, env=env_for(cluster), capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in report, (report, proc.stderr[-3000:])
    report["_stdout"] = proc.stdout
    return report


def start_gc(cluster: Cluster, namespace: str, registry_url: str, storage: Path, creds: Path, *extra: str
             ) -> subprocess.Popen[str]:  # fmt: skip
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "gc", "--once", "--registry-url",
            registry_url, "--storage-root", str(storage), "--storage-size", "1Gi", "--lock-name", "gc-lock",
            "--namespace", namespace, "--artifact-namespace", namespace, "--registry-credentials-file", str(creds),
            *extra]  # fmt: skip
    return subprocess.Popen(argv, env=env_for(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ensure_crds(cluster: Cluster) -> None:
    have = cluster.kubectl("get", "crd", "-o", "name", check=False)
    if "artifacts.clusterregistry.io" in have and "components.clusterregistry.io" in have:
        return
    rendered = cluster.helm("template", "gc-e2e", str(ROOT / "chart"), "--show-only", "templates/crds/artifacts.yaml",
                            "--show-only", "templates/crds/components.yaml")  # fmt: skip
    cluster.kubectl("apply", "-f", "-", stdin=rendered)
    for crd in ("artifacts", "components"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}.clusterregistry.io", "--timeout=60s")


def pod_template(image: str, labels: dict[str, str]) -> dict[str, Any]:
    # Opted out of any cluster-registry webhook another test may have installed in the shared cluster.
    return {"metadata": {"labels": {**labels, "clusterregistry.io/skip": "true"}},
            "spec": {"containers": [{"name": "c", "image": image}], "terminationGracePeriodSeconds": 0}}  # fmt: skip


def uid(cluster: Cluster, namespace: str, kind: str, name: str) -> str:
    return str(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "jsonpath={.metadata.uid}"))


def artifact(namespace: str, name: str, src: str, owners: list[dict[str, str]] | None = None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {"sourceArtifact": src}
    if owners:
        spec["owners"] = owners
    return {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, "spec": spec}  # fmt: skip


def set_synced(cluster: Cluster, namespace: str, name: str, when: datetime, digest: str) -> None:
    status = {"status": {"phase": "Ready", "digest": digest, "lastSyncTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    cluster.kubectl("patch", "artifact", name, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))  # fmt: skip


# -- which images go and which stay ------------------------------------------------------------------


def test_gc_deletes_exactly_the_unreferenced_images(cluster: Cluster, namespace: str, registry: Registry) -> None:
    ensure_crds(cluster)
    ns = namespace
    p = Pusher(registry.host)
    images: dict[str, Image] = {}

    def push(case: str, tag: str = "v1", **kw: Any) -> Image:
        img = push_image(p, local_repo(ns, case), tag, layers=[2048, 1024], seed=hash((ns, case, tag)) % 10**6, **kw)
        images[f"{case}:{tag}"] = img
        return img

    cases = ["deploy", "deploy-rollback", "deploy-zero", "sts", "ds", "cronjob", "job", "job-gone", "pod",
             "pod-gone", "custom-owner", "custom-owner-gone", "shared", "component", "component-label",
             "grace", "stale", "orphan"]  # fmt: skip
    for case in cases:
        push(case)
    push("deploy-rollback", "v2")
    push("deploy-history-gone", "v1")
    push("deploy-history-gone", "v2")
    multi = push_index(p, local_repo(ns, "multi"), "v1", PLATFORMS[:2], layers=[1024], seed=11)
    multi_gone = push_index(p, local_repo(ns, "multi-gone"), "v1", PLATFORMS[:2], layers=[1024], seed=12)
    age_storage(registry.storage)

    lbl = {"app": "x"}
    objs: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "deploy"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "deploy"}},
                  "template": pod_template(source(ns, "deploy"), {"app": "deploy"})}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "multi"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "multi"}},
                  "template": pod_template(source(ns, "multi"), {"app": "multi"})}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "zero"},
         "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "zero"}},
                  "template": pod_template(source(ns, "deploy-zero"), {"app": "zero"})}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "rollback"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "rb"}},
                  "template": pod_template(source(ns, "deploy-rollback"), {"app": "rb"})}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nohistory"},
         "spec": {"replicas": 1, "revisionHistoryLimit": 0, "selector": {"matchLabels": {"app": "nh"}},
                  "template": pod_template(source(ns, "deploy-history-gone"), {"app": "nh"})}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "sts"},
         "spec": {"replicas": 1, "serviceName": "sts", "selector": {"matchLabels": {"app": "sts"}},
                  "template": pod_template(source(ns, "sts"), {"app": "sts"})}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
         "spec": {"selector": {"matchLabels": {"app": "ds"}}, "template": pod_template(source(ns, "ds"), {"app": "ds"})}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cron"},
         "spec": {"schedule": "0 0 1 1 *", "suspend": True, "jobTemplate": {"spec": {"template": {"metadata": pod_template("x", lbl)["metadata"],
             "spec": {**pod_template(source(ns, "cronjob"), lbl)["spec"], "restartPolicy": "Never"}}}}}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "job"},
         "spec": {"template": {"metadata": pod_template("x", lbl)["metadata"], "spec": {**pod_template(source(ns, "job"), lbl)["spec"], "restartPolicy": "Never"}}}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "job-gone"},
         "spec": {"template": {"metadata": pod_template("x", lbl)["metadata"], "spec": {**pod_template(source(ns, "job-gone"), lbl)["spec"], "restartPolicy": "Never"}}}},
        {"apiVersion": "v1", "kind": "Pod", **pod_template(source(ns, "pod"), lbl), "metadata": {"name": "pod", **pod_template("x", lbl)["metadata"]}},
        {"apiVersion": "v1", "kind": "Pod", **pod_template(source(ns, "pod-gone"), lbl), "metadata": {"name": "pod-gone", **pod_template("x", lbl)["metadata"]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner-alive"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner-gone"}},
        {"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Component", "metadata": {"name": "cnf"},
         "spec": {"images": [source(ns, "component")]}},
    ]  # fmt: skip
    cluster.apply(objs, namespace=ns)
    # Roll "rollback" and "nohistory" to v2: the first keeps its v1 ReplicaSet, the second drops it.
    for name, case in (("rollback", "deploy-rollback"), ("nohistory", "deploy-history-gone")):
        cluster.kubectl("set", "image", f"deployment/{name}", f"c={source(ns, case, 'v2')}", "-n", ns)
    wait_for(lambda: len(cluster.kubectl_json("get", "rs", "-n", ns, "-l", "app=rb")["items"]) == 2, 180, what="2 rs")
    wait_for(lambda: len(cluster.kubectl_json("get", "rs", "-n", ns, "-l", "app=nh")["items"]) == 1, 180, what="old rs pruned")
    wait_for(lambda: all(c["image"].endswith(":v2") for pod in cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app=nh")["items"]
                         for c in pod["spec"]["containers"]), 180, what="the v1 pods of nohistory to go")  # fmt: skip
    cm_alive, cm_gone = uid(cluster, ns, "configmap", "owner-alive"), uid(cluster, ns, "configmap", "owner-gone")
    owner = lambda u, n: {"apiVersion": "v1", "kind": "ConfigMap", "name": n, "uid": u}  # noqa: E731
    arts = [
        artifact(ns, "custom-owner", source(ns, "custom-owner"), [owner(cm_alive, "owner-alive")]),
        artifact(ns, "custom-owner-gone", source(ns, "custom-owner-gone"), [owner(cm_gone, "owner-gone")]),
        artifact(ns, "shared", source(ns, "shared"), [owner(cm_gone, "owner-gone"), owner(cm_alive, "owner-alive")]),
        artifact(ns, "component-label", source(ns, "component-label"), labels={"clusterregistry.io/component": "cnf"}),
        artifact(ns, "grace", source(ns, "grace")),
        artifact(ns, "stale", source(ns, "stale")),
        artifact(ns, "job-gone", source(ns, "job-gone"),
                 [{"apiVersion": "batch/v1", "kind": "Job", "name": "job-gone", "uid": uid(cluster, ns, "job", "job-gone")}]),
        artifact(ns, "missing-image", f"{HOST}/{ns}/never-copied:v1"),
    ]  # fmt: skip
    cluster.apply(arts, namespace=ns)
    now = datetime.now(timezone.utc)
    set_synced(cluster, ns, "grace", now - timedelta(minutes=10), images["grace:v1"].digest)
    for name in ("stale", "missing-image", "custom-owner-gone", "job-gone", "shared", "custom-owner", "component-label"):
        set_synced(cluster, ns, name, now - timedelta(hours=3), images.get(f"{name}:v1", images["stale:v1"]).digest)
    cluster.kubectl("delete", "configmap", "owner-gone", "-n", ns)
    cluster.kubectl("delete", "job", "job-gone", "-n", ns, "--cascade=background")
    cluster.kubectl("delete", "pod", "pod-gone", "-n", ns, "--grace-period=0", "--force")
    wait_for(lambda: not cluster.kubectl("get", "pod", "pod-gone", "-n", ns, "--ignore-not-found", "-o", "name"), 60,
             what="pod-gone deleted")  # fmt: skip
    wait_for(lambda: not cluster.kubectl("get", "pods", "-n", ns, "-l", "job-name=job-gone", "-o", "name"), 180,
             what="the pods of job-gone to go")  # fmt: skip

    dry = run_gc(cluster, ns, registry.url, registry.storage, "--dry-run", "--no-sweep")
    assert dry["dryRun"] and dry["manifestsDeleted"] > 0
    assert "would delete manifest" in dry["_stdout"]
    assert all(p.get_manifest(img.repo, img.digest) for img in images.values()), "--dry-run deleted something"

    report = run_gc(cluster, ns, registry.url, registry.storage)

    expect_deleted = {"deploy-history-gone:v1", "job-gone:v1", "pod-gone:v1", "custom-owner-gone:v1", "stale:v1", "orphan:v1"}
    for key, img in images.items():
        present = p.get_manifest(img.repo, img.digest) is not None
        assert present is (key not in expect_deleted), f"{key}: expected {'deleted' if key in expect_deleted else 'kept'}"
    for m in multi.all_manifests():
        assert p.get_manifest(m.repo, m.digest) is not None, "a kept index keeps its platform manifests"
    for m in multi_gone.all_manifests():
        assert p.get_manifest(m.repo, m.digest) is None, "an unreferenced index goes with its platform manifests"
    mine = {a["metadata"]["name"] for a in arts}  # (a webhook installed by someone else may add its own)
    left = {a["metadata"]["name"] for a in cluster.kubectl_json("get", "artifacts", "-n", ns)["items"]} & mine
    assert left == {"custom-owner", "shared", "component-label", "grace"}
    events = cluster.kubectl_json("get", "events", "-n", ns, "--field-selector", "reason=GarbageCollected")["items"]
    assert {e["involvedObject"]["name"] for e in events} & mine == {"custom-owner-gone", "stale", "job-gone", "missing-image"}
    assert report["artifactsDeleted"] >= 4 and report["manifestsRaced"] == 0
    assert report["manifestsDeleted"] == len(expect_deleted) + 3  # + the gone index and its 2 platforms
    assert report["blobsDeleted"] > 0 and report["bytesFreed"] > 0 and report["windowSeconds"] > 0
    assert integrity(p) > 0


# -- lock, drain and concurrent pushes -----------------------------------------------------------------


def _shared_layer_image(p: Pusher, repo: str, tag: str, shared: list[bytes], own: bytes) -> None:
    """Push an image whose layers include ``shared`` ones (skipped when the registry has them: the
    race with the sweep), retrying the whole image when the registry is locked or lost a blob."""
    for _attempt in range(60):
        try:
            layers = [(p.push_blob(repo, data), len(data)) for data in [*shared, own]]
            config = canonical({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                                "config": {"Env": [tag]}})  # fmt: skip
            cd = p.push_blob(repo, config)
            manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                                              "size": len(config)},
                                   "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                                               "size": n} for d, n in layers]}).encode()  # fmt: skip
            p.put_manifest(repo, tag, manifest, "application/vnd.oci.image.manifest.v1+json")
            return
        except HTTPError as err:
            if err.status not in (400, 404, 503):
                raise
            time.sleep(0.3)
    raise AssertionError(f"could not push {repo}:{tag}")


def locked_token_requests(front: Pod) -> float:
    """Push tokens the token service refused because GC held the lock."""
    text = front.service.metrics()
    return sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith("cluster_registry_token_requests_total{") and 'outcome="locked"' in ln)  # fmt: skip


@pytest.mark.parametrize("mode", ["distribution", "trash", "online"])
def test_pushes_during_gc_never_corrupt_and_the_token_service_acks_the_lock(
    cluster: Cluster, namespace: str, front: Front, mode: str
) -> None:
    p = front.pusher()
    shared = [os.urandom(4096) for _ in range(3)]
    for i in range(40):  # doomed: old, unreferenced, and they share layers with what is pushed during GC
        _shared_layer_image(p, f"conc/old{i % 4}", f"t{i}", shared, os.urandom(512))
    age_storage(front.registry.storage)

    stop = threading.Event()
    pushed: list[str] = []
    counter = itertools.count()

    def writer() -> None:
        w = front.pusher()  # each writer keeps its push tokens until they die, as the copy engine does
        while not stop.is_set():
            n = next(counter)
            _shared_layer_image(w, f"conc/new{n % 3}", f"n{n}", shared, os.urandom(256))
            pushed.append(f"conc/new{n % 3}:n{n}")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        report = run_gc(cluster, namespace, front.registry.url, front.registry.storage, "--sweep-mode", mode,
                        creds=front.gc_creds)  # fmt: skip
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert report["gatesAcked"] == 1, report
    assert report["manifestsDeleted"] >= 40 and report["blobsDeleted"] > 0
    # The writers' tokens died during the window (the drain outlasts a push token) and their new ones were refused.
    refused = locked_token_requests(front)
    assert refused > 0, "no push token was refused while GC held the lock"
    assert pushed, "the writers pushed nothing"
    reader = front.pusher("gc")  # only GC may list the catalog
    for ref in pushed:
        repo, _, tag = ref.partition(":")
        assert reader.get_manifest(repo, tag) is not None, f"{ref} was pushed but is gone"
    assert integrity(reader) >= len(pushed)
    lease = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)
    assert not lease["spec"].get("holderIdentity"), "the lock is released after the run"
    hb = cluster.kubectl_json("get", "leases", "-n", namespace, "-l", "clusterregistry.io/gate-for=gc-lock")["items"]
    assert len(hb) == 1 and hb[0]["metadata"]["annotations"]["clusterregistry.io/drained"].startswith("gc-")
    print(f"push tokens refused during the window: {refused:.0f}; images pushed during GC: {len(pushed)}; "
          f"drain {report['drainSeconds']}s, window {report['windowSeconds']}s")


# -- crash safety ---------------------------------------------------------------------------------------


def _wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"gc exited before {needle!r}")
    raise AssertionError(f"no {needle!r} within {timeout}s")


def _seconds_until_writable(front: Front, limit: float = 90) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if front.writable("crash/probe"):
            return time.monotonic() - t0
        time.sleep(0.25)
    return float("inf")


@pytest.mark.parametrize("phase", ["soft-delete", "drain", "sweep"])
def test_sigkilled_gc_frees_writes_within_the_ttl(
    cluster: Cluster, namespace: str, front: Front, tmp_path: Path, phase: str
) -> None:
    p = front.pusher()
    storage = front.registry.storage
    for i in range(30):
        push_image(p, f"crash/app{i % 3}", f"t{i}", layers=[1024, 512], seed=i)
    keep = push_image(p, "crash/keep", "v1", layers=[2048], seed=999)
    age_storage(storage)
    os.utime(next((storage / "docker/registry/v2/repositories/crash/keep").rglob("revisions/*/*/link")))
    extra: list[str] = []
    stop_tokens = threading.Event()
    if phase == "drain":
        # A copy taking push tokens until GC locks: the token service cannot ack while the last one
        # lives (TTL + grace), so GC is in its drain phase when it is killed.
        def take_tokens() -> None:
            while not stop_tokens.is_set() and push_token_granted(front.realm, "crash/slow"):
                time.sleep(0.1)

        threading.Thread(target=take_tokens, daemon=True).start()
    if phase == "sweep":
        marker = tmp_path / "sweep.pid"
        wrapper = tmp_path / "registry-wrapper"
        wrapper.write_text(f"#!/bin/sh\necho $$ > {marker}\nsleep 2\nexec {registry_binary()} \"$@\"\n")
        wrapper.chmod(0o755)
        extra = ["--sweep-mode", "distribution", "--registry-binary", str(wrapper)]  # the wrapper is the window's sweep
    gc = start_gc(cluster, namespace, front.registry.url, storage, front.gc_creds, "--drain-timeout", "120s", *extra)
    try:
        if phase == "soft-delete":
            _wait_line(gc, "soft delete starting")
        elif phase == "drain":
            _wait_line(gc, "write lock taken")
            time.sleep(1)
            holder = cluster.kubectl_json("get", "lease", "gc-lock", "-n", namespace)["spec"]["holderIdentity"]
            hb = cluster.kubectl_json("get", "leases", "-n", namespace, "-l", "clusterregistry.io/gate-for=gc-lock")["items"]
            assert [h["metadata"].get("annotations", {}).get("clusterregistry.io/drained") for h in hb] != [holder], \
                "the token service acknowledged already: GC was not draining"
        else:
            wait_for(lambda: marker.exists() and marker.read_text().strip(), 120, 0.05, what="the sweep to start")
        gc.send_signal(signal.SIGKILL)
        gc.wait(10)
    finally:
        if gc.poll() is None:
            gc.kill()
    killed_at = time.monotonic()
    if phase == "sweep":
        child = int(marker.read_text())
        wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
                 5, 0.1, what="the sweep to die with GC")  # fmt: skip
    stop_tokens.set()
    assert _seconds_until_writable(front) < 90
    waited = time.monotonic() - killed_at
    assert waited < 60, f"writes resumed only after {waited:.0f}s"
    print(f"{phase}: writable {waited:.1f}s after SIGKILL")
    reader = front.pusher("gc")
    assert reader.get_manifest("crash/keep", keep.digest) is not None
    integrity(reader)
    # A complete run afterwards still works (the dead run's lock expired; nothing is stuck).
    report = run_gc(cluster, namespace, front.registry.url, storage, creds=front.gc_creds)
    assert report["gatesAcked"] == 1
    assert reader.get_manifest("crash/keep", keep.digest) is not None
    assert integrity(reader) >= 1
