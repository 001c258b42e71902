"""The chart on object storage, on the local cluster's real nodes: S3 (moto's server) and Azure blob
(Azurite) from ci/objectstores, reached by the registry pods through a forward-annotated Service.

Per backend, one install of chart/ (real helm, the store's keys in the Secret the values name, no
PVC), the registry scaled to five replicas (the HPA's maximum), the sample CNF installed on the system
nodes (its images copied by the artifact reconciler into the bucket/container and pulled by the
nodes' containerd), then:

- every CNF image resolves with the store's digest on every replica, and the store holds its blobs;
- the chart's GC CronJob measures usage from the store: at a threshold above it nothing runs and the
  report's usage is exactly what the store holds; with the CNF gone and the threshold at 0, the CNF's
  images are deleted and mark-and-sweep frees their blobs from the store;
- a registry replica SIGKILLed while an image is being copied in loses nothing: the copy completes
  (digest-verified), and the image pulls from every replica.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.gc import objectstore
from tests.support import cnf, objectstores
from tests.support.cluster import Cluster, component_pods, exclusive_chart, pod_ready, three_ready, wait_for
from tests.support.ociimages import push_image

# Not yet seen green: in the 2026-12-07 session the install came up (five registry replicas Ready on
# moto through the forward Service) but the shared cluster's chart lock was not free again in time to
# run the rest. Unskip when it has passed once (issue #20).

CNF = "cnf"
REPLICAS = 5
PORTS = {"s3": 29000, "azure": 29100}  # ci/objectstores
SECRETS = {"s3": "registry-s3", "azure": "registry-azure"}


@dataclass
class Site:
    backend: str
    release: str
    namespace: str
    cnf_ns: str
    store: objectstores.Store
    host_store: objectstore.ObjectStore  # the same bucket/container as this machine reaches it
    store_host: str
    images: dict[str, cnf.CnfImage]

    def rewritten(self, key: str) -> str:
        src = reference.parse(self.images[key].source(self.store_host))
        return str(reference.rewrite(src, "127.0.0.1:5050"))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _secret(cluster: Cluster, namespace: str, store: objectstores.Store) -> None:
    keys = {"REGISTRY_STORAGE_S3_ACCESSKEY": "accesskey", "REGISTRY_STORAGE_S3_SECRETKEY": "secretkey",
            "REGISTRY_STORAGE_AZURE_ACCOUNTKEY": "accountkey"}  # the chart's storageEnv  # fmt: skip
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRETS[store.backend], "namespace": namespace},
                   "stringData": {keys[k]: v for k, v in store.env.items()}})  # fmt: skip


@pytest.fixture(params=objectstores.BACKENDS)
def site(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Site]:
    backend = str(request.param)
    suffix = secrets.token_hex(3)
    release, namespace, cnf_ns = f"os{suffix[:4]}", f"cro-{suffix}", f"cnf-os-{suffix}"
    for ns in (namespace, cnf_ns):
        cluster.kubectl("create", "namespace", ns)
    svc = f"objstore.{namespace}.svc.cluster.local"
    store = objectstores.create(backend, endpoint_host=svc)
    cluster.apply({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "objstore", "namespace": namespace,
                                "annotations": {cnf.FORWARD_ANNOTATION: f"127.0.0.1:{PORTS[backend]}"}},
                   "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": PORTS[backend], "protocol": "TCP"}]}})  # fmt: skip
    _secret(cluster, namespace, store)
    front = cnf.StoreFront(cluster).start()
    try:
        store_host = cnf.expose_store(cluster, cnf_ns, front)
        cnf.pull_secret(cluster, cnf_ns, store_host)
        images = cnf.push_images(cluster)
        chart_ref = cnf.push_chart(cluster, images, store_host)
        values = _merge(cnf.cluster_registry_values([cnf_ns], store_host), store.values)
        values = _merge(values, {"global": {"networkfunctionextension": {"clusterRegistry": {
            "autoScaling": {"enabled": False}, "clusterRegistryGCThreshold": 50, "storageSize": "1Gi"}}}})
        host_config = {"storage": {backend: _driver_params(store)}}
        host_store = objectstore.from_config(host_config, store.env)
        with exclusive_chart():
            try:
                try:
                    cnf.install_cluster_registry(cluster, release, namespace, values)
                    cluster.kubectl("scale", "deployment", f"{cnf.fullname(release)}-registry", "-n", namespace,
                                    f"--replicas={REPLICAS}")  # fmt: skip
                    three_ready(cluster, namespace, "webhook")
                    wait_for(lambda: len([p for p in component_pods(cluster, namespace, "registry") if pod_ready(p)]) == REPLICAS,
                             timeout=300, interval=2, what=f"{REPLICAS} Ready registry pods")  # fmt: skip
                except Exception as err:
                    logs = {k: v[-1500:] for k, v in cluster.namespace_logs(namespace).items() if "registry-" in k}
                    raise AssertionError(f"the registry did not come up: {json.dumps(logs, indent=1)}") from err
                cnf.install_cnf(cluster, CNF, cnf_ns, chart_ref, extra=cnf.ON_SYSTEM_NODES)
                yield Site(backend, release, namespace, cnf_ns, store, host_store, store_host, images)
            finally:
                cluster.helm("uninstall", CNF, "-n", cnf_ns, "--wait", "--timeout", "60s", check=False)
                cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
    finally:
        for ns in (cnf_ns, namespace):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        front.stop()
        objectstores.destroy(store)


def _driver_params(store: objectstores.Store) -> dict[str, Any]:
    """distribution's parameters for the store as this machine reaches it (127.0.0.1)."""
    if store.backend == "s3":
        s3 = store.values["global"]["networkfunctionextension"]["clusterRegistry"]["storage"]["s3"]
        return {"bucket": s3["bucket"], "region": s3["region"], "regionendpoint": store.endpoint, "forcepathstyle": True}
    az = store.values["global"]["networkfunctionextension"]["clusterRegistry"]["storage"]["azure"]
    return {"accountname": az["accountName"], "container": az["container"], "serviceurl": store.endpoint}


def _artifacts_ready(cluster: Cluster, site: Site) -> bool:
    items = cluster.kubectl_json("get", "artifacts.clusterregistry.io", "-n", site.cnf_ns)["items"]
    want = {img.source(site.store_host) for img in site.images.values()}
    ready = {a["spec"]["sourceArtifact"] for a in items if a.get("status", {}).get("phase") == "Ready"}
    return want <= ready


def _gc_job(cluster: Cluster, site: Site, *, threshold: str | None = None) -> dict[str, Any]:
    """A Job from the chart's GC CronJob (its pod template; ``threshold`` replaces --threshold's value)
    run to completion; returns its report (the last line of its log)."""
    gc = cluster.kubectl_json("get", "cronjob", f"{cnf.fullname(site.release)}-gc", "-n", site.namespace)
    spec = copy.deepcopy(gc["spec"]["jobTemplate"]["spec"])
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--object-storage" in args and "--storage-root" not in args, args
    if threshold is not None:
        args[args.index("--threshold") + 1] = threshold
    name = f"gc-now-{secrets.token_hex(2)}"
    cluster.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": site.namespace}, "spec": spec})

    def finished() -> dict[str, Any] | None:
        obj = cluster.kubectl_json("get", "job", "-n", site.namespace, name)
        conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
        return obj if conds.get("Complete") == "True" or conds.get("Failed") == "True" else None

    done = wait_for(finished, timeout=300, interval=2, what="the GC Job")
    pod = cluster.kubectl_json("get", "pods", "-n", site.namespace, "-l", f"job-name={name}")["items"][0]
    log = cluster.pod_logs(site.namespace, pod["metadata"]["name"], "gc")
    assert done["status"].get("succeeded") == 1, (done["status"], log[-3000:])
    report: dict[str, Any] = json.loads(log.strip().splitlines()[-1])
    return report


def _resolves_everywhere(cluster: Cluster, site: Site, wanted: dict[str, str]) -> None:
    """Each rewritten reference resolves to its digest on every replica; the first one is pulled whole
    (skopeo verifies every blob)."""
    endpoints = cnf.registry_endpoints(cluster, site.namespace)
    assert len(endpoints) == REPLICAS, endpoints
    for rewritten, digest in wanted.items():
        _, _, path = rewritten.partition("/")
        for endpoint in endpoints:
            raw = cnf.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{endpoint}/{path}").stdout
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest, (rewritten, endpoint)
    first = next(iter(wanted))
    assert cnf.pull(first, endpoints[-1]) == wanted[first]


def test_the_sample_cnf_on_object_storage(cluster: Cluster, site: Site) -> None:
    assert not cluster.kubectl_json("get", "pvc", "-n", site.namespace)["items"], "object storage has no PVC"
    wait_for(lambda: _artifacts_ready(cluster, site), timeout=420, interval=3, what="every CNF Artifact Ready")
    wait_for(lambda: all(p["status"].get("phase") in ("Running", "Succeeded")
                         for p in cluster.kubectl_json("get", "pods", "-n", site.cnf_ns, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"]),
             timeout=300, interval=3, what="the CNF's pods running (pulled by the nodes' containerd)")  # fmt: skip
    _resolves_everywhere(cluster, site, {site.rewritten(k): img.digest for k, img in sorted(site.images.items())})
    stored = objectstore.blob_sizes(site.host_store)
    for img in site.images.values():
        for m in img.image.all_manifests():
            assert stored.get(m.digest) == len(m.manifest), m.digest
            for digest, size in m.blobs:
                assert stored.get(digest) == size, digest

    # Threshold 50% of 1Gi: the store holds far less; GC measures it and runs nothing.
    report = _gc_job(cluster, site)
    assert report["ran"] is False and report["usageBytes"] == sum(objectstore.blob_sizes(site.host_store).values()), report

    # A replica SIGKILLed while a larger image is copied in: the copy completes, nothing is lost.
    big = push_image(cnf.store_pusher(cluster), "cnf/big", "1.0.0", layers=[24 << 20, 1000], seed=77)
    src = f"{site.store_host}/cnf/big:1.0.0"
    cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                   "metadata": {"name": "big", "namespace": site.cnf_ns}, "spec": {"sourceArtifact": src}})  # fmt: skip
    time.sleep(1.5)
    victim = component_pods(cluster, site.namespace, "registry")[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", site.namespace, "--grace-period=0", "--force")
    art = wait_for(lambda: (lambda a: a if a.get("status", {}).get("phase") == "Ready" else None)(
        cluster.kubectl_json("get", "artifacts.clusterregistry.io", "big", "-n", site.cnf_ns)), timeout=300, interval=2,
        what="the big Artifact Ready after a replica was killed")  # fmt: skip
    assert art["status"]["digest"] == big.digest
    wait_for(lambda: len(cnf.registry_endpoints(cluster, site.namespace)) == REPLICAS, timeout=180, interval=2,
             what="the killed replica replaced")  # fmt: skip
    _resolves_everywhere(cluster, site, {str(reference.rewrite(reference.parse(src), "127.0.0.1:5050")): big.digest})
    cluster.kubectl("delete", "artifact.clusterregistry.io", "big", "-n", site.cnf_ns)

    # The CNF goes; GC at threshold 0 deletes its images and the sweep frees their blobs from the store.
    cluster.helm("uninstall", CNF, "-n", site.cnf_ns, "--wait", "--timeout", "120s")
    wait_for(lambda: not cluster.kubectl_json("get", "pods", "-n", site.cnf_ns, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"],
             timeout=180, interval=2, what="the CNF's pods gone")  # fmt: skip
    time.sleep(2)  # past the 1 s grace period
    before = objectstore.blob_sizes(site.host_store)
    report = _gc_job(cluster, site, threshold="0")
    after = objectstore.blob_sizes(site.host_store)
    assert report["ran"] and report["manifestsDeleted"] >= len(site.images), report
    assert report["blobsDeleted"] > 0 and report["usageBytesAfter"] == sum(after.values()), report
    cnf_blobs = {d for img in site.images.values() for m in img.image.all_manifests() for d, _ in m.blobs}
    assert not cnf_blobs & set(after), "the CNF's blobs left the store"
    assert set(before) - set(after) >= cnf_blobs
    print(f"{site.backend}: GC freed {report['blobsDeleted']} blobs, {report['bytesFreed']} bytes; "
          f"window {report['windowSeconds']}s with {report['gatesAcked']} gates")
