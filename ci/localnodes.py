"""Real nodes of the local cluster: per node a kubelet, a containerd (Debian's, with runc) and a
kube-proxy, all in the node's own network namespace, like a kind node without a bridge.

Addresses (all inside the 198.18.0.0/15 that `up` blackholes, so nothing leaves the machine):

* a router namespace ``crnet`` (IP forwarding on there only, never on the host) joined by one veth to
  the host (``crn-host`` 198.18.126.1 <-> 198.18.126.2) and by one veth to each node
  (node i's ``eth0`` is 198.18.126.(10+i), its default route the router);
* node i's pods get 198.18.(112+i).0/24 from the CNI plugins of Debian's containernetworking-plugins
  (ptp + host-local: one veth per pod, no bridge); the host routes 198.18.112.0/21 and the node
  addresses to the router, so the API server reaches kubelets (logs, exec, port-forward), webhooks
  and probes; pods on different nodes reach each other through the router;
* NODE_LOCAL (198.18.126.254) on every node's loopback: the API server, cluster DNS and the
  harness's registries, served by ci/nodenet.py.

Each node has its own state (``nodes/<name>/``: containerd root, kubelet root, CNI config and IPAM),
containerd socket and state under ``/run/localcluster/<name>``, and cgroup root ``/localcluster-<name>``.
Processes enter only the node's network namespace (``nsenter --net``): kubelet and containerd share
the host's mount namespace, as they must for volumes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROUTER_NS = "crnet"
HOST_LINK = "crn-host"
HOST_ADDR = "198.18.126.1"
ROUTER_ADDR = "198.18.126.2"
NODE_NET = "198.18.126.0/24"
POD_NETS = "198.18.112.0/21"
NODE_LOCAL = "198.18.126.254"
RUN = Path("/run/localcluster")
CNI_BIN = "/usr/lib/cni"
SANDBOX_IMAGE = "127.0.0.1:25000/localcluster/pause:3.10"


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    labels: dict[str, str]
    taints: tuple[str, ...] = ()  # "key=value:Effect"

    @property
    def netns(self) -> str:
        return f"crnode-{self.name}"

    @property
    def addr(self) -> str:
        return f"198.18.126.{10 + self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"198.18.{112 + self.index}.0/24"

    @property
    def router_link(self) -> str:
        return f"crn-n{self.index}"

    @property
    def sock(self) -> Path:
        return RUN / self.name / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"/localcluster-{self.name}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "sysctl", "-qw", f"{key}={value}"], check=True)


def ensure_router() -> None:
    if not netns_exists(ROUTER_NS):
        ip("netns", "add", ROUTER_NS)
    ip("-n", ROUTER_NS, "link", "set", "lo", "up")
    sysctl(ROUTER_NS, "net.ipv4.ip_forward", "1")
    if ip("link", "show", HOST_LINK, check=False).returncode != 0:
        ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", "host0", "netns", ROUTER_NS)
    ip("addr", "replace", f"{HOST_ADDR}/32", "dev", HOST_LINK)
    ip("link", "set", HOST_LINK, "up")
    ip("-n", ROUTER_NS, "addr", "replace", f"{ROUTER_ADDR}/32", "dev", "host0")
    ip("-n", ROUTER_NS, "link", "set", "host0", "up")
    ip("-n", ROUTER_NS, "route", "replace", f"{HOST_ADDR}/32", "dev", "host0")
    ip("route", "replace", f"{ROUTER_ADDR}/32", "dev", HOST_LINK)
    for net in (NODE_NET, POD_NETS):
        ip("route", "replace", net, "via", ROUTER_ADDR, "dev", HOST_LINK)


def ensure_node_net(node: Node) -> None:
    """The node's namespace, its link to the router, its routes and its node-local address."""
    ensure_router()
    ns = node.netns
    if not netns_exists(ns):
        ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "addr", "replace", f"{NODE_LOCAL}/32", "dev", "lo")
    if ip("-n", ROUTER_NS, "link", "show", node.router_link, check=False).returncode != 0:
        ip("-n", ROUTER_NS, "link", "add", node.router_link, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("-n", ROUTER_NS, "addr", "replace", f"{ROUTER_ADDR}/32", "dev", node.router_link)
    ip("-n", ROUTER_NS, "link", "set", node.router_link, "up")
    ip("-n", ROUTER_NS, "route", "replace", f"{node.addr}/32", "dev", node.router_link)
    ip("-n", ROUTER_NS, "route", "replace", node.pod_cidr, "via", node.addr, "dev", node.router_link)
    ip("-n", ns, "addr", "replace", f"{node.addr}/32", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "route", "replace", f"{ROUTER_ADDR}/32", "dev", "eth0")
    ip("-n", ns, "route", "replace", "default", "via", ROUTER_ADDR, "dev", "eth0")
    sysctl(ns, "net.ipv4.ip_forward", "1")


def remove_net(nodes: list[Node]) -> None:
    for node in nodes:
        if netns_exists(node.netns):
            ip("netns", "del", node.netns, check=False)
    if netns_exists(ROUTER_NS):
        ip("netns", "del", ROUTER_NS, check=False)  # takes every veth with it
    for net in (NODE_NET, POD_NETS):
        ip("route", "del", net, check=False)


# --------------------------------------------------------------------------------------------------
# Configuration files


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def containerd_config(node: Node, state: Path, mirror: str = "") -> Path:
    d = state / "nodes" / node.name
    # The chart's own default images (ghcr.io, docker.io) come from the harness's registry, which
    # `ci/images push` fills: mirrors, as kind clusters use for a local registry. The deprecated
    # `mirrors` table, not `config_path`: setting config_path turns off containerd 1.6's plain HTTP
    # to localhost registries (containerd#7392), the very default the rewrite target relies on.
    mirrors = "".join(
        f'  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]\n    endpoint = ["http://{mirror}"]\n'
        for host in ("ghcr.io", "docker.io") if mirror)
    text = f"""version = 2
root = "{d / 'containerd'}"
state = "{RUN / node.name / 'containerd'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
oom_score = 0

[grpc]
  address = "{node.sock}"

[ttrpc]
  address = "{RUN / node.name / 'containerd.sock.ttrpc'}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  enable_cdi = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d / 'cni'}"
{mirrors}"""
    _write(d / "containerd.toml", text)
    cni = {
        "cniVersion": "1.0.0", "name": "localcluster",
        "plugins": [
            {"type": "ptp", "ipMasq": False, "mtu": 1500,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": node.pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    _write(d / "cni" / "10-localcluster.conflist", json.dumps(cni, indent=1) + "\n")
    return d / "containerd.toml"


def kubelet_config(node: Node, state: Path, ca: Path) -> Path:
    d = state / "nodes" / node.name
    _write(d / "resolv.conf", f"nameserver {NODE_LOCAL}\noptions ndots:5\n")
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.addr,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "enforceNodeAllocatable": [],
        "containerRuntimeEndpoint": f"unix://{node.sock}",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_LOCAL],
        "resolvConf": str(d / "resolv.conf"),
        "podLogsDir": str(d / "pod-logs"),
        "serializeImagePulls": False,
        "registerNode": True,
        "registerWithTaints": [_taint(t) for t in node.taints],
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                         "nodefs.inodesFree": "2%"},
        "imageGCHighThresholdPercent": 98,
        "imageGCLowThresholdPercent": 95,
        "maxPods": 110,
        "makeIPTablesUtilChains": False,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "volumeStatsAggPeriod": "1m",
        "shutdownGracePeriod": "0s",
        "logging": {"verbosity": 1},
    }
    _write(d / "kubelet.yaml", json.dumps(cfg, indent=1) + "\n")
    return d / "kubelet.yaml"


def _taint(spec: str) -> dict[str, str]:
    kv, _, effect = spec.partition(":")
    key, _, value = kv.partition("=")
    return {"key": key, "value": value, "effect": effect}


def kube_proxy_config(node: Node, state: Path, kubeconfig: Path) -> Path:
    d = state / "nodes" / node.name
    cfg = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node.name,
        "bindAddress": node.addr,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "mode": "iptables",
        "clusterCIDR": POD_NETS,
        # conntrack limits are host-wide: leave them as they are
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "1s"},
    }
    _write(d / "kube-proxy.yaml", json.dumps(cfg, indent=1) + "\n")
    return d / "kube-proxy.yaml"


def in_node(node: Node, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{node.netns}", "--", *argv]


def ctr(node_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "-a", str(RUN / node_name / "containerd.sock"), "-n", "k8s.io", *args],
                          capture_output=True, text=True)


def stop_workloads(node_name: str, state: Path) -> None:
    """Kill every container of the node (its containerd still running) and forget its sandboxes, so the
    next start begins clean: their network namespaces and IP allocations go too."""
    tasks = ctr(node_name, "tasks", "ls", "-q").stdout.split()
    for t in tasks:
        ctr(node_name, "tasks", "kill", "-s", "SIGKILL", t)
    for t in tasks:
        ctr(node_name, "tasks", "delete", "-f", t)
    for c in ctr(node_name, "containers", "ls", "-q").stdout.split():
        info = ctr(node_name, "containers", "info", c)
        try:
            spaces = json.loads(info.stdout)["Spec"]["linux"]["namespaces"]
        except (ValueError, KeyError, TypeError):
            spaces = []
        for ns in spaces:
            path = ns.get("path", "")
            if ns.get("type") == "network" and "/netns/cni-" in path:
                ip("netns", "del", Path(path).name, check=False)
        ctr(node_name, "containers", "rm", c)
    shutil.rmtree(state / "nodes" / node_name / "ipam", ignore_errors=True)


def unmount_under(top: Path) -> None:
    """Unmount everything mounted below TOP (kubelet's volumes, containerd's rootfs), deepest first."""
    mounts = [line.split()[1].replace("\\040", " ") for line in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(str(top) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def node_names(state: Path) -> list[str]:
    d = state / "nodes"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def ensure_cgroups(node: Node) -> None:
    """The node's cgroup root in every v1 hierarchy (the kubelet requires it to exist)."""
    for hierarchy in sorted(Path("/sys/fs/cgroup").iterdir()):
        if not (hierarchy / "cgroup.procs").exists() or hierarchy.name == "unified":
            continue
        top = hierarchy / node.cgroup_root.lstrip("/")
        top.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":  # a new cpuset has no CPUs or memory nodes until given its parent's
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (top / f).read_text().strip():
                    (top / f).write_text((hierarchy / f).read_text())


def remove_cgroups(node_name: str) -> None:
    """The node's cgroup tree in every v1 hierarchy (empty once its containers are gone), deepest first."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / f"localcluster-{node_name}"
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [top]:
            try:
                d.rmdir()
            except OSError:
                pass
