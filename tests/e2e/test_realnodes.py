"""The local cluster's system nodes are real (ci/localnodes.py): a kubelet, Debian's containerd and runc
and a kube-proxy per node, each in its own network namespace. Pods pull real images over the node's
own loopback, run as containers, and answer kubectl logs, exec and port-forward; Services and
cluster DNS lead pods across nodes."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from typing import Any

import pytest

from tests.support.cluster import BIN, Cluster, pod_ready, wait_for
from tests.support.ociimages import Pusher, push_runnable

pytestmark = pytest.mark.e2e
REAL_LABEL = "localcluster.clusterregistry.io/real"
HTTPD = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]


def real_nodes(cluster: Cluster) -> list[dict[str, Any]]:
    return list(cluster.kubectl_json("get", "nodes", "-l", f"{REAL_LABEL}=true")["items"])


@pytest.fixture(scope="module")
def nodes(cluster: Cluster) -> list[str]:
    found = real_nodes(cluster)
    assert found, "the local cluster's system nodes are real (ci/localnodes.py)"
    return sorted(n["metadata"]["name"] for n in found)


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> str:
    """A runnable image in the local cluster registry, which every node reaches at its own 127.0.0.1."""
    img = push_runnable(Pusher(cluster.cluster_registry), "realnodes/web", "1", entrypoint=HTTPD,
                        files={"/www/index.html": b"hello from a real node\n"})
    return f"{cluster.cluster_registry}/realnodes/web@{img.digest}"


def pod(name: str, node: str, image: str, command: list[str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "web", "image": image, "ports": [{"containerPort": 8080}],
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False},
    }
    if command:
        container["command"] = command
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [container], "terminationGracePeriodSeconds": 1,
                 "tolerations": [{"operator": "Exists"}]},
    }


def running(cluster: Cluster, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (lambda p: p if pod_ready(p) else None)(cluster.kubectl_json("get", "pod", "-n", namespace, name)),
                    timeout=timeout, interval=1, what=f"pod {name} Ready")


def test_system_nodes_are_kubelets_on_containerd(cluster: Cluster, nodes: list[str]) -> None:
    assert nodes == ["system-0", "system-1", "system-2"], nodes
    for n in real_nodes(cluster):
        info = n["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.35.4", info
        assert info["containerRuntimeVersion"].startswith("containerd://1.6"), info
        conds = {c["type"]: c["status"] for c in n["status"]["conditions"]}
        assert conds["Ready"] == "True", conds
        addr = [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
        assert addr and addr[0].startswith("198.18.126."), addr
        assert n["metadata"]["labels"]["kubernetes.azure.com/mode"] == "system"


def test_a_pod_runs_and_answers_logs_exec_and_port_forward(cluster: Cluster, namespace: str, nodes: list[str], web: str) -> None:
    spec = pod("web", nodes[0], web)
    spec["spec"]["containers"].append({
        "name": "talker", "image": web, "command": ["/bin/busybox", "sh", "-c", "echo talker started; exec sleep 3600"],
        "securityContext": {"runAsUser": 65532, "readOnlyRootFilesystem": True}})
    cluster.apply(spec, namespace)
    p = running(cluster, namespace, "web")
    statuses = {s["name"]: s for s in p["status"]["containerStatuses"]}
    assert statuses["web"]["imageID"].endswith(web.rsplit("@", 1)[1]), statuses["web"]  # pulled by digest
    # The API server reaches the pod at its IP (webhooks and probes need it), routed to the node.
    with urllib.request.urlopen(f"http://{p['status']['podIP']}:8080/", timeout=10) as r:  # noqa: S310 (RFC 2544 range)
        assert r.read() == b"hello from a real node\n"
    logs = wait_for(lambda: (lambda out: out if "talker started" in out else None)(
        cluster.kubectl("logs", "-n", namespace, "web", "-c", "talker")), timeout=30, what="talker's log")
    assert logs.strip() == "talker started"
    out = cluster.kubectl("exec", "-n", namespace, "web", "-c", "web", "--", "/bin/busybox", "cat", "/www/index.html")
    assert out == "hello from a real node\n"
    denied = cluster.run("kubectl", "exec", "-n", namespace, "web", "-c", "web", "--", "/bin/busybox", "touch", "/x",
                         check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    fwd = subprocess.Popen([str(BIN / "kubectl"), "port-forward", "-n", namespace, "pod/web", ":8080"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env())
    try:
        assert fwd.stdout is not None
        line = fwd.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+) -> 8080", line)
        assert port, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/", timeout=10) as r:  # noqa: S310 (loopback)
            assert r.read() == b"hello from a real node\n"
    finally:
        fwd.terminate()
        fwd.wait(10)


def test_services_and_cluster_dns_lead_across_nodes(cluster: Cluster, namespace: str, nodes: list[str], web: str) -> None:
    cluster.apply(pod("server", nodes[1], web), namespace)
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
                   "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}}, namespace)
    running(cluster, namespace, "server")
    fqdn = f"server.{namespace}.svc.cluster.local"
    # busybox's own resolver and nc (Debian's busybox-static wget exits with SIGSEGV in these containers)
    get = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 $ip 80 | /bin/busybox tail -n 1"
    cmd = ["/bin/busybox", "sh", "-c",
           f"until ip=$(/bin/busybox nslookup {fqdn} | /bin/busybox awk '/^Address/ {{a=$2}} END {{print a}}') && "
           f"[ -n \"$ip\" ] && out=$({get}) && [ -n \"$out\" ]; do sleep 1; done; echo \"$out\"; echo via $ip; exec sleep 3600"]
    cluster.apply(pod("client", nodes[2], web, command=cmd), namespace)
    running(cluster, namespace, "client")
    out = wait_for(lambda: (lambda o: o if "via" in o else None)(cluster.kubectl("logs", "-n", namespace, "client")),
                   timeout=60, what="the client's answer through the Service")
    service_ip = cluster.kubectl_json("get", "service", "-n", namespace, "server")["spec"]["clusterIP"]
    assert out == f"hello from a real node\nvia {service_ip}\n"
