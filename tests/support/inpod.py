"""Reach into the chart's registry pod on a real node: a front-less distribution beside the chart's, the
processes and the network namespaces involved.

    with direct_distribution(cluster, ns, pod) as addr:     # "<pod IP>:5999": distribution, no front, same storage
    node_netns(pod)                                          # nsenter --net=...: the node's view (its runtime's)
    pid = container_pid(cluster, pod, "registry")            # a host PID: /proc/PID/stat, /proc/PID/ns/net

The direct distribution is the pod's own binary and the chart's own config (its ConfigMap) with the
front taken away: no auth, no TLS, no debug listener, on port 5999 of the pod. It shares the chart's
storage, so both paths serve the same bytes from the same disk. It answers anyone who reaches the pod
while it runs: for tests and benchmarks on a throwaway release only.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support import cnf
from tests.support.cluster import BIN, NODE_SOCKETS, Cluster, _ctr, component_pods, pod_ready, wait_for

DIRECT_PORT = 5999
# Environment overrides (REGISTRY_<SECTION>_...) that would put the front back on the direct instance.
FRONT_ENV = re.compile(r"^REGISTRY_(AUTH|HTTP_TLS|HTTP_ADDR|HTTP_HOST|HTTP_DEBUG|NOTIFICATIONS)(_|$)")


def single_replica_values(storage_size: str = "1Gi") -> dict[str, Any]:
    """The chart with one registry and one webhook replica (a client talks to one pod); the webhook rewrites nothing."""
    values = cnf.cluster_registry_values(["no-such-namespace"], "127.0.0.1:1", storage_size=storage_size)
    ext = values["global"]["networkfunctionextension"]
    for component in ("clusterRegistry", "webhook"):
        ext.setdefault(component, {}).update({"highAvailability": {"enabled": False}, "autoScaling": {"enabled": False}})
    return values


def ready_registry_pod(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """A Ready registry pod of the release in NAMESPACE (waited for)."""
    return dict(wait_for(lambda: next((p for p in component_pods(cluster, namespace, "registry") if pod_ready(p)), None),
                         timeout=120, what="a Ready registry pod"))


def registry_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The container that runs distribution (`registry serve CONFIG`)."""
    for c in pod["spec"]["containers"]:
        if "serve" in [*c.get("command", []), *c.get("args", [])]:
            return dict(c)
    raise LookupError(f"no container of {pod['metadata']['name']} runs `registry serve`")


def service_port(pod: dict[str, Any], name: str = "registry") -> int:
    """The container port NAME of POD (what the registry Service's targetPort names)."""
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == name:
                return int(p["containerPort"])
    raise LookupError(f"no container port {name!r} in {pod['metadata']['name']}")


def chart_config(cluster: Cluster, pod: dict[str, Any]) -> dict[str, Any]:
    """Distribution's config as the chart mounts it into POD's registry container."""
    c = registry_container(pod)
    path = Path([*c.get("command", []), *c.get("args", [])][-1])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cm = cluster.kubectl_json("get", "configmap", "-n", pod["metadata"]["namespace"], volume["configMap"]["name"])
    return dict(yaml.safe_load(cm["data"][path.name]))


@contextlib.contextmanager
def direct_distribution(cluster: Cluster, namespace: str, pod: dict[str, Any], port: int = DIRECT_PORT,
                        tls: bool = False) -> Iterator[str]:
    """Run a second, front-less distribution in POD's registry container on its PORT (see the module
    docstring); yields its address, ``<pod IP>:PORT``; stopped by its PID in the pod when done. TLS:
    keep the chart's ``http.tls`` (registryTLS), so it is compared over the same transport."""
    c = registry_container(pod)
    config = chart_config(cluster, pod)
    config.pop("auth", None)
    config.pop("notifications", None)
    http = config.setdefault("http", {})
    for key in ("debug", "host") if tls else ("tls", "debug", "host"):
        http.pop(key, None)
    http["addr"] = f"0.0.0.0:{port}"  # the node's network reaches it, as it reaches the chart's port
    unset = [a for e in c.get("env", []) if FRONT_ENV.match(e["name"]) for a in ("-u", e["name"])]
    name = pod["metadata"]["name"]
    # sh prints the PID distribution will have (exec keeps it), which stops it afterwards; the config
    # arrives on stdin, read to EOF before distribution starts listening.
    proc = subprocess.Popen(
        [str(BIN / "kubectl"), "exec", "-i", "-n", namespace, name, "-c", c["name"], "--", "/bin/sh", "-c",
         'echo "pid $$"; exec /usr/bin/env "$@" /bin/registry serve /dev/stdin', "sh", *unset],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env())
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(yaml.safe_dump(config))
    proc.stdin.close()
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any(f":{port}" in line and "listening" in line for line in output) or proc.poll() is not None,
                 timeout=60, what=f"distribution listening on :{port} in {name}")
        if proc.poll() is not None:
            raise RuntimeError(f"the direct distribution in {name} exited: {''.join(output)[-2000:]}")
        yield f"{pod['status']['podIP']}:{port}"
    finally:
        pid = next((m[1] for line in output if (m := re.match(r"pid (\d+)$", line.strip()))), None)
        if pid:
            cluster.kubectl("exec", "-n", namespace, name, "-c", c["name"], "--", "/bin/sh", "-c", f"kill {pid}", check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def node_netns(pod: dict[str, Any]) -> str:
    """The network namespace of the real node POD runs on (ci/localnodes.py): where its runtime pulls from."""
    return f"/run/netns/crnode-{pod['spec']['nodeName']}"


def container_pid(cluster: Cluster, pod: dict[str, Any], container: str) -> int:
    """The host PID of CONTAINER's process (the real nodes' containers are host processes): its
    /proc/PID/ns/net is the pod's network namespace."""
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    cid = status["containerID"].removeprefix("containerd://")
    for line in _ctr(NODE_SOCKETS / pod["spec"]["nodeName"] / "containerd.sock", "tasks", "ls").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == cid:
            return int(pid)
    raise LookupError(f"no task {cid} on {pod['spec']['nodeName']}")


def direct_pid(cluster: Cluster, pod: dict[str, Any]) -> int:
    """The host PID of the direct distribution (direct_distribution) running in POD's registry container."""
    main = container_pid(cluster, pod, registry_container(pod)["name"])
    pidns = os.readlink(f"/proc/{main}/ns/pid")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "ns/pid") == pidns and \
                    (proc / "cmdline").read_bytes().split(b"\0")[:3] == [b"/bin/registry", b"serve", b"/dev/stdin"]:
                return int(proc.name)
        except OSError:  # gone meanwhile
            continue
    raise LookupError(f"no direct distribution in {pod['metadata']['name']}")
