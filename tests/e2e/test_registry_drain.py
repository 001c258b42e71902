"""#16 item 10 on the real nodes: pulls in progress survive the registry pod's deletion and a rollout.

The chart is installed with its HA defaults (3 registry replicas on the real system nodes). Pulls go
where a node's pulls go: from a node's network namespace to the registry Service's ClusterIP, which
that node's kube-proxy leads to one of the pods (conntrack names which). `kubectl delete pod` with
the default grace on the pod serving a slow pull, and `kubectl rollout restart` of the Deployment
while pulls keep starting: every pull completes with the blob's digest.
(tests/integration/test_registry_drain.py shows the same on processes, with a no-drain control.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_ca_rotation import installed
from tests.e2e.test_chart_runs import Release
from tests.support.cluster import ROOT, Cluster, component_pods, three_ready, wait_for
from tests.support.cnf import registry_credentials, registry_endpoints
from tests.support.ociimages import Pusher, layer_chunks

BIG, SMALL = 64 << 20, 16 << 20
REPO = "drain/app"
NODES = ("crnode-system-0", "crnode-system-1", "crnode-system-2")  # the real nodes' network namespaces


# -- the client, run inside a node's network namespace ---------------------------------------------


def _pull(p: Pusher, digest: str, rate: float, on_connect: Any = None) -> dict[str, Any]:
    """GET one blob at about RATE bytes/s; what arrived (a cut-off pull shows in bytes and error).
    Each pull gets a token of its own (P knows the auth scheme; tokens are short-lived)."""
    p = Pusher(p.host, auth=p.auth, _challenge=p._challenge)
    conn = p._conn()  # HTTPS with registryTLS (the chart's default)
    conn.timeout = 60
    got, sha, error, status = 0, hashlib.sha256(), "", 0
    start = time.monotonic()
    try:
        headers = p._authz(REPO)
        conn.connect()
        assert conn.sock is not None
        if on_connect:
            on_connect(conn.sock.getsockname()[1])
        conn.request("GET", f"/v2/{REPO}/blobs/{digest}", headers=headers)
        resp = conn.getresponse()
        status = resp.status
        while chunk := resp.read(256 << 10):
            sha.update(chunk)
            got += len(chunk)
            if rate:
                time.sleep(max(0.0, got / rate - (time.monotonic() - start)))
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the pull is reported lost
        error = f"{type(err).__name__}: {err}"
    finally:
        conn.close()
    return {"status": status, "bytes": got, "digest": "sha256:" + sha.hexdigest(), "error": error,
            "seconds": round(time.monotonic() - start, 2)}  # fmt: skip


def _pusher(host: str, user: str, password: str) -> Pusher:
    p = Pusher(host, auth=(user, password))
    p.request("GET", "/v2/", REPO)  # learn the registry's auth scheme (none, basic or a token realm)
    return p


def pull_one(host: str, user: str, password: str, digest: str, rate: float) -> None:
    """Print the connection's local port at once (for conntrack), then the pull's result."""
    p = _pusher(host, user, password)
    print(json.dumps(_pull(p, digest, rate, lambda port: print(json.dumps({"sport": port}), flush=True))), flush=True)


def pull_many(host: str, user: str, password: str, digest: str, rate: float, every: float, stop: str) -> None:
    """Start a pull every EVERY seconds until the file STOP exists; print every pull's result."""
    p = _pusher(host, user, password)
    results: list[dict[str, Any]] = []
    threads = []
    while not os.path.exists(stop):
        t = threading.Thread(target=lambda: results.append(_pull(p, digest, rate)))
        t.start()
        threads.append(t)
        time.sleep(every)
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)


def in_node(node: str, call: str) -> subprocess.Popen[str]:
    code = f"from tests.e2e.test_registry_drain import *; {call}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'hooks'}"}
    return subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def served_by(node: str, service_ip: str, sport: int) -> str:
    """The pod IP kube-proxy chose for the node's connection from SPORT to the Service."""
    out = subprocess.run(["ip", "netns", "exec", node, "conntrack", "-L", "-p", "tcp", "--dst", service_ip,
                          "--sport", str(sport)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    reply = out.split()[out.split().index(f"sport={sport}") + 2]  # the reply direction's src= comes next
    assert reply.startswith("src="), out
    return reply.removeprefix("src=")


# -- the tests ----------------------------------------------------------------------------------------


class Setup:
    def __init__(self, cluster: Cluster, rel: Release) -> None:
        self.rel = rel
        svc = cluster.kubectl_json("get", "service", "-n", rel.namespace, f"{rel.prefix}-registry")
        self.ip = svc["spec"]["clusterIP"]
        self.host = f"{self.ip}:{next(p['port'] for p in svc['spec']['ports'] if p['name'] == 'registry')}"
        self.user, self.password = registry_credentials(cluster, rel.namespace, rel.name)
        pusher = Pusher(registry_endpoints(cluster, rel.namespace)[0], auth=(self.user, self.password))
        self.big = pusher.push_blob_stream(REPO, layer_chunks(61, BIG), BIG)
        self.small = pusher.push_blob_stream(REPO, layer_chunks(62, SMALL), SMALL)

    def args(self, digest: str) -> str:
        return f"{self.host!r}, {self.user!r}, {self.password!r}, {digest!r}"


@pytest.fixture(scope="module")
def setup(cluster: Cluster) -> Iterator[Setup]:
    with installed(cluster, "drain") as rel:
        three_ready(cluster, rel.namespace, "registry")
        yield Setup(cluster, rel)


def pod_with_ip(cluster: Cluster, namespace: str, ip: str) -> str:
    return str(next(p["metadata"]["name"] for p in component_pods(cluster, namespace, "registry") if p["status"]["podIP"] == ip))


def test_registry_pull_survives_deleting_the_pod_serving_it(cluster: Cluster, setup: Setup) -> None:
    client = in_node(NODES[0], f"pull_one({setup.args(setup.big)}, rate={4 << 20})")  # ~16 s
    assert client.stdout is not None
    sport = json.loads(client.stdout.readline() or "{}").get("sport")
    assert sport, client.communicate(timeout=10)
    pod = pod_with_ip(cluster, setup.rel.namespace, wait_for(lambda: served_by(NODES[0], setup.ip, sport), timeout=10))
    time.sleep(2)  # well into the transfer
    deleted = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", setup.rel.namespace, pod, "--wait=false")
    out, err = client.communicate(timeout=120)
    ended = time.monotonic()
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["status"], result["bytes"], result["digest"], result["error"]) == (200, BIG, setup.big, ""), (result, err[-2000:])
    # The kubelet's SIGTERM (after the 5 s preStop) came while the pull was still running.
    assert ended - deleted > 8, f"the pull ended {ended - deleted:.1f}s after the delete: it did not cross the SIGTERM"
    # ... and the pod then went away once drained, well before its 75 s grace period.
    wait_for(lambda: pod not in [p["metadata"]["name"] for p in cluster.kubectl_json(
        "get", "pods", "-n", setup.rel.namespace, "-l", "app.kubernetes.io/component=registry")["items"]],
        timeout=60, what=f"{pod} gone after draining")  # fmt: skip
    print(f"\ndelete mid-pull: {BIG >> 20} MiB pull finished {ended - deleted:.1f}s after `kubectl delete pod` "
          f"({result['seconds']}s in all), digest verified")


def test_registry_rollout_restart_loses_no_pull(cluster: Cluster, setup: Setup, tmp_path: Path) -> None:
    ns, deployment = setup.rel.namespace, f"{setup.rel.prefix}-registry"
    before = {p["metadata"]["name"] for p in three_ready(cluster, ns, "registry")}
    stop = tmp_path / "stop"
    # From every node, a ~4 s pull starts every 0.5 s: several always in flight on each replica.
    clients = [in_node(node, f"pull_many({setup.args(setup.small)}, rate={4 << 20}, every=0.5, stop={str(stop)!r})")
               for node in NODES]  # fmt: skip
    start = time.monotonic()
    try:
        time.sleep(3)
        cluster.kubectl("rollout", "restart", "-n", ns, f"deployment/{deployment}")
        cluster.kubectl("rollout", "status", "-n", ns, f"deployment/{deployment}", "--timeout=240s", timeout=260)
        rolled = time.monotonic() - start
        wait_for(lambda: not before & {p["metadata"]["name"] for p in cluster.kubectl_json(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=registry")["items"]},
            timeout=120, what="every old registry pod gone")  # fmt: skip
    finally:
        stop.touch()
    results: list[dict[str, Any]] = []
    for c in clients:
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, err[-2000:]
        results += json.loads(out.strip().splitlines()[-1])
    lost = [r for r in results if (r["status"], r["bytes"], r["digest"], r["error"]) != (200, SMALL, setup.small, "")]
    kinds = Counter(f"{r['status']} {r['error']}" for r in lost)
    assert not lost, f"{len(lost)} of {len(results)} pulls lost: {dict(kinds)}"
    assert len(results) > 3 * 2 * rolled * 0.5, f"only {len(results)} pulls in {rolled:.0f}s"
    print(f"\nrollout restart: {len(results)} pulls of {SMALL >> 20} MiB during a {rolled:.0f}s rollout, none lost")
