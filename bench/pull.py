#!/usr/bin/env python3
"""Pull throughput through the chart's registry endpoint against distribution directly, in the same pod.

1. Installs chart/ on the local cluster (one registry replica, on a real node) and starts a front-less
   distribution in the registry container (tests/support/inpod.py: the chart's config and storage, no
   auth, no TLS, port 5999 of the pod).
2. In the network namespace of the registry pod's node (nsenter: what the node's runtime sees), pushes a
   1 GiB image of 4 layers (tests/support/ociimages.py) and pulls it (manifest and every blob; each
   client on its own connection, with its own token when the endpoint asks for one) with 1, 4 and 16
   concurrent clients along four paths, in an order rotated by round and concurrency:
   `node`: the rewrite target, the node proxy on 127.0.0.1:5050, to the registry Service, to the pod;
   `clusterip`: the registry Service's ClusterIP (kube-proxy's NAT, no node proxy: what the relay adds);
   `service`: the pod's registry port (where the Service leads: the chart's front, its auth and TLS);
   `direct`: the front-less distribution in the same pod (with the chart's TLS when the chart serves TLS).
   Authenticated paths use the artifact reconciler's push credential (pull is what is measured).
3. CPU seconds per GB of each path from /proc (the real nodes' containers are host processes): the
   direct path's is the direct distribution's; the service path's every container process of the
   registry pod (distribution and the gate or token service); the node path's adds the node proxy on
   that node, with the seconds its CPU limit throttled it (CFS). With bearer auth, the token round trip
   (realm as the registry names it) p50/p99.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import cnf  # noqa: E402
from tests.support.cluster import Cluster, component_pods, ensure_up, exclusive_chart  # noqa: E402
from tests.support.inpod import (  # noqa: E402
    container_pid, direct_distribution, direct_pid, node_netns, ready_registry_pod, service_port,
    single_replica_values,
)
from tests.support.ociimages import ACCEPT, Pusher, push_image  # noqa: E402

CONCURRENCY = (1, 4, 16)
NODE_ENDPOINT = "127.0.0.1:5050"  # the node proxy: the chart's default rewrite target
REPO = "bench/pull"
BUF = 1 << 20
TOKEN_SAMPLES = 200


# -- in the node's network namespace ---------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (every thread's)
    return total / tick


def throttled_seconds(pids: list[int]) -> float:
    """Seconds the CFS quota held back the cpu cgroups of PIDS (cgroup v1, as the real nodes run)."""
    total = 0
    for cg in {line.split(":", 2)[2] for pid in pids for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
               if line.split(":", 2)[1] == "cpu"}:
        stat = dict(line.split() for line in Path(f"/sys/fs/cgroup/cpu{cg}/cpu.stat").read_text().splitlines())
        total += int(stat["throttled_time"])
    return total / 1e9


def speaks_tls(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw):
            return True
    except (ssl.SSLError, ConnectionResetError):
        return False


class Endpoint:
    """One registry address as a node's runtime pulls from it: challenge, token (or basic), GETs."""

    def __init__(self, addr: str, auth: tuple[str, str] | None) -> None:
        self.addr, self.auth = addr, auth
        self.context: ssl.SSLContext | None = None
        if speaks_tls(addr):  # an IP, not the serving certificate's name: no verification here
            self.context = ssl.create_default_context()
            self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE

    def conn(self, addr: str | None = None, tls: bool | None = None) -> http.client.HTTPConnection:
        host, _, port = (addr or self.addr).rpartition(":")
        if self.context if tls is None else tls:
            context = self.context or ssl._create_unverified_context()  # noqa: S323 - an IP, see above
            return http.client.HTTPSConnection(host, int(port), context=context, timeout=300)
        return http.client.HTTPConnection(host, int(port), timeout=300)

    def challenge(self) -> str:
        c = self.conn()
        c.request("GET", f"/v2/{REPO}/tags/list")
        r = c.getresponse()
        r.read()
        c.close()
        return r.getheader("WWW-Authenticate", "") if r.status == 401 else ""

    def basic(self) -> str:
        assert self.auth, "the endpoint asks for credentials and none were given"
        return "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()

    def token(self, challenge: str) -> str:
        """One token round trip to the challenge's realm (the same address when it names no other)."""
        params = {k.strip(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in challenge[7:].split(","))}
        realm = urllib.parse.urlsplit(params["realm"])
        query = urllib.parse.urlencode({"service": params.get("service", ""), "scope": f"repository:{REPO}:pull"})
        c = self.conn(realm.netloc or None, realm.scheme == "https" if realm.netloc else None)
        c.request("GET", f"{realm.path}?{query}", headers={"Authorization": self.basic()})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise SystemExit(f"token from {params['realm']}: HTTP {r.status} {body[:200]!r}")
        doc = json.loads(body)
        return "Bearer " + str(doc.get("token") or doc["access_token"])

    def authorization(self, challenge: str) -> dict[str, str]:
        if challenge.lower().startswith("bearer"):
            return {"Authorization": self.token(challenge)}
        return {"Authorization": self.basic()} if challenge else {}

    def pull(self, challenge: str, paths: list[str]) -> int:
        """One client's pull: its token (if asked), then every path on one connection; bytes received."""
        headers = {"Accept": ACCEPT, **self.authorization(challenge)}
        c, buf, got = self.conn(), bytearray(BUF), 0
        for path in paths:
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            if r.status != 200:
                raise SystemExit(f"GET {self.addr}{path}: HTTP {r.status} {r.read()[:200]!r}")
            while n := r.readinto(buf):
                got += n
        c.close()
        return got


def timed_pull(ep: Endpoint, paths: list[str], clients: int, pids: list[int], limited: list[int]) -> dict[str, float]:
    challenge = ep.challenge()
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(ep.pull(challenge, paths))) for _ in range(clients)]
    cpu0, held0, t0 = cpu_seconds(pids), throttled_seconds(limited), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
    if len(got) != clients:
        raise SystemExit(f"{clients - len(got)} of {clients} clients failed against {ep.addr}")
    return {"mbps": sum(got) / seconds / 1e6, "cpu_s_per_gb": cpu / (sum(got) / 1e9),
            "throttled_s": throttled_seconds(limited) - held0}


def in_node(spec: dict[str, Any]) -> dict[str, Any]:
    paths_to = {name: Endpoint(addr, tuple(spec["auth"]) if spec["auth"] and name != "direct" else None)
                for name, addr in spec["addrs"].items()}
    direct = paths_to["direct"]
    image = push_image(Pusher(direct.addr), REPO, "1", layers=[spec["layer_mib"] << 20] * spec["layers"], seed=15)
    paths = [f"/v2/{REPO}/manifests/{image.digest}"] + [f"/v2/{REPO}/blobs/{d}" for d, _ in image.blobs]
    runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in paths_to}
    names = list(paths_to)
    for r in range(spec["rounds"]):
        for i, clients in enumerate(CONCURRENCY):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                limited = spec["proxy_pids"] if name == "node" else []
                runs[name].setdefault(clients, []).append(timed_pull(paths_to[name], paths, clients, spec["pids"][name], limited))
    out: dict[str, Any] = {"image_bytes": sum(s for _, s in image.blobs), "blobs": len(image.blobs),
                           "tls": {name: ep.context is not None for name, ep in paths_to.items()}}
    for clients in CONCURRENCY:
        best = {k: max(runs[k][clients], key=lambda x: x["mbps"]) for k in runs}
        out[f"c{clients}"] = {
            **{f"{k}_mbps": round(best[k]["mbps"], 1) for k in runs},
            **{f"{k}_mbps_median": round(statistics.median(x["mbps"] for x in runs[k][clients]), 1) for k in runs},
            **{f"ratio_{k}": round(best[k]["mbps"] / best["direct"]["mbps"], 3) for k in runs if k != "direct"},
            **{f"{k}_cpu_s_per_gb": round(min(x["cpu_s_per_gb"] for x in runs[k][clients]), 3) for k in runs},
            "node_proxy_throttled_s": round(best["node"]["throttled_s"], 3),
        }
    endpoint = paths_to["node"]
    challenge = endpoint.challenge()
    out["challenge"] = challenge.split(" ", 1)[0] or "none"
    if challenge.lower().startswith("bearer"):
        rtt = []
        for _ in range(TOKEN_SAMPLES):
            t0 = time.perf_counter()
            endpoint.token(challenge)
            rtt.append((time.perf_counter() - t0) * 1000)
        q = statistics.quantiles(rtt, n=100)
        out["token_rtt_ms"] = {"p50": round(q[49], 2), "p99": round(q[98], 2), "samples": TOKEN_SAMPLES}
    else:
        out["token_rtt_ms"] = None  # no token service in front
    return out


# -- on the host ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": model, "loadavg_start": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer-mib", type=int, default=256)
    ap.add_argument("--chart", type=Path, default=cnf.CLUSTER_CHART,
                    help="the chart to install, e.g. a `git archive` of a commit, to compare fronts")
    ap.add_argument("--in-node", help=argparse.SUPPRESS)  # the JSON spec of the part that runs in the node's netns
    args = ap.parse_args()
    if args.in_node:
        print(json.dumps(in_node(json.loads(args.in_node))), flush=True)
        return 0
    cnf.CLUSTER_CHART = args.chart
    cluster: Cluster = ensure_up()
    out: dict[str, Any] = {"bench": "pull", "rounds": args.rounds, "machine": machine()}
    release, ns = f"bp{secrets.token_hex(2)}", f"bench-pull-{secrets.token_hex(3)}"
    with exclusive_chart():
        cluster.kubectl("create", "namespace", ns)
        try:
            cnf.install_cluster_registry(cluster, release, ns, single_replica_values("4Gi"))
            pod = ready_registry_pod(cluster, ns)
            proxy = next(p for p in component_pods(cluster, ns, "node-proxy") if p["spec"]["nodeName"] == pod["spec"]["nodeName"])
            # with the chart's TLS (registryTLS, the default) when it serves it: every path then speaks TLS
            # to distribution, and the ratios measure what the fronts add, not what TLS costs
            with direct_distribution(cluster, ns, pod, tls=True) as direct_addr:
                service = [container_pid(cluster, pod, c["name"]) for c in pod["spec"]["containers"]]
                proxy_pids = [container_pid(cluster, proxy, c["name"]) for c in proxy["spec"]["containers"]]
                svc = cluster.kubectl_json("get", "service", "-n", ns, f"{release}-cluster-registry-registry")["spec"]
                port = next(p["port"] for p in svc["ports"] if p["name"] == "registry")
                spec = {"addrs": {"node": NODE_ENDPOINT, "clusterip": f"{svc['clusterIP']}:{port}",
                                  "service": f"{pod['status']['podIP']}:{service_port(pod)}", "direct": direct_addr},
                        "pids": {"node": service + proxy_pids, "clusterip": service, "service": service,
                                 "direct": [direct_pid(cluster, pod)]},
                        "proxy_pids": proxy_pids,
                        "auth": cnf.registry_credentials(cluster, ns, release), "rounds": args.rounds, "layers": args.layers,
                        "layer_mib": args.layer_mib}
                proc = subprocess.run(["nsenter", f"--net={node_netns(pod)}", sys.executable, __file__, "--in-node",
                                       json.dumps(spec)], capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise SystemExit(f"the pulls from the node failed: {proc.stderr[-3000:]}")
                out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        finally:
            cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    for path in ("node", "clusterip", "service"):
        out[f"ratio_{path}_min"] = min(out[f"c{c}"][f"ratio_{path}"] for c in CONCURRENCY)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
