"""The network glue between the local cluster's real nodes and the harness on the host's loopback.

Each real node lives in its own network namespace (ci/localnodes.py), so its ``127.0.0.1`` is its own,
as on a kind node. This one process (started by ``ci/localcluster up`` as ``nodenet``) gives every node:

* the API server at ``127.0.0.1:26443`` (for its kubelet and kube-proxy) and at ``NODE_LOCAL:6443``, the
  endpoint of the ``kubernetes`` Service (for pods);
* every Service annotated ``localcluster.clusterregistry.io/forward-to: 127.0.0.1:PORT`` (the harness's
  registries, a test's proxy) at ``NODE_LOCAL:PORT`` and at the node's own ``127.0.0.1:PORT``, with an
  EndpointSlice pointing the Service there (so kube-proxy leads pods to it, and the node's containerd
  pulls ``127.0.0.1:PORT/...`` over plain HTTP as from any localhost registry);
* cluster DNS at ``NODE_LOCAL:53`` (UDP): ``<svc>.<ns>.svc.cluster.local`` (ClusterIP, or the ready
  endpoints of a headless Service, ``<hostname>.<svc>.<ns>.svc.cluster.local`` for StatefulSet pods).

Listening sockets are made inside each node's namespace (``setns`` on this thread, then back); the
connections they forward to are made from the host's namespace. Nothing listens outside 127.0.0.1 and
the nodes' namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from localnodes import NODE_LOCAL  # on every node's loopback device (ci/ is this script's directory)

FORWARD_ANNOTATION = "localcluster.clusterregistry.io/forward-to"
MANAGED_BY = "nodenet.localcluster.clusterregistry.io"
CLUSTER_DOMAIN = "cluster.local"
CLONE_NEWNET = 0x40000000

log = logging.getLogger("nodenet")
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace NAME (sockets made there stay there)."""
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(host, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host")
    finally:
        os.close(target)
        os.close(host)


def listen(netns: str, addr: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(256)
        sock.setblocking(False)
        return sock


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def forward(sock: socket.socket, target: tuple[str, int]) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.wait_for(asyncio.open_connection(*target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        await asyncio.gather(pump(reader, w2), pump(r2, writer))

    return await asyncio.start_server(handle, sock=sock)


# --------------------------------------------------------------------------------------------------
# DNS: one question in, one answer out (A records of the cluster domain)


def dns_answer(query: bytes, records: dict[str, list[str]]) -> bytes | None:
    """The response to QUERY from RECORDS (lower-case FQDN without the final dot -> IPv4 addresses)."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if qdcount != 1 or flags & 0x8000:
        return None
    labels, i = [], 12
    while i < len(query) and query[i]:
        n = query[i]
        labels.append(query[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(query):
        return None
    qtype, _ = struct.unpack("!HH", query[i + 1:i + 5])
    question = query[12:i + 5]
    name = ".".join(labels).lower()
    rd = flags & 0x0100
    if not (name == CLUSTER_DOMAIN or name.endswith("." + CLUSTER_DOMAIN)):
        return struct.pack("!HHHHHH", qid, 0x8000 | rd | 5, 1, 0, 0, 0) + question  # REFUSED: no upstream here
    addrs = records.get(name)
    if addrs is None:
        return struct.pack("!HHHHHH", qid, 0x8400 | rd | 3, 1, 0, 0, 0) + question  # NXDOMAIN
    answers = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(a) for a in addrs) if qtype == 1 else b""
    count = len(addrs) if qtype == 1 else 0
    return struct.pack("!HHHHHH", qid, 0x8400 | rd, 1, count, 0, 0) + question + answers


class DNS(asyncio.DatagramProtocol):
    def __init__(self, net: NodeNet) -> None:
        self.net = net
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = dns_answer(data, self.net.records)
        if reply is not None:
            self.transport.sendto(reply, addr)


# --------------------------------------------------------------------------------------------------


class NodeNet:
    def __init__(self, nodes: list[str], kubeconfig: str, apiserver: tuple[str, int], api_port: int,
                 pod_logs: list[Path] = (), kept_logs: Path | None = None) -> None:
        from kubernetes import client, config

        config.load_kube_config(kubeconfig)
        self.core = client.CoreV1Api()
        self.discovery = client.DiscoveryV1Api()
        self.nodes = nodes
        self.apiserver = apiserver
        self.api_port = api_port
        self.records: dict[str, list[str]] = {}
        self.forwards: dict[tuple[str, str, int], asyncio.AbstractServer] = {}  # (netns, addr, port)
        self.pod_logs = list(pod_logs)
        self.kept_logs = kept_logs

    def keep_logs(self) -> None:
        """Hard-link every container log file the kubelets write (podLogsDir/<ns>_<pod>_<uid>/<c>/N.log)
        into KEPT_LOGS/<ns>_<pod>_<uid>/<c>.<N>.log (N: the restart): the kubelet deletes a gone pod's logs, tests still read
        them (tests/support/cluster.py namespace_logs). The link shares the inode, so it keeps growing."""
        if self.kept_logs is None:
            return
        for top in self.pod_logs:
            for f in top.glob("*/*/*.log"):
                dest = self.kept_logs / f.parent.parent.name / f"{f.parent.name}.{f.name}"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        os.link(f, dest)

    async def ensure_forward(self, port: int, target: tuple[str, int], addrs: tuple[str, ...]) -> None:
        for ns in self.nodes:
            for addr in addrs:
                if (ns, addr, port) in self.forwards:
                    continue
                try:
                    sock = listen(ns, addr, port)
                except OSError as e:
                    log.warning("listen %s:%d in %s: %s", addr, port, ns, e)
                    continue
                self.forwards[(ns, addr, port)] = await forward(sock, target)
                log.info("%s: %s:%d -> %s:%d", ns, addr, port, *target)

    def drop_forwards(self, keep: set[int]) -> None:
        for key in [k for k in self.forwards if k[2] not in keep]:
            self.forwards.pop(key).close()
            log.info("%s: closed %s:%d", *key)

    def sync_endpoint_slice(self, ns: str, svc: Any, port: int) -> None:
        from kubernetes.client.rest import ApiException

        name = f"{svc.metadata.name}-nodenet" if svc.metadata.name != "kubernetes" else "kubernetes"
        body = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc.metadata.name,
                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_LOCAL], "conditions": {"ready": True}}],
            "ports": [{"name": p.name or "", "port": port, "protocol": "TCP"} for p in svc.spec.ports or []],
        }
        try:
            cur = self.discovery.read_namespaced_endpoint_slice(name, ns)
            want = body["ports"]
            have = [{"name": p.name or "", "port": p.port, "protocol": p.protocol} for p in cur.ports or []]
            if have != want or [a for e in cur.endpoints or [] for a in e.addresses] != [NODE_LOCAL]:
                self.discovery.replace_namespaced_endpoint_slice(name, ns, {**body, "metadata": {
                    **body["metadata"], "resourceVersion": cur.metadata.resource_version}})
        except ApiException as e:
            if e.status != 404:
                raise
            self.discovery.create_namespaced_endpoint_slice(ns, body)

    async def refresh(self) -> None:
        services = await asyncio.to_thread(lambda: self.core.list_service_for_all_namespaces().items)
        slices = await asyncio.to_thread(lambda: self.discovery.list_endpoint_slice_for_all_namespaces().items)
        records: dict[str, list[str]] = {}
        ready: dict[tuple[str, str], list[Any]] = {}
        for sl in slices:
            svc_name = (sl.metadata.labels or {}).get("kubernetes.io/service-name")
            if svc_name:
                ready.setdefault((sl.metadata.namespace, svc_name), []).extend(
                    e for e in sl.endpoints or [] if e.conditions is None or e.conditions.ready is not False)
        wanted_ports: set[int] = set()
        for s in services:
            ns, name = s.metadata.namespace, s.metadata.name
            fqdn = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
            if s.spec.cluster_ip and s.spec.cluster_ip != "None":
                records[fqdn] = [s.spec.cluster_ip]
            else:
                eps = ready.get((ns, name), [])
                records[fqdn] = sorted({a for e in eps for a in e.addresses})
                for e in eps:
                    if e.hostname:
                        records[f"{e.hostname}.{fqdn}"] = list(e.addresses[:1])
            target = (s.metadata.annotations or {}).get(FORWARD_ANNOTATION, "")
            if (ns, name) == ("default", "kubernetes"):
                await asyncio.to_thread(self.sync_endpoint_slice, ns, s, self.api_port)
            elif target.startswith("127.0.0.1:"):
                port = int(target.rsplit(":", 1)[1])
                wanted_ports.add(port)
                await self.ensure_forward(port, ("127.0.0.1", port), (NODE_LOCAL, "127.0.0.1"))
                await asyncio.to_thread(self.sync_endpoint_slice, ns, s, port)
        self.drop_forwards(wanted_ports | {self.api_port, self.apiserver[1]})
        self.records = records

    async def run(self) -> None:
        await self.ensure_forward(self.apiserver[1], self.apiserver, ("127.0.0.1",))  # kubelet, kube-proxy
        await self.ensure_forward(self.api_port, self.apiserver, (NODE_LOCAL,))  # the kubernetes Service
        loop = asyncio.get_running_loop()
        for ns in self.nodes:
            await loop.create_datagram_endpoint(lambda: DNS(self), sock=listen(ns, NODE_LOCAL, 53, socket.SOCK_DGRAM))
        while True:
            try:
                await self.refresh()
                self.keep_logs()
            except Exception:  # noqa: BLE001 - keep serving: the apiserver may restart under us
                log.exception("refresh")
                await asyncio.sleep(2)
            await asyncio.sleep(1)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", action="append", required=True, help="a node's network namespace (repeatable)")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--apiserver", default="127.0.0.1:26443")
    ap.add_argument("--api-port", type=int, default=6443, help="port of the kubernetes Service's endpoint")
    ap.add_argument("--pod-logs", type=Path, action="append", default=[], help="a kubelet's podLogsDir (repeatable)")
    ap.add_argument("--kept-logs", type=Path, help="where container logs are kept after their pods are gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    host, port = args.apiserver.rsplit(":", 1)
    for ns in args.netns:
        if not Path(f"/run/netns/{ns}").exists():
            print(f"nodenet: no network namespace {ns}", file=sys.stderr)
            return 2
    asyncio.run(NodeNet(args.netns, args.kubeconfig, (host, int(port)), args.api_port, args.pod_logs, args.kept_logs).run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
