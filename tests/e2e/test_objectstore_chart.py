"""The chart on object storage, on the local cluster's real nodes (issue #20): S3 (moto's server) and
Azure blob (Azurite) from ci/objectstores, which listen on this machine's 127.0.0.1 and which the
registry pods reach through a forward-annotated Service.

Per backend, one install of chart/ (real helm, the store's keys in the Secret the values name, no PVC,
the chart's default rewrite target: the node proxy on 127.0.0.1:5050) with the registry at five
replicas (the HPA's maximum), and the sample CNF on the real system nodes; the module's tests share it
and run in this order:

- five replicas serve from the store, with no volume;
- the CNF's images are copied into the bucket/container and the nodes' containerd pulls every one of
  them through the node proxy (pods admitted before their Artifacts were Ready are not rewritten
  under ``WhenReady``, so they are restarted once the Artifacts are Ready, as an operator would);
- the GC CronJob measures usage from the store and honours the threshold;
- a replica SIGKILLed while it takes an upload loses nothing;
- with the CNF gone, GC at threshold 0 frees its blobs from the store while images are pushed through
  every replica, and every pushed image survives whole.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.gc import objectstore
from tests.e2e.test_gc import _shared_layer_image, integrity
from tests.support import cnf, objectstores
from tests.support.cluster import Cluster, component_pods, exclusive_chart, pod_ready, three_ready, wait_for
from tests.support.ociimages import Pusher, push_image

pytestmark = pytest.mark.e2e

CNF = "cnf"
REPLICAS = 5
NODE_PROXY = "127.0.0.1:5050"  # the chart's default rewrite target
PORTS = {"s3": 29000, "azure": 29100}  # ci/objectstores
KEYS = {"REGISTRY_STORAGE_S3_ACCESSKEY": "accesskey", "REGISTRY_STORAGE_S3_SECRETKEY": "secretkey",
        "REGISTRY_STORAGE_AZURE_ACCOUNTKEY": "accountkey"}  # the Secret keys the chart's storageEnv reads  # fmt: skip


@dataclass
class Site:
    backend: str
    release: str
    namespace: str
    cnf_ns: str
    store: objectstore.ObjectStore  # the bucket/container as this machine reaches it
    store_host: str  # the artifact store as pods name it
    images: dict[str, cnf.CnfImage]

    def rewritten(self, src: str) -> str:
        return str(reference.rewrite(reference.parse(src), NODE_PROXY))

    def pusher(self, cluster: Cluster, endpoint: str) -> Pusher:
        return Pusher(endpoint, auth=cnf.registry_credentials(cluster, self.namespace, self.release))


def _host_store(store: objectstores.Store) -> objectstore.ObjectStore:
    """The store with distribution's parameter names, at the endpoint this machine reaches (127.0.0.1)."""
    v = store.values["global"]["networkfunctionextension"]["clusterRegistry"]["storage"][store.backend]
    params = ({"bucket": v["bucket"], "region": v["region"], "regionendpoint": store.endpoint, "forcepathstyle": True}
              if store.backend == "s3" else
              {"accountname": v["accountName"], "container": v["container"], "serviceurl": store.endpoint})  # fmt: skip
    return objectstore.from_config({"storage": {store.backend: params}}, store.env)


@pytest.fixture(scope="module", params=objectstores.BACKENDS)
def site(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Site]:
    backend, suffix = str(request.param), secrets.token_hex(3)
    release, namespace, cnf_ns = f"os{suffix[:4]}", f"cro-{suffix}", f"cnf-os-{suffix}"
    for ns in (namespace, cnf_ns):
        cluster.kubectl("create", "namespace", ns)
    store = objectstores.create(backend, endpoint_host=f"objstore.{namespace}.svc.cluster.local")
    secret = store.values["global"]["networkfunctionextension"]["clusterRegistry"]["storage"][backend]["secretName"]
    cluster.apply([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "objstore", "namespace": namespace,
                      "annotations": {cnf.FORWARD_ANNOTATION: f"127.0.0.1:{PORTS[backend]}"}},
         "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": PORTS[backend], "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": namespace},
         "stringData": {KEYS[k]: v for k, v in store.env.items()}},
    ])  # fmt: skip
    front = cnf.StoreFront(cluster)
    front.start()
    try:
        pub = cnf.publish_cnf(cluster, front, [cnf_ns], f"{cnf.chart_version()}-os{suffix}")
        pub.values["global"]["networkfunctionextension"]["clusterRegistry"].update(
            store.values["global"]["networkfunctionextension"]["clusterRegistry"],
            autoScaling={"enabled": False}, clusterRegistryGCThreshold=50)
        with exclusive_chart():
            started = time.monotonic()  # the lock is ours: what follows is this backend's runtime
            try:
                try:
                    cnf.install_cluster_registry(cluster, release, namespace, pub.values)
                    cluster.kubectl("scale", "deployment", f"{cnf.fullname(release)}-registry", "-n", namespace,
                                    f"--replicas={REPLICAS}")  # fmt: skip
                    three_ready(cluster, namespace, "webhook")
                    wait_for(lambda: len(cnf.registry_endpoints(cluster, namespace)) == REPLICAS, timeout=300, interval=2,
                             what=f"{REPLICAS} Ready registry pods")  # fmt: skip
                except Exception as err:
                    logs = {k: v[-1500:] for k, v in cluster.namespace_logs(namespace).items() if "registry-" in k}
                    raise AssertionError(f"the registry did not come up: {json.dumps(logs, indent=1)}") from err
                cnf.install_cnf(cluster, CNF, cnf_ns, pub.chart_ref, pub.version, extra=cnf.ON_SYSTEM_NODES)
                # the reporter CronJob runs every 30 minutes: a Job now, so its pod (and Artifact) exists
                cluster.kubectl("create", "job", "report-0", f"--from=cronjob/{CNF}-reporter", "-n", cnf_ns)
                yield Site(backend, release, namespace, cnf_ns, _host_store(store), pub.store_host, pub.images)
            finally:
                cluster.helm("uninstall", CNF, "-n", cnf_ns, "--wait", "--timeout", "60s", check=False)
                cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
                print(f"{backend}: {time.monotonic() - started:.0f} s from install to uninstall")  # noqa: T201
    finally:
        for ns in (cnf_ns, namespace):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        front.stop()
        objectstores.destroy(store)


def _ready_artifacts(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    items = cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", namespace)["items"]
    return {a["spec"]["sourceArtifact"]: a for a in items if a.get("status", {}).get("phase") == "Ready"}


def _start_gc(cluster: Cluster, site: Site, **flags: str) -> str:
    """Start a Job of the chart's GC CronJob (its pod template; FLAGS replace the values of its --flags)."""
    gc = cluster.kubectl_json("get", "cronjob", f"{cnf.fullname(site.release)}-gc", "-n", site.namespace)
    spec = copy.deepcopy(gc["spec"]["jobTemplate"]["spec"])
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert "--object-storage" in args and "--storage-root" not in args, args
    for flag, value in flags.items():
        args[args.index(f"--{flag}") + 1] = value
    name = f"gc-now-{secrets.token_hex(2)}"
    cluster.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": site.namespace},
                   "spec": spec})  # fmt: skip
    return name


def _gc_pod_log(cluster: Cluster, site: Site, name: str) -> str:
    pods = cluster.kubectl_json("get", "pods", "-n", site.namespace, "-l", f"job-name={name}")["items"]
    # the pod that completed the Job: an earlier attempt may have failed (its log ends in a log line)
    pods.sort(key=lambda p: p.get("status", {}).get("phase") != "Succeeded")
    return cluster.pod_logs(site.namespace, pods[0]["metadata"]["name"], "gc") if pods else ""


def _gc_report(cluster: Cluster, site: Site, name: str) -> dict[str, Any]:
    """The report of GC Job NAME (the last line of its log) once it has run to completion."""

    def finished() -> dict[str, Any] | None:
        obj = cluster.kubectl_json("get", "job", "-n", site.namespace, name)
        conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
        return obj if "True" in (conds.get("Complete"), conds.get("Failed")) else None

    done = wait_for(finished, timeout=300, interval=1, what="the GC Job")
    log = _gc_pod_log(cluster, site, name)
    assert done["status"].get("succeeded") == 1, (done["status"], log[-3000:])
    # The report is stdout's last line; `kubectl logs` merges stderr's log lines in the order the runtime
    # read the two pipes, so the log line written just before the report may come after it.
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    reports = [doc for doc in lines if "ran" in doc and "level" not in doc]
    assert reports, f"no GC report in the log: {log[-3000:]}"
    return dict(reports[-1])


def _resolves_everywhere(cluster: Cluster, site: Site, wanted: dict[str, str]) -> None:
    """Each rewritten reference resolves to its digest on every replica (the pod IPs the Service leads to)."""
    endpoints = cnf.registry_endpoints(cluster, site.namespace)
    assert len(endpoints) == REPLICAS, endpoints
    for endpoint in endpoints:
        p = site.pusher(cluster, endpoint)
        for rewritten, digest in wanted.items():
            ref = reference.parse(rewritten)
            got = p.get_manifest(ref.repository, digest)
            assert got is not None and "sha256:" + hashlib.sha256(got[0]).hexdigest() == digest, (rewritten, endpoint)


def test_five_replicas_serve_from_the_store_with_no_volume(cluster: Cluster, site: Site) -> None:
    assert not cluster.kubectl_json("get", "pvc", "-n", site.namespace)["items"], "object storage has no PVC"
    pods = component_pods(cluster, site.namespace, "registry")
    assert len([p for p in pods if pod_ready(p)]) == REPLICAS
    for p in pods:
        assert not [v for v in p["spec"]["volumes"] if "persistentVolumeClaim" in v], p["metadata"]["name"]
    config = cluster.kubectl_json("get", "configmap", f"{cnf.fullname(site.release)}-registry", "-n", site.namespace)
    assert f"\n  {site.backend}:\n" in config["data"]["config.yml"] and "filesystem" not in config["data"]["config.yml"]


def test_the_cnf_is_copied_into_the_store_and_pulled_by_the_nodes(cluster: Cluster, site: Site) -> None:
    sources = {img.source(site.store_host): img for img in site.images.values()}
    wait_for(lambda: set(sources) <= set(_ready_artifacts(cluster, site.cnf_ns)), timeout=300, interval=2,
             what="every CNF image's Artifact Ready")  # fmt: skip
    stored = objectstore.blob_sizes(site.store)
    for img in site.images.values():  # byte counts from the bucket/container itself
        for m in img.image.all_manifests():
            assert stored.get(m.digest) == len(m.manifest), (img.key, m.digest)
        for digest, size in img.image.all_blobs():
            assert stored.get(digest) == size, (img.key, digest)
    _resolves_everywhere(cluster, site, {site.rewritten(src): img.digest for src, img in sources.items()})

    cnf.restart_cnf(cluster, site.cnf_ns, CNF)
    pods = wait_for(lambda: cnf.all_up(cluster, site.cnf_ns, NODE_PROXY), timeout=240, interval=2,
                    what="every CNF pod rewritten to the node proxy and up")  # fmt: skip
    assert {p["spec"]["nodeName"] for p in pods} <= {"system-0", "system-1", "system-2"}
    for p in pods:  # the nodes' containerd ran what was copied: each container's image ID is the pushed digest
        statuses = p["status"].get("initContainerStatuses", []) + p["status"]["containerStatuses"]
        for c, s in zip(cnf.containers(p), statuses):
            key = "init" if c["name"] == "init" else p["metadata"]["labels"]["app.kubernetes.io/name"]
            assert s["imageID"].endswith(site.images[key].digest), (key, c["image"], s["imageID"])
    front = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/name"] == "frontend")
    with urllib.request.urlopen(f"http://{front['status']['podIP']}:8080/", timeout=10) as r:  # noqa: S310 (pod IP)
        assert r.read() == cnf.page("frontend", "1.0.0")


def test_gc_measures_usage_from_the_store_and_honours_the_threshold(cluster: Cluster, site: Site) -> None:
    # Threshold 50% of 1Gi: the store holds a few MB; GC measures the store and runs nothing.
    before = objectstore.blob_sizes(site.store)
    report = _gc_report(cluster, site, _start_gc(cluster, site))
    assert report["ran"] is False and report["usageBytes"] == sum(before.values()) > 0, report
    assert objectstore.blob_sizes(site.store) == before


def test_a_replica_killed_while_it_takes_an_upload_loses_nothing(cluster: Cluster, site: Site) -> None:
    big = push_image(cnf.store_pusher(cluster), "cnf/big", f"os-{site.backend}", layers=[48 << 20] * 3,
                     seed=int(time.time()))  # fmt: skip
    src = f"{site.store_host}/cnf/big:os-{site.backend}"
    cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                   "metadata": {"name": "big", "namespace": site.cnf_ns}, "spec": {"sourceArtifact": src}})  # fmt: skip

    def taking_it() -> str | None:
        """The registry pod an upload of the big image started on (its access log names the repository)."""
        for p in component_pods(cluster, site.namespace, "registry"):
            if "/cnf/big/blobs/uploads/" in cluster.pod_logs(site.namespace, p["metadata"]["name"], "registry"):
                return str(p["metadata"]["name"])
        return None

    victim = wait_for(taking_it, timeout=120, interval=0.1, what="an upload of the big image under way")
    cluster.kubectl("delete", "pod", victim, "-n", site.namespace, "--grace-period=0", "--force")
    phase_during = cluster.kubectl_json("get", "artifact.clusterregistry.io", "big", "-n", site.cnf_ns).get(
        "status", {}).get("phase")  # fmt: skip
    art = wait_for(lambda: _ready_artifacts(cluster, site.cnf_ns).get(src), timeout=300, interval=2,
                   what="the big Artifact Ready after its replica was killed")  # fmt: skip
    assert phase_during != "Ready", "the replica was killed only after the copy had finished"
    assert art["status"]["digest"] == big.digest
    wait_for(lambda: len(cnf.registry_endpoints(cluster, site.namespace)) == REPLICAS, timeout=180, interval=2,
             what="the killed replica replaced")  # fmt: skip
    assert victim not in {p["metadata"]["name"] for p in component_pods(cluster, site.namespace, "registry")}
    _resolves_everywhere(cluster, site, {site.rewritten(src): big.digest})
    stored = objectstore.blob_sizes(site.store)
    assert all(stored.get(d) == n for d, n in big.all_blobs()), "every layer whole in the store"
    # ... and served whole (each blob hashed as it is read back) by a replica that did not take the upload
    p = site.pusher(cluster, cnf.registry_endpoints(cluster, site.namespace)[0])
    repo = reference.parse(site.rewritten(src)).repository
    assert all(p.blob_sha256(repo, d) == (d, n) for d, n in big.all_blobs())
    cluster.kubectl("delete", "artifact.clusterregistry.io", "big", "-n", site.cnf_ns)


def test_gc_frees_the_cnf_from_the_store_while_every_replica_takes_pushes(cluster: Cluster, site: Site) -> None:
    cluster.helm("uninstall", CNF, "-n", site.cnf_ns, "--wait", "--timeout", "120s")
    cluster.kubectl("delete", "jobs", "--all", "-n", site.cnf_ns)  # the reporter's, started from its CronJob
    # GC keeps what any pod or workload template names, rollback history (ReplicaSets, ControllerRevisions)
    # included, and the API server's garbage collector removes those after helm is done.
    cnf.wait_gone(cluster, "pods,replicasets,controllerrevisions,jobs", "-n", site.cnf_ns, timeout=180)

    def settled() -> bool:
        """No Artifact synced in the last 3 s: all are past the 1 s grace period (cnf.cluster_registry_values)."""
        now = datetime.now(timezone.utc)
        items = cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", site.cnf_ns)["items"]
        synced = [a.get("status", {}).get("lastSyncTime") for a in items]
        return all(t and now - datetime.fromisoformat(t.replace("Z", "+00:00")) > timedelta(seconds=3) for t in synced)

    wait_for(settled, timeout=120, interval=1, what="the CNF's Artifacts past the grace period")
    endpoints = cnf.registry_endpoints(cluster, site.namespace)
    shared = [os.urandom(4096) for _ in range(2)]
    stop, counter = threading.Event(), itertools.count()
    pushed: list[tuple[str, str]] = []

    def writer(endpoint: str) -> None:
        p = site.pusher(cluster, endpoint)
        while not stop.is_set():
            n = next(counter)
            _shared_layer_image(p, f"during-gc/w{n % 3}", f"n{n}", shared, os.urandom(256))
            pushed.append((f"during-gc/w{n % 3}", f"n{n}"))

    def selected(name: str) -> bool:
        """GC has chosen what to delete (what is pushed from now on is not in its inventory, whatever the
        grace period): it is soft-deleting or holds the write lock."""
        if "soft delete" in _gc_pod_log(cluster, site, name):
            return True
        lease = cluster.kubectl("get", "lease", f"{cnf.fullname(site.release)}-gc", "-n", site.namespace,
                                "--ignore-not-found", "-o", "jsonpath={.spec.holderIdentity}")  # fmt: skip
        return bool(lease.strip())

    threads = [threading.Thread(target=writer, args=(e,)) for e in endpoints]
    before = objectstore.blob_sizes(site.store)
    job = _start_gc(cluster, site, threshold="0")
    try:
        wait_for(lambda: selected(job), timeout=180, interval=0.1, what="GC past its selection")
        for t in threads:
            t.start()
        report = _gc_report(cluster, site, job)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(120)
    after = objectstore.blob_sizes(site.store)
    left = {a["spec"]["sourceArtifact"]: a.get("status", {}).get("lastSyncTime")
            for a in cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", site.cnf_ns)["items"]}
    assert report["ran"] and report["manifestsDeleted"] >= len(site.images), (report, left, _gc_pod_log(cluster, site, job))
    assert report["gatesAcked"] == REPLICAS, report
    cnf_blobs = {d for img in site.images.values() for d, _ in img.image.all_blobs()}
    assert cnf_blobs <= set(before) and report["usageBytesAfter"] <= sum(after.values()), report
    assert report["blobsDeleted"] >= len(cnf_blobs - set(after)) > 0, report
    # Nothing pushed meanwhile was lost or corrupted, on any replica.
    assert pushed, "the writers pushed nothing"
    for endpoint in cnf.registry_endpoints(cluster, site.namespace):
        p = site.pusher(cluster, endpoint)
        missing = [f"{repo}:{tag}" for repo, tag in pushed if p.get_manifest(repo, tag) is None]
        assert not missing, (endpoint, missing)
    # The catalog is GC's to list (only its credential may): the integrity check reads with it.
    gc_auth = cnf.registry_credentials(cluster, site.namespace, site.release, "gc")
    assert integrity(Pusher(endpoints[0], auth=gc_auth)) >= len(pushed)
    leftover = {d: after[d] for d in cnf_blobs & set(after)}
    assert not leftover, f"the CNF's blobs, its digest-pinned (untagged) image's included, left the store: {leftover}"
    print(f"{site.backend}: {len(pushed)} images pushed through {len(threads)} replicas during GC; "  # noqa: T201
          f"freed {report['blobsDeleted']} blobs, {report['bytesFreed']} bytes; window {report['windowSeconds']}s")
