"""A process-backed node agent: the local cluster's "kubelet" for the project's own images.

`ci/localcluster up` starts it (``python tests/support/nodeagent.py --kubeconfig … --state …``). It owns the nodes annotated
``localcluster.clusterregistry.io/agent=process`` (the three system-pool nodes; kwok keeps simulating
the others) and, for every pod bound to them:

* pods whose containers use one of the project's images (the Python image ``cluster-registry`` and
  the distribution registry image) really run: each container is a local process started through
  ``podsandbox.py`` in the pod's own network namespace, with the container's command/args/env
  (``valueFrom`` and the downward API resolved, ``$(VAR)`` expanded), its volumes (ConfigMap, Secret,
  projected service-account token from the TokenRequest API for the pod's ServiceAccount with
  ``ca.crt`` and ``namespace``, downward API, emptyDir, PVC) bound at their mount paths, and its
  security context (runAsUser/Group, read-only root filesystem);
* probes (startup, readiness, liveness: httpGet, tcpSocket, exec) run on their schedule and drive
  the Ready condition; a failed liveness probe or an exited process restarts the container with
  kubelet's back-off (10 s doubling to 5 min) per ``restartPolicy``; Job pods end Succeeded or
  Failed by exit code; deleting a pod sends SIGTERM, then SIGKILL after its grace period;
* any other pod on these nodes is simulated the way kwok's default stages do (Running and Ready,
  Job pods Succeeded).

Networking, per pod: a network namespace with two veth pairs (no bridge, no NAT, no forwarding). The
pod IP comes from 198.18.0.0/17 and is routed on the host to the pod's ``eth0``, so the API server and
the probes reach the pod at its EndpointSlice address (webhooks through ``--enable-aggregator-routing``).
``eth1`` leads to one shared services namespace where the whole service CIDR is local: the agent
listens there on every Service's ClusterIP:port and forwards each connection to a ready endpoint
(``kubernetes`` goes to the API server on 127.0.0.1). Each pod's ``/etc/hosts`` maps
``<svc>.<ns>.svc.cluster.local`` (and the shorter forms) to ClusterIPs.

Container output goes to ``.cache/localcluster/nodeagent/logs/<ns>_<pod>_<uid>/<container>.log``
(``tests.support.cluster.Cluster.pod_logs`` reads it) and, through the agent's kubelet-style HTTPS
endpoint, to ``kubectl logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import ctypes.util
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".cache" / "bin"
VENV_BIN = ROOT / ".venv" / "bin"
SANDBOX = Path(__file__).resolve().parent / "podsandbox.py"

AGENT_ANNOTATION = "localcluster.clusterregistry.io/agent"
# A selectorless Service with this annotation ("127.0.0.1:PORT") forwards to a server of the harness on
# the host's loopback: how pods reach the artifact store that stands in for a remote registry.
FORWARD_ANNOTATION = "localcluster.clusterregistry.io/forward-to"
POD_NET = ipaddress.ip_network("198.18.0.0/17")
GATEWAY = "198.18.0.1"  # the host side of every pod's veth
SERVICE_CIDR = "198.19.0.0/16"
NETNS_PREFIX = "crpod-"
SERVICES_NETNS = "crsvc"
VETH_PREFIX = "crv"
SVC_VETH_PREFIX = "crs"
BACKOFF_START = 10.0
BACKOFF_MAX = 300.0

log = logging.getLogger("nodeagent")

# --------------------------------------------------------------------------------------------------
# Images the agent really runs: what the image would contain, mapped onto this machine.


@dataclass(frozen=True)
class ImageKind:
    """What an image would bring: its files (mapped to this machine's), config and entrypoint."""

    name: str
    entrypoint: list[str]
    cmd: list[str]
    files: dict[str, Path]  # path inside the container -> file or directory on this machine
    env: dict[str, str]
    user: tuple[int, int] | None = None  # the image's USER (uid, gid); None = root
    workdir: str = "/"


# hooks/Containerfile: the venv at /opt/venv, registry and helm in /usr/local/bin, USER 65532,
# WORKDIR /tmp, HOME=/tmp, helm's caches under /tmp, ENTRYPOINT ["cluster-registry"].
PYTHON_IMAGE = ImageKind(
    name="cluster-registry",
    entrypoint=["cluster-registry"],
    cmd=["--help"],
    files={
        "/opt/venv": VENV_BIN.parent,
        "/usr/local/bin/cluster-registry": VENV_BIN / "cluster-registry",
        "/usr/local/bin/registry": BIN / "registry",
        "/usr/local/bin/helm": BIN / "helm",
    },
    env={
        "PATH": f"/opt/venv/bin:{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
        "HELM_CACHE_HOME": "/tmp/helm/cache", "HELM_CONFIG_HOME": "/tmp/helm/config",
        "HELM_DATA_HOME": "/tmp/helm/data",
    },
    user=(65532, 65532),
    workdir="/tmp",
)
# distribution's image: /bin/registry, ENTRYPOINT ["registry"], CMD ["serve", "/etc/distribution/config.yml"].
REGISTRY_IMAGE = ImageKind(
    name="registry",
    entrypoint=["registry"],
    cmd=["serve", "/etc/distribution/config.yml"],
    files={"/bin/registry": BIN / "registry"},
    env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
)


def image_kind(image: str) -> ImageKind | None:
    """The project's images by repository name, wherever they are pulled from (rewritten or not)."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    repo = last.split(":", 1)[0]
    full = ref.rsplit(":", 1)[0] if ":" in last else ref
    if repo == "cluster-registry":
        return PYTHON_IMAGE
    if full.endswith("library/registry") or full == "registry" or full.endswith("distribution/registry") \
            or full.endswith("distribution/distribution"):
        return REGISTRY_IMAGE
    return None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# Network namespaces


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def socket_in_netns(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside the named network namespace (it stays there once created)."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)

    t = threading.Thread(target=work)  # a fresh OS thread: its namespace dies with it
    t.start()
    t.join()
    r = result[0]
    if isinstance(r, BaseException):
        raise r
    return r


class IPAM:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: set[str] = set()
        self.next = 2

    def allocate(self) -> str:
        with self.lock:
            hosts = POD_NET.num_addresses - 2
            for _ in range(hosts):
                n = self.next
                self.next = self.next + 1 if self.next + 1 < hosts else 2
                addr = str(POD_NET.network_address + n)
                if addr not in self.used and addr != GATEWAY:
                    self.used.add(addr)
                    return addr
        raise RuntimeError("pod IP pool exhausted")

    def claim(self, addr: str | None) -> str:
        """ADDR when the pod already has it (pod IPs never change), else a fresh one."""
        if addr and ipaddress.ip_address(addr) in POD_NET and addr != GATEWAY:
            with self.lock:
                if addr not in self.used:
                    self.used.add(addr)
                    return addr
        return self.allocate()

    def release(self, addr: str) -> None:
        with self.lock:
            self.used.discard(addr)


def create_services_network() -> None:
    """The namespace where Service ClusterIPs live: the whole service CIDR is local there.

    Keeping the ClusterIP listeners out of the pods' own namespaces leaves every port free for the
    pod's processes (a process binding 0.0.0.0:5000 must not collide with Service port 5000).
    """
    delete_pod_network(SERVICES_NETNS)
    ip("netns", "add", SERVICES_NETNS)
    ip("-n", SERVICES_NETNS, "link", "set", "lo", "up")
    ip("-n", SERVICES_NETNS, "route", "add", "local", SERVICE_CIDR, "dev", "lo")


def create_pod_network(uid: str, pod_ip: str) -> tuple[str, str]:
    """Pod namespace with eth0 (veth to the host: the pod IP, reached by the API server and probes)
    and eth1 (veth to the services namespace: the route for ClusterIPs). No default route."""
    netns = NETNS_PREFIX + uid[:13]
    veth = VETH_PREFIX + uid[:12]
    sveth = SVC_VETH_PREFIX + uid[:12]
    delete_pod_network(netns)
    ip("netns", "add", netns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("addr", "add", f"{GATEWAY}/32", "dev", veth)
    ip("link", "set", veth, "up")
    ip("-n", netns, "link", "set", "lo", "up")
    ip("-n", netns, "addr", "add", f"{pod_ip}/32", "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    ip("-n", netns, "route", "add", f"{GATEWAY}/32", "dev", "eth0")
    ip("route", "replace", f"{pod_ip}/32", "dev", veth, "src", GATEWAY)
    ip("-n", SERVICES_NETNS, "link", "add", sveth, "type", "veth", "peer", "name", "eth1", "netns", netns)
    ip("-n", SERVICES_NETNS, "link", "set", sveth, "up")
    ip("-n", SERVICES_NETNS, "route", "add", f"{pod_ip}/32", "dev", sveth)
    ip("-n", netns, "link", "set", "eth1", "up")
    ip("-n", netns, "route", "add", SERVICE_CIDR, "dev", "eth1", "src", pod_ip)
    return netns, veth


def delete_pod_network(netns: str) -> None:
    if Path(f"/run/netns/{netns}").exists():
        ip("netns", "del", netns, check=False)


# --------------------------------------------------------------------------------------------------
# Quantities (resourceFieldRef)


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "m": 0.001}


def quantity(q: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m:
        raise ValueError(q)
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1)


# --------------------------------------------------------------------------------------------------
# The cluster view shared by all pods: services and endpoints


@dataclass
class ServiceView:
    services: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    version: int = 0


class Agent:
    def __init__(self, kubeconfig: str, state: Path, apiserver: tuple[str, int]) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 64
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)
        self.state = state
        self.apiserver = apiserver
        self.ipam = IPAM()
        self.nodes: set[str] = set()
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.view = ServiceView()
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self.listeners: dict[tuple[str, int], tuple[tuple[str, str, str, str], asyncio.AbstractServer]] = {}

    # -- nodes ------------------------------------------------------------------------------------

    def discover_nodes(self) -> None:
        nodes = self.core.list_node().items
        mine = {n.metadata.name for n in nodes if (n.metadata.annotations or {}).get(AGENT_ANNOTATION) == "process"}
        if mine != self.nodes:
            log.info("managing nodes %s", sorted(mine))
        self.nodes = mine

    def heartbeat(self) -> None:
        from kubernetes.client.rest import ApiException

        now = dt.datetime.now(dt.timezone.utc)
        micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for name in sorted(self.nodes):
            lease = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro},
            }
            try:
                self.coord.patch_namespaced_lease(name, "kube-node-lease", lease)
            except ApiException as e:
                if e.status != 404:
                    raise
                self.coord.create_namespaced_lease("kube-node-lease", lease)
            stamp = now_iso()
            conds = [
                {"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": stamp,
                 "lastTransitionTime": self._transition(name, t, s, stamp)}
                for t, s, r, m in (
                    ("Ready", "True", "KubeletReady", "node agent is posting ready status"),
                    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                    ("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                    ("NetworkUnavailable", "False", "RouteCreated", "per-pod veth routes"),
                )
            ]
            status = {
                "status": {
                    "conditions": conds,
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                  {"type": "Hostname", "address": name}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"},
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"},
                    "nodeInfo": {
                        "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.35.4-nodeagent",
                        "kubeProxyVersion": "", "osImage": "localcluster node agent", "kernelVersion": os.uname().release,
                        "containerRuntimeVersion": "process://nodeagent", "bootID": "", "machineID": "", "systemUUID": "",
                    },
                }
            }
            self.core.patch_node_status(name, status)

    _transitions: dict[tuple[str, str, str], str] = {}

    def _transition(self, node: str, ctype: str, status: str, stamp: str) -> str:
        return self._transitions.setdefault((node, ctype, status), stamp)

    def node_loop(self) -> None:
        last_status = 0.0
        while not self.stopping.is_set():
            try:
                self.discover_nodes()
                if time.monotonic() - last_status > 0:
                    self.heartbeat()
                    last_status = time.monotonic()
            except Exception:
                log.exception("node heartbeat")
            self.stopping.wait(10)

    # -- services ---------------------------------------------------------------------------------

    def service_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.refresh_services()
            except Exception:
                log.exception("service refresh")
            self.stopping.wait(1)

    def refresh_services(self) -> None:
        svcs: dict[tuple[str, str], dict[str, Any]] = {}
        for s in self.core.list_service_for_all_namespaces().items:
            if not s.spec.cluster_ip or s.spec.cluster_ip == "None":
                continue
            forward = (s.metadata.annotations or {}).get(FORWARD_ANNOTATION, "")
            svcs[(s.metadata.namespace, s.metadata.name)] = {
                "ip": s.spec.cluster_ip,
                "forward": forward if forward.startswith("127.0.0.1:") else "",
                "ports": [{"name": p.name or "", "port": p.port, "targetPort": p.target_port,
                           "protocol": p.protocol or "TCP"} for p in s.spec.ports or []],
            }
        eps: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sl in self.discovery.list_endpoint_slice_for_all_namespaces().items:
            svc = (sl.metadata.labels or {}).get("kubernetes.io/service-name")
            if not svc:
                continue
            ports = {p.name or "": p.port for p in sl.ports or []}
            for e in sl.endpoints or []:
                ready = e.conditions is None or e.conditions.ready is not False
                for a in e.addresses:
                    eps.setdefault((sl.metadata.namespace, svc), []).append({"ip": a, "ports": ports, "ready": ready})
        with self.lock:
            changed = svcs != self.view.services
            self.view.endpoints = eps
            if changed:
                self.view.services = svcs
                self.view.version += 1
                workers = list(self.workers.values())
        if changed:
            self.sync_listeners(svcs)
            for w in workers:
                w.network_changed()

    def sync_listeners(self, services: dict[tuple[str, str], dict[str, Any]]) -> None:
        """One listener per Service ClusterIP:port in the services namespace."""
        wanted = {(s["ip"], int(p["port"])): (ns, name, p["name"], s["forward"])
                  for (ns, name), s in services.items() for p in s["ports"] if p["protocol"] == "TCP"}
        for key in [k for k in self.listeners if k not in wanted or self.listeners[k][0] != wanted[k]]:
            _, server = self.listeners.pop(key)
            self.loop.call_soon_threadsafe(server.close)
        for key, target in wanted.items():
            if key in self.listeners:
                continue
            try:
                sock = socket_in_netns(SERVICES_NETNS)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(key)
                sock.listen(128)
                sock.setblocking(False)
            except OSError as e:
                log.warning("listen %s:%d for %s/%s: %s", key[0], key[1], target[0], target[1], e)
                continue
            fut = asyncio.run_coroutine_threadsafe(self.serve(sock, target), self.loop)
            self.listeners[key] = (target, fut.result(10))

    async def serve(self, sock: socket.socket, target: tuple[str, str, str, str]) -> asyncio.AbstractServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ns, name, port_name, forward = target
            if (ns, name) == ("default", "kubernetes"):
                dest: tuple[str, int] | None = self.apiserver
            elif forward:
                host, port = forward.rsplit(":", 1)
                dest = (host, int(port))
            else:
                dest = self.pick_endpoint(ns, name, port_name)
            if dest is None:
                writer.close()
                return
            try:
                r2, w2 = await asyncio.wait_for(asyncio.open_connection(*dest), 5)
            except (OSError, asyncio.TimeoutError):
                writer.close()
                return
            await asyncio.gather(pump(reader, w2), pump(r2, writer))

        return await asyncio.start_server(handle, sock=sock)

    def pick_endpoint(self, ns: str, svc: str, port_name: str) -> tuple[str, int] | None:
        with self.lock:
            eps = [e for e in self.view.endpoints.get((ns, svc), []) if e["ready"] and port_name in e["ports"]]
        if not eps:
            return None
        e = eps[int(time.monotonic() * 1000) % len(eps)]
        return e["ip"], int(e["ports"][port_name])

    def hosts_file(self, pod_ns: str, pod_name: str, pod_ip: str, hostname: str) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{pod_ip}\t{hostname}"]
        with self.lock:
            svcs = dict(self.view.services)
        for (ns, name), s in sorted(svcs.items()):
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == pod_ns:
                names.append(name)
            lines.append(f"{s['ip']}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    # -- pods -------------------------------------------------------------------------------------

    def pod_loop(self) -> None:
        from kubernetes import watch

        while not self.stopping.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces()
                seen = set()
                for p in pods.items:
                    if p.spec.node_name in self.nodes:
                        seen.add(p.metadata.uid)
                        self.dispatch(self.api.sanitize_for_serialization(p))
                with self.lock:
                    gone = [w for uid, w in self.workers.items() if uid not in seen]
                for worker in gone:
                    worker.vanished()
                watcher = watch.Watch()
                for ev in watcher.stream(self.core.list_pod_for_all_namespaces, resource_version=pods.metadata.resource_version,
                                   timeout_seconds=60, _request_timeout=75):
                    if self.stopping.is_set():
                        watcher.stop()
                        break
                    obj = self.api.sanitize_for_serialization(ev["object"])
                    if obj.get("spec", {}).get("nodeName") not in self.nodes:
                        continue
                    if ev["type"] == "DELETED":
                        with self.lock:
                            known = self.workers.get(obj["metadata"]["uid"])
                        if known:
                            known.vanished()
                    else:
                        self.dispatch(obj)
            except Exception as e:
                if not self.stopping.is_set():
                    log.warning("pod watch: %s: %s", type(e).__name__, e)
                    self.stopping.wait(1)

    def dispatch(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        phase = pod.get("status", {}).get("phase")
        with self.lock:
            worker = self.workers.get(uid)
            if worker is None:
                if phase in ("Succeeded", "Failed"):
                    return  # finished before we saw it (the API server deletes terminal pods at once)
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    # -- kubelet-style log endpoint (kubectl logs) -------------------------------------------------

    kubelet_port = 0

    def start_log_server(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                m = re.match(r"^/containerLogs/([^/]+)/([^/]+)/([^/?]+)", self.path)
                if not m:
                    self.send_error(404)
                    return
                ns, name, container = m.groups()
                with agent.lock:
                    worker = next((w for w in agent.workers.values()
                                   if w.ns == ns and w.name == name), None)
                path = worker.log_path(container) if worker else None
                if path is None or not path.exists():
                    self.send_error(404, "no such container log")
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        cert, key = self.state / "kubelet.crt", self.state / "kubelet.key"
        if not cert.exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "3650", "-subj", "/CN=nodeagent", "-addext",
                            "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                           check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.kubelet_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="kubelet-http", daemon=True).start()

    # -- lifecycle --------------------------------------------------------------------------------

    def cleanup_stale(self) -> None:
        """Remove network namespaces and processes a previous agent left behind."""
        for ns in Path("/run/netns").glob(NETNS_PREFIX + "*") if Path("/run/netns").exists() else []:
            delete_pod_network(ns.name)
        delete_pod_network(SERVICES_NETNS)
        for pidfile in (self.state / "pods").glob("*/*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                cmd = Path(f"/proc/{pid}/environ").read_bytes()
                if f"NODEAGENT_POD_UID={pidfile.parent.name.rsplit('_', 1)[-1]}".encode() in cmd:
                    os.killpg(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.state / "pods", ignore_errors=True)
        cutoff = time.time() - 6 * 3600
        for d in (self.state / "logs").glob("*") if (self.state / "logs").exists() else []:
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)

    def run(self) -> None:
        (self.state / "pods").mkdir(parents=True, exist_ok=True)
        self.cleanup_stale()
        self.start_log_server()
        self.loop_thread.start()
        create_services_network()
        self.discover_nodes()
        self.heartbeat()
        self.refresh_services()
        threads = [
            threading.Thread(target=self.node_loop, name="nodes", daemon=True),
            threading.Thread(target=self.service_loop, name="services", daemon=True),
            threading.Thread(target=self.pod_loop, name="pods", daemon=True),
        ]
        for t in threads:
            t.start()
        log.info("node agent running (kubelet port %d)", self.kubelet_port)
        self.stopping.wait()
        log.info("stopping: terminating pods")
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown(grace=5)
        deadline = time.monotonic() + 15
        for w in workers:
            w.join(max(0.1, deadline - time.monotonic()))
        self.cleanup_stale()


# --------------------------------------------------------------------------------------------------
# One container


@dataclass
class Probe:
    spec: dict[str, Any]
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


@dataclass
class Container:
    spec: dict[str, Any]
    init: bool
    kind: ImageKind | None
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    started_at: float = 0.0
    backoff: float = 0.0
    restart_at: float = 0.0
    kill_reason: str = ""
    termination_log: Path | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class PodFailed(Exception):
    """The pod cannot run (bad spec, unsupported volume): reported and left Failed/Pending."""


class PodWorker(threading.Thread):
    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        super().__init__(name=f"pod-{pod['metadata']['namespace']}/{pod['metadata']['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.ns: str = pod["metadata"]["namespace"]
        self.name: str = pod["metadata"]["name"]
        self.cond = threading.Condition()
        self.deleting = False
        self.gone = False
        self.stop_grace: float | None = None
        self.net_version = -1
        self.real = any(image_kind(c.get("image", "")) for c in pod["spec"].get("containers", []))
        self.dir = agent.state / "pods" / f"{self.ns}_{self.name}_{self.uid}"
        self.pod_ip = ""
        self.netns = ""
        self.start_time = now_iso()
        self.conditions: dict[str, str] = {}
        self.transitions: dict[str, str] = {}
        self.last_status: dict[str, Any] | None = None
        self.volume_dirs: dict[str, Path] = {}
        self.token_expiry: dict[str, float] = {}
        self.next_volume_sync = 0.0
        self.message = ""
        self.containers: list[Container] = []
        if pod["metadata"].get("deletionTimestamp"):  # already being deleted when we first see it
            self.update(pod)

    # -- events from the agent --------------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        with self.cond:
            self.pod = pod
            if pod["metadata"].get("deletionTimestamp") and not self.deleting:
                self.deleting = True
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                self.stop_grace = float(grace if grace is not None else 30)
            self.cond.notify_all()

    def vanished(self) -> None:
        with self.cond:
            self.gone = True
            self.deleting = True
            if self.stop_grace is None:
                self.stop_grace = 0.0
            self.cond.notify_all()

    def shutdown(self, grace: float) -> None:
        with self.cond:
            self.gone = True  # the agent is stopping: stop processes, leave the pod object alone
            self.deleting = True
            self.stop_grace = grace
            self.cond.notify_all()

    def network_changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def log_path(self, container: str) -> Path:
        """Container output; kept after the pod is gone (pruned when the agent starts)."""
        return self.agent.state / "logs" / f"{self.ns}_{self.name}_{self.uid}" / f"{container}.log"

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.deleting:  # nothing to start: only confirm the deletion
                self.finish_delete()
            elif self.real:
                self.run_real()
            else:
                self.run_simulated()
        except Exception:
            log.exception("pod %s/%s", self.ns, self.name)
        finally:
            self.teardown()
            self.agent.forget(self.uid)

    def wait(self, seconds: float) -> None:
        with self.cond:
            if not self.deleting:
                self.cond.wait(seconds)

    def run_simulated(self) -> None:
        """kwok's default stages: Running and Ready at once; Job pods then Succeeded."""
        self.pod_ip = self.agent.ipam.claim(self.pod.get("status", {}).get("podIP"))
        containers = self.pod["spec"].get("containers", [])
        job = any(o.get("kind") == "Job" for o in self.pod["metadata"].get("ownerReferences") or [])
        stamp = now_iso()
        statuses = [{
            "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
            "restartCount": 0, "state": {"running": {"startedAt": stamp}},
            "containerID": f"simulated://{self.uid[:8]}-{c['name']}",
        } for c in containers]
        self.conditions = {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "True",
                           "Ready": "True", "PodScheduled": "True"}
        self.patch_status("Running", statuses, [])
        if job:
            term = [{**s, "ready": False, "started": False,
                     "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": stamp,
                                              "finishedAt": now_iso()}}} for s in statuses]
            self.conditions.update({"ContainersReady": "False", "Ready": "False"})
            self.patch_status("Succeeded", term, [])
        while not self.deleting:
            self.wait(30)
        self.finish_delete()

    def run_real(self) -> None:
        spec = self.pod["spec"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.containers = [Container(c, True, image_kind(c.get("image", ""))) for c in spec.get("initContainers") or []]
        self.containers += [Container(c, False, image_kind(c.get("image", ""))) for c in spec.get("containers", [])]
        for c in self.containers:
            for kind in ("readiness", "liveness", "startup"):
                p = c.spec.get(f"{kind}Probe")
                if p and not c.init:
                    setattr(c, kind, Probe(p))
        self.conditions = {"PodScheduled": "True", "PodReadyToStartContainers": "False", "Initialized": "False",
                           "ContainersReady": "False", "Ready": "False"}
        self.pod_ip = self.agent.ipam.claim(self.pod.get("status", {}).get("podIP"))
        self.netns, _ = create_pod_network(self.uid, self.pod_ip)
        self.conditions["PodReadyToStartContainers"] = "True"
        self.sync_network()
        self.report()
        # Volumes wait for their sources (a Secret created by a hook Job, say), like kubelet does.
        while not self.deleting:
            try:
                self.prepare_volumes()
                break
            except PodFailed as e:
                self.message = str(e)
                self.report()
                self.wait(2)
        self.message = ""
        restart = spec.get("restartPolicy", "Always")
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        phase_done = False
        while not self.deleting:
            now = time.monotonic()
            self.sync_network()
            self.sync_volumes()
            # Init containers: one after the other, each to a successful exit.
            pending_init = next((c for c in inits if "terminated" not in c.state
                                 or c.state["terminated"]["exitCode"] != 0), None)
            if pending_init is not None:
                self.drive(pending_init, now, "Never" if restart == "Never" else "OnFailure", init=True)
                if restart == "Never" and "terminated" in pending_init.state \
                        and pending_init.state["terminated"]["exitCode"] != 0:
                    self.report(final="Failed")
                    phase_done = True
            else:
                self.conditions["Initialized"] = "True"
                for c in mains:
                    self.drive(c, now, restart, init=False)
                if restart != "Always" and all("terminated" in c.state and c.proc is None and c.restart_at == 0
                                               for c in mains):
                    ok = all(c.state["terminated"]["exitCode"] == 0 for c in mains)
                    if ok or restart == "Never":
                        self.report(final="Succeeded" if ok else "Failed")
                        phase_done = True
            if phase_done:
                break
            self.report()
            self.wait(0.5)
        if phase_done:
            while not self.deleting:
                self.wait(30)
        self.stop_all(self.stop_grace if self.stop_grace is not None else 30)
        if not phase_done and not self.gone:
            self.report()
        self.finish_delete()

    # -- containers -------------------------------------------------------------------------------

    def drive(self, c: Container, now: float, restart: str, init: bool) -> None:
        if c.proc is not None:
            rc = c.proc.poll()
            if rc is None:
                self.probe(c, now)
                if c.kill_reason:
                    self.kill(c, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                    rc = c.proc.poll() if c.proc else None
            if c.proc is not None and rc is not None:
                self.exited(c, rc)
                again = restart == "Always" or (restart == "OnFailure" and rc != 0)
                if again:
                    c.backoff = BACKOFF_START if c.backoff == 0 else min(c.backoff * 2, BACKOFF_MAX)
                    if time.monotonic() - c.started_at > 600:
                        c.backoff = BACKOFF_START
                    c.restart_at = now + c.backoff
                else:
                    c.restart_at = 0
            return
        if "terminated" in c.state and c.restart_at == 0:
            return
        if c.restart_at and now < c.restart_at:
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {c.backoff:.0f}s restarting failed container={c.name} "
                                              f"pod={self.name}_{self.ns}({self.uid})"}}
            return
        if c.restart_at:
            c.restart_count += 1
            c.restart_at = 0
        try:
            self.launch(c)
        except PodFailed as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}

    def exited(self, c: Container, rc: int) -> None:
        reason = c.kill_reason or ("Completed" if rc == 0 else "Error")
        if rc < 0:
            rc = 128 - rc
        term: dict[str, Any] = {"terminated": {
            "exitCode": rc, "reason": reason, "startedAt": c.state.get("running", {}).get("startedAt", now_iso()),
            "finishedAt": now_iso(), "containerID": self.container_id(c)}}
        message = self.termination_message(c, rc)
        if message:
            term["terminated"]["message"] = message
        c.state = term
        c.last_state = term
        c.proc = None
        c.ready = False
        c.started = False
        c.kill_reason = ""
        for p in (c.readiness, c.liveness, c.startup):
            if p:
                p.successes = p.failures = 0
        log.info("%s/%s %s exited %d (%s)", self.ns, self.name, c.name, rc, reason)

    def termination_message(self, c: Container, rc: int) -> str:
        """kubelet's rules: the termination-log file (4 KiB), or the log tail when asked and empty."""
        text = ""
        if c.termination_log is not None and c.termination_log.exists():
            text = c.termination_log.read_bytes()[:4096].decode(errors="replace")
        if not text and rc != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            path = self.log_path(c.name)
            if path.exists():
                lines = path.read_bytes()[-2048:].decode(errors="replace").splitlines()[-80:]
                text = "\n".join(lines)
        return text

    def container_id(self, c: Container) -> str:
        return f"process://{self.uid[:8]}-{c.name}-{c.restart_count}"

    def launch(self, c: Container) -> None:
        env = self.container_env(c)
        argv = self.container_argv(c, env)
        mounts = self.container_mounts(c)
        sc = {**(self.pod["spec"].get("securityContext") or {}), **(c.spec.get("securityContext") or {})}
        run_dir = self.dir / f"{c.name}-{c.restart_count}"
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "netns": f"/run/netns/{self.netns}",
            "root": str(run_dir / "root"),
            "scratch": str(run_dir / "scratch"),
            "mounts": mounts,
            "hostname": (self.pod["spec"].get("hostname") or self.name)[:63],
            "workingDir": c.spec.get("workingDir") or (c.kind.workdir if c.kind else "/"),
            "argv": argv,
            "env": env,
            "runAsUser": sc.get("runAsUser", c.kind.user[0] if c.kind and c.kind.user else None),
            "runAsGroup": sc.get("runAsGroup", c.kind.user[1] if c.kind and c.kind.user else None),
            "supplementalGroups": [g for g in [(self.pod["spec"].get("securityContext") or {}).get("fsGroup")]
                                   + list((self.pod["spec"].get("securityContext") or {}).get("supplementalGroups") or [])
                                   if g is not None],
            "readOnlyRoot": bool(sc.get("readOnlyRootFilesystem")),
            "noNewPrivs": sc.get("allowPrivilegeEscalation") is False,
            "traverse": traverse_dirs(),
            "hostTrees": [str(ROOT), sys.base_prefix],
        }
        term_log = run_dir / "termination-log"
        term_log.write_bytes(b"")
        term_log.chmod(0o666)
        c.termination_log = term_log
        mounts.append({"source": str(term_log),
                       "target": c.spec.get("terminationMessagePath") or "/dev/termination-log"})
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path(c.name).parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path(c.name), "ab")
        proc = subprocess.Popen(
            [sys.executable, str(SANDBOX), str(spec_path)], stdin=subprocess.DEVNULL, stdout=logf,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={"NODEAGENT_POD_UID": self.uid, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        logf.close()
        (self.dir / f"{c.name}.pid").write_text(f"{proc.pid}\n")
        c.proc = proc
        c.started_at = time.monotonic()
        c.state = {"running": {"startedAt": now_iso()}}
        c.ready = False
        c.started = c.startup is None
        for p in (c.readiness, c.liveness, c.startup):
            if p:
                p.next_at = c.started_at + float(p.spec.get("initialDelaySeconds", 0))
        log.info("%s/%s started %s (pid %d): %s", self.ns, self.name, c.name, proc.pid, " ".join(argv))

    def kill(self, c: Container, grace: float) -> None:
        proc = c.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is None:
            log.info("%s/%s %s: SIGKILL after %.0fs grace", self.ns, self.name, c.name, grace)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the container's whole process group
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def stop_all(self, grace: float) -> None:
        running = [c for c in self.containers if c.proc is not None]
        threads = [threading.Thread(target=self.kill, args=(c, grace)) for c in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in running:
            if c.proc is not None:
                self.exited(c, c.proc.returncode if c.proc.returncode is not None else 137)

    # -- probes -----------------------------------------------------------------------------------

    def probe(self, c: Container, now: float) -> None:
        if c.startup and not c.started:
            r = self.run_probe(c, c.startup, now)
            if r is True:
                c.started = True
            elif r is False and c.startup.failures >= int(c.startup.spec.get("failureThreshold", 3)):
                c.kill_reason = "StartupProbeFailed"
            return
        if c.liveness:
            r = self.run_probe(c, c.liveness, now)
            if r is False and c.liveness.failures >= int(c.liveness.spec.get("failureThreshold", 3)):
                log.info("%s/%s %s: liveness probe failed %d times: restarting", self.ns, self.name, c.name,
                         c.liveness.failures)
                self.event("Warning", "Unhealthy", f"Liveness probe failed; container {c.name} will be restarted")
                c.kill_reason = "LivenessProbeFailed"
                return
        if c.readiness:
            r = self.run_probe(c, c.readiness, now)
            if r is True and c.readiness.successes >= int(c.readiness.spec.get("successThreshold", 1)):
                c.ready = True
            elif r is False and c.readiness.failures >= int(c.readiness.spec.get("failureThreshold", 3)):
                c.ready = False
        else:
            c.ready = c.started

    def run_probe(self, c: Container, p: Probe, now: float) -> bool | None:
        if now < p.next_at:
            return None
        p.next_at = now + float(p.spec.get("periodSeconds", 10))
        ok = self.check(c, p.spec)
        if ok:
            p.successes += 1
            p.failures = 0
        else:
            p.failures += 1
            p.successes = 0
        return ok

    def resolve_port(self, c: Container, port: Any) -> int:
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for cp in c.spec.get("ports") or []:
            if cp.get("name") == port:
                return int(cp["containerPort"])
        raise PodFailed(f"container {c.name}: no port named {port}")

    def check(self, c: Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                h = spec["httpGet"]
                port = self.resolve_port(c, h["port"])
                host = h.get("host") or self.pod_ip
                conn: http.client.HTTPConnection
                if h.get("scheme", "HTTP").upper() == "HTTPS":
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
                headers.setdefault("User-Agent", "kube-probe/1.35")
                conn.request("GET", h.get("path", "/"), headers=headers)
                status = conn.getresponse().status
                conn.close()
                return 200 <= status < 400
            if "tcpSocket" in spec:
                port = self.resolve_port(c, spec["tcpSocket"]["port"])
                with socket.create_connection((spec["tcpSocket"].get("host") or self.pod_ip, port), timeout=timeout):
                    return True
            if "exec" in spec:
                if c.proc is None:
                    return False
                r = subprocess.run(["nsenter", "-t", str(c.proc.pid), "-m", "-n", "-r", "-w", "-S", "follow",
                                    "-G", "follow", "--", *spec["exec"]["command"]],
                                   capture_output=True, timeout=timeout)
                return r.returncode == 0
            if "grpc" in spec:
                port = int(spec["grpc"]["port"])
                with socket.create_connection((self.pod_ip, port), timeout=timeout):
                    return True
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired, PodFailed):
            return False
        return False

    # -- env, argv, volumes ------------------------------------------------------------------------

    def field_ref(self, path: str) -> str:
        md = self.pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": md["name"], "metadata.namespace": md["namespace"], "metadata.uid": md["uid"],
            "spec.nodeName": self.pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
            "status.podIP": self.pod_ip, "status.podIPs": self.pod_ip,
        }
        if path in simple:
            return str(simple[path])
        if path in ("metadata.labels", "metadata.annotations"):
            items = md.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise PodFailed(f"unsupported fieldRef {path}")

    def resource_ref(self, c_name: str, ref: dict[str, Any]) -> str:
        c = next(x for x in self.pod["spec"]["containers"] + (self.pod["spec"].get("initContainers") or [])
                 if x["name"] == (ref.get("containerName") or c_name))
        kind, res = ref["resource"].split(".", 1)
        value = (c.get("resources", {}).get(kind) or {}).get(res)
        if value is None:
            value = "16" if res == "cpu" else "64Gi" if res == "memory" else "0"
        divisor = quantity(ref.get("divisor", "1") or "1")
        import math
        return str(math.ceil(quantity(value) / divisor))

    def get_configmap(self, name: str, optional: bool) -> dict[str, str] | None:
        from kubernetes.client.rest import ApiException

        try:
            cm = self.agent.core.read_namespaced_config_map(name, self.ns)
        except ApiException as e:
            if e.status == 404:
                if optional:
                    return None
                raise PodFailed(f'configmap "{name}" not found') from e
            raise
        data = dict(cm.data or {})
        for k, v in (cm.binary_data or {}).items():
            data[k] = base64.b64decode(v).decode("latin-1")
        return data

    def get_secret(self, name: str, optional: bool) -> dict[str, bytes] | None:
        from kubernetes.client.rest import ApiException

        try:
            s = self.agent.core.read_namespaced_secret(name, self.ns)
        except ApiException as e:
            if e.status == 404:
                if optional:
                    return None
                raise PodFailed(f'secret "{name}" not found') from e
            raise
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def container_env(self, c: Container) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            **(c.kind.env if c.kind else {}),
            "HOSTNAME": self.pod["spec"].get("hostname") or self.name,
            "KUBERNETES_SERVICE_HOST": self.kubernetes_ip(),
            "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443",
            "KUBERNETES_PORT": f"tcp://{self.kubernetes_ip()}:443",
            "NODEAGENT_POD_UID": self.uid,
        }
        if self.pod["spec"].get("enableServiceLinks", True):
            with self.agent.lock:
                svcs = {k: v for k, v in self.agent.view.services.items() if k[0] == self.ns}
            for (_, name), s in svcs.items():
                key = re.sub(r"[^A-Z0-9]", "_", name.upper())
                if s["ports"]:
                    env[f"{key}_SERVICE_HOST"] = s["ip"]
                    env[f"{key}_SERVICE_PORT"] = str(s["ports"][0]["port"])
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self.get_configmap(ref["name"], bool(ref.get("optional")))
                env.update({prefix + k: v for k, v in (data or {}).items()})
            if "secretRef" in src:
                ref = src["secretRef"]
                sdata = self.get_secret(ref["name"], bool(ref.get("optional")))
                env.update({prefix + k: v.decode() for k, v in (sdata or {}).items()})
        for e in c.spec.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = self.field_ref(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[e["name"]] = self.resource_ref(c.name, vf["resourceFieldRef"])
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                data = self.get_configmap(ref["name"], bool(ref.get("optional")))
                if data is not None and ref["key"] in data:
                    env[e["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise PodFailed(f'couldn\'t find key {ref["key"]} in ConfigMap {self.ns}/{ref["name"]}')
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                sdata = self.get_secret(ref["name"], bool(ref.get("optional")))
                if sdata is not None and ref["key"] in sdata:
                    env[e["name"]] = sdata[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise PodFailed(f'couldn\'t find key {ref["key"]} in Secret {self.ns}/{ref["name"]}')
        return env

    def kubernetes_ip(self) -> str:
        with self.agent.lock:
            s = self.agent.view.services.get(("default", "kubernetes"))
        return str(s["ip"]) if s else "198.19.0.1"

    def container_argv(self, c: Container, env: dict[str, str]) -> list[str]:
        kind = c.kind
        command = c.spec.get("command")
        args = c.spec.get("args")
        if command is None:
            if kind is None:
                raise PodFailed(f"container {c.name}: no command and unknown image")
            command = kind.entrypoint
            if args is None:
                args = kind.cmd
        argv = [expand(x, env) for x in list(command) + list(args or [])]
        return argv

    def container_mounts(self, c: Container) -> list[dict[str, Any]]:
        mounts: list[dict[str, Any]] = []
        if c.kind:
            for target, source in c.kind.files.items():
                mounts.append({"source": str(source), "target": target, "readOnly": True})
        for f in ("hosts", "resolv.conf", "hostname"):
            mounts.append({"source": str(self.dir / "etc" / f), "target": f"/etc/{f}", "readOnly": True})
        for vm in c.spec.get("volumeMounts") or []:
            src = self.volume_dirs.get(vm["name"])
            if src is None:
                raise PodFailed(f"container {c.name}: volume {vm['name']} not prepared")
            if vm.get("subPath"):
                src = src / vm["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            mounts.append({"source": str(src), "target": vm["mountPath"], "readOnly": bool(vm.get("readOnly"))})
        return mounts

    def sync_network(self) -> None:
        """/etc/hosts for Service names and ClusterIP listeners inside the pod's namespace."""
        if not self.netns:
            return
        with self.agent.lock:
            version = self.agent.view.version
        if version == self.net_version:
            return
        self.net_version = version
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        hostname = self.pod["spec"].get("hostname") or self.name
        write_in_place(etc / "hosts", self.agent.hosts_file(self.ns, self.name, self.pod_ip, hostname))
        write_in_place(etc / "resolv.conf",
                       f"search {self.ns}.svc.cluster.local svc.cluster.local cluster.local\n"
                       "nameserver 127.0.0.53\noptions ndots:5 attempts:1 timeout:1\n")
        write_in_place(etc / "hostname", hostname + "\n")

    def prepare_volumes(self) -> None:
        vdir = self.dir / "volumes"
        vdir.mkdir(parents=True, exist_ok=True)
        fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        for v in self.pod["spec"].get("volumes") or []:
            name = v["name"]
            path = vdir / name
            if "persistentVolumeClaim" in v:
                self.volume_dirs[name] = self.pvc_path(v["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in v:
                # Each node has its own "host" filesystem under the agent's state, never this machine's.
                node = self.pod["spec"].get("nodeName", "node")
                hp = self.agent.state / "hostpath" / node / v["hostPath"]["path"].lstrip("/")
                kind = v["hostPath"].get("type") or ""
                if kind in ("", "DirectoryOrCreate"):
                    hp.mkdir(parents=True, exist_ok=True)
                elif kind == "FileOrCreate" and not hp.exists():
                    hp.parent.mkdir(parents=True, exist_ok=True)
                    hp.touch()
                if not hp.exists():
                    raise PodFailed(f"hostPath {v['hostPath']['path']} ({kind}) does not exist on {node}")
                self.volume_dirs[name] = hp
                continue
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in v:
                path.chmod(0o777)
            elif "configMap" in v or "secret" in v or "projected" in v or "downwardAPI" in v:
                self.write_projection(v, path, fs_group)
            else:
                raise PodFailed(f"volume {name}: unsupported type {sorted(k for k in v if k != 'name')}")
            self.volume_dirs[name] = path
        self.next_volume_sync = time.monotonic() + 20

    def sync_volumes(self) -> None:
        """Propagate ConfigMap/Secret changes and refresh tokens (kubelet's periodic sync)."""
        now = time.monotonic()
        due_token = any(now > t for t in self.token_expiry.values())
        if now < self.next_volume_sync and not due_token:
            return
        self.next_volume_sync = now + 20
        fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        for v in self.pod["spec"].get("volumes") or []:
            if any(k in v for k in ("configMap", "secret", "projected", "downwardAPI")):
                try:
                    self.write_projection(v, self.volume_dirs[v["name"]], fs_group)
                except (PodFailed, KeyError) as e:
                    log.warning("%s/%s: volume %s: %s", self.ns, self.name, v["name"], e)

    def write_projection(self, v: dict[str, Any], path: Path, fs_group: int | None) -> None:
        files: dict[str, tuple[bytes, int]] = {}
        default_mode = 0o644

        def add_items(data: dict[str, bytes], items: list[dict[str, Any]] | None, mode: int) -> None:
            if items:
                for it in items:
                    if it["key"] in data:
                        files[it["path"]] = (data[it["key"]], int(it.get("mode", mode)))
            else:
                for k, val in data.items():
                    files[k] = (val, mode)

        def cm_source(src: dict[str, Any], mode: int) -> None:
            data = self.get_configmap(src["name"], bool(src.get("optional")))
            if data is not None:
                add_items({k: val.encode("latin-1") if False else val.encode() for k, val in data.items()},
                          src.get("items"), mode)

        def secret_source(name: str, src: dict[str, Any], mode: int) -> None:
            data = self.get_secret(name, bool(src.get("optional")))
            if data is not None:
                add_items(data, src.get("items"), mode)

        def downward(items: list[dict[str, Any]], mode: int) -> None:
            for it in items:
                if "fieldRef" in it:
                    val = self.field_ref(it["fieldRef"]["fieldPath"])
                else:
                    val = self.resource_ref(self.pod["spec"]["containers"][0]["name"], it["resourceFieldRef"])
                files[it["path"]] = (val.encode(), int(it.get("mode", mode)))

        if "configMap" in v:
            mode = int(v["configMap"].get("defaultMode", default_mode))
            cm_source(v["configMap"], mode)
        elif "secret" in v:
            mode = int(v["secret"].get("defaultMode", default_mode))
            secret_source(v["secret"]["secretName"], v["secret"], mode)
        elif "downwardAPI" in v:
            downward(v["downwardAPI"].get("items") or [], int(v["downwardAPI"].get("defaultMode", default_mode)))
        elif "projected" in v:
            mode = int(v["projected"].get("defaultMode", default_mode))
            for src in v["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    token, expiry = self.request_token(t.get("audience"), int(t.get("expirationSeconds", 3607)))
                    files[t["path"]] = (token.encode(), 0o600 if fs_group is None else 0o640)
                    self.token_expiry[v["name"] + "/" + t["path"]] = expiry
                elif "configMap" in src:
                    cm_source(src["configMap"], mode)
                elif "secret" in src:
                    secret_source(src["secret"]["name"], src["secret"], mode)
                elif "downwardAPI" in src:
                    downward(src["downwardAPI"].get("items") or [], mode)
                else:
                    raise PodFailed(f"projected source {sorted(src)} unsupported")
        for rel, (data, mode) in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.read_bytes() == data:
                continue
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            owner = (self.pod["spec"].get("securityContext") or {}).get("runAsUser")
            os.chown(tmp, int(owner) if owner is not None and fs_group is None else 0,
                     int(fs_group) if fs_group is not None else 0)
            tmp.chmod(mode & 0o777)
            tmp.replace(target)
        for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)

    def request_token(self, audience: str | None, seconds: int) -> tuple[str, float]:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience] if audience else None, "expirationSeconds": seconds,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}},
        }
        tr = self.agent.core.create_namespaced_service_account_token(sa, self.ns, body)
        lifetime: float = seconds
        if tr.status.expiration_timestamp is not None:
            lifetime = max(60, (tr.status.expiration_timestamp - dt.datetime.now(dt.timezone.utc)).total_seconds())
        return tr.status.token, time.monotonic() + 0.8 * lifetime

    def pvc_path(self, claim: str) -> Path:
        from kubernetes.client.rest import ApiException

        try:
            pvc = self.agent.core.read_namespaced_persistent_volume_claim(claim, self.ns)
        except ApiException as e:
            raise PodFailed(f'persistentvolumeclaim "{claim}" not found') from e
        if not pvc.spec.volume_name or pvc.status.phase != "Bound":
            raise PodFailed(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.agent.core.read_persistent_volume(pvc.spec.volume_name)
        src = pv.spec.host_path.path if pv.spec.host_path else pv.spec.local.path if pv.spec.local else None
        if not src:
            raise PodFailed(f"volume {pv.metadata.name} has no hostPath/local path")
        return Path(src)

    # -- status -----------------------------------------------------------------------------------

    def container_status(self, c: Container) -> dict[str, Any]:
        st = {
            "name": c.name, "image": c.spec.get("image", ""), "imageID": c.spec.get("image", ""),
            "containerID": self.container_id(c), "restartCount": c.restart_count, "ready": c.ready,
            "started": c.started if c.proc else False, "state": c.state,
        }
        if c.last_state and "terminated" not in c.state:
            st["lastState"] = c.last_state
        return st

    def report(self, final: str | None = None) -> None:
        mains = [c for c in self.containers if not c.init]
        inits = [c for c in self.containers if c.init]
        ready = all(c.ready for c in mains) and not final
        self.conditions["ContainersReady"] = "True" if ready else "False"
        self.conditions["Ready"] = "True" if ready else "False"
        if final:
            phase = final
        elif any("running" in c.state for c in mains) or any(c.restart_count for c in mains) \
                or (self.conditions["Initialized"] == "True" and any("terminated" in c.state for c in mains)):
            phase = "Running"
        else:
            phase = "Pending"
        self.patch_status(phase, [self.container_status(c) for c in mains],
                          [self.container_status(c) for c in inits])

    def patch_status(self, phase: str, statuses: list[dict[str, Any]], init_statuses: list[dict[str, Any]]) -> None:
        from kubernetes.client.rest import ApiException

        stamp = now_iso()
        conds = []
        for t, s in self.conditions.items():
            key = f"{t}={s}"
            if self.transitions.get(t, "").split("@")[0] != key:
                self.transitions[t] = f"{key}@{stamp}"
            conds.append({"type": t, "status": s, "lastProbeTime": None,
                          "lastTransitionTime": self.transitions[t].split("@", 1)[1]})
        status: dict[str, Any] = {
            "phase": phase, "conditions": conds, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip or None, "podIPs": [{"ip": self.pod_ip}] if self.pod_ip else None,
            "startTime": self.start_time, "containerStatuses": statuses, "qosClass": qos(self.pod),
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if self.message:
            status["message"] = self.message
        if status == self.last_status:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.ns, {"status": status})
            self.last_status = status
        except ApiException as e:
            if e.status == 404:
                self.vanished()
            elif e.status != 409:
                log.warning("%s/%s: status patch: %s %s %s", self.ns, self.name, e.status, e.reason, e.body)

    def event(self, etype: str, reason: str, message: str) -> None:
        try:
            self.agent.core.create_namespaced_event(self.ns, {
                "metadata": {"generateName": f"{self.name}."},
                "involvedObject": {"kind": "Pod", "namespace": self.ns, "name": self.name, "uid": self.uid,
                                   "apiVersion": "v1"},
                "reason": reason, "message": message, "type": etype,
                "source": {"component": "kubelet", "host": self.pod["spec"].get("nodeName", "")},
                "firstTimestamp": now_iso(), "lastTimestamp": now_iso(), "count": 1,
            })
        except Exception:  # noqa: BLE001 - events are best effort
            pass

    # -- deletion ---------------------------------------------------------------------------------

    def finish_delete(self) -> None:
        """Like kubelet: once everything stopped, remove the pod object for good."""
        from kubernetes.client.rest import ApiException

        if self.gone:
            return
        try:
            self.agent.core.delete_namespaced_pod(
                self.name, self.ns, grace_period_seconds=0,
                body={"preconditions": {"uid": self.uid}, "gracePeriodSeconds": 0},
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("%s/%s: final delete: %s", self.ns, self.name, e.reason)

    def teardown(self) -> None:
        if self.containers:
            self.stop_all(0)
        if self.netns:
            delete_pod_network(self.netns)
        if self.pod_ip:
            self.agent.ipam.release(self.pod_ip)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# helpers


def expand(value: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion: $$ escapes, unknown references stay as they are."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, value)


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode, so bind mounts of it see the new content."""
    data = text.encode()
    if path.exists():
        if path.read_bytes() == data:
            return
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
    else:
        path.write_bytes(data)


def traverse_dirs() -> list[str]:
    """Directories on the way to this machine's Python and the repo that a non-root user cannot enter."""
    out: list[str] = []
    for target in (Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent, ROOT):
        for d in [target, *target.parents]:
            if str(d) != "/" and d.is_dir() and not (d.stat().st_mode & 0o001) and str(d) not in out:
                out.append(str(d))
    return out


def qos(pod: dict[str, Any]) -> str:
    cs = pod["spec"].get("containers", [])
    res = [c.get("resources") or {} for c in cs]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    if all((r.get("limits") or {}).get("cpu") and (r.get("limits") or {}).get("memory")
           and (r.get("requests") or r.get("limits")) == r.get("limits") for r in res):
        return "Guaranteed"
    return "Burstable"


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass
        writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--state", required=True, type=Path)
    ap.add_argument("--apiserver", default="127.0.0.1:26443", help="host:port the kubernetes Service forwards to")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    host, port = args.apiserver.rsplit(":", 1)
    agent = Agent(args.kubeconfig, args.state.resolve(), (host, int(port)))

    def on_term(*_: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
