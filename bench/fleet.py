#!/usr/bin/env python3
"""A cluster's worth of images to Ready: the chart's webhook and artifact reconciler against crane, same set, same run.

1. Pushes the fleet's images (tests/support/ociimages.py, fixed seeds; an image already there from an
   earlier run is not pushed again): ``--small`` distinct small images (two layers, ``--small-kib`` in
   all) and ``--large`` large ones (three layers, ``--large-mib`` in all). The store (``--store``) is a
   distribution of our own on 127.0.0.1 that pods reach through a forwarded Service, with htpasswd at
   bcrypt cost 5 (a few ms a request, like a real registry's token check), or the local cluster's
   shared artifact store (``harness``), whose cost-10 bcrypt on every request (0.1-1 s each on this
   loaded machine) makes the store, not either copier, the bound.
2. Installs chart/ with its defaults (HA: 3 registry and 3 webhook replicas, 4 reconciler workers),
   the webhook scoped to the fleet's namespaces, the store spoken to over plain HTTP.
3. crane (``crane copy -j <blobs per image>``, ``--workers`` copies at once, as the reconciler's
   workers) copies the same distinct images into the chart's registry, under ``crane/``, from the
   network namespace of the reconciler's node, along the reconciler's path: the store's and the
   registry's ClusterIPs, a token from the registry's own realm with the reconciler's push credential.
4. ``--namespaces`` namespaces, each with its own pull secret for the store, get one Deployment each,
   created at once (one apply): ``--small / --namespaces`` small images of its own and ``--large-per-ns``
   large ones shared with other namespaces, one container per image, on the kwok user nodes (what is
   measured is Artifacts to Ready, not containers running). The clock runs from that apply until
   every Artifact of the fleet is Ready.
5. API-server writes: every Artifact write seen on a watch of the fleet's namespaces (ADDED, MODIFIED),
   the Events about Artifacts there, and beside them the API server's own ``apiserver_request_total``
   write verbs by resource before/after (global: other clients of the shared cluster count too).
6. Memory of every container of the release, sampled from its cgroup (v1) while the fleet copies,
   plus each process's VmHWM at the end, against the container's limit.

    flock /tmp/bench.lock .venv/bin/python bench/fleet.py                  # the full run
    flock /tmp/bench.lock .venv/bin/python bench/fleet.py --namespaces 4 --small 40 --large 2   # a smoke run
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pull import machine  # noqa: E402
from tests.support import cnf  # noqa: E402
from tests.support.cluster import BIN, STATE, Cluster, adopt_crds, component_pods, ensure_up, exclusive_chart, wait_for  # noqa: E402
from tests.support.inpod import container_pid, node_netns  # noqa: E402
from tests.support.ociimages import Pusher, push_image, sha256  # noqa: E402
from tests.support.registry import free_port, run_registry  # noqa: E402

REPO = "fleet"
TAG = "v1"
MIB = 1 << 20
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
KWOK = {"nodeSelector": {"kubernetes.azure.com/mode": "user"},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]}


@dataclass(frozen=True)
class Img:
    repo: str
    digest: str
    size: int  # bytes of its manifest and blobs


# -- the images -------------------------------------------------------------------------------------


def push_fleet(store: Store, small: int, small_kib: int, large: int, large_mib: int) -> list[Img]:
    """Push (or find, from an earlier run) the fleet's images: small first, then large."""
    specs: list[tuple[str, list[int | tuple[int, int]], int]] = [
        (f"{REPO}/s{i:04d}-{small_kib}k", [small_kib * 256, small_kib * 768], 700_000 + i) for i in range(small)]
    specs += [(f"{REPO}/l{i:03d}-{large_mib}m", [large_mib * MIB // 3] * 3, 800_000 + i) for i in range(large)]

    def held(repo: str) -> Img | None:
        found = store.pusher().get_manifest(repo, TAG)
        if found is None:
            return None
        doc = json.loads(found[0])
        return Img(repo, sha256(found[0]), len(found[0]) + doc["config"]["size"] + sum(x["size"] for x in doc["layers"]))

    def one(spec: tuple[str, list[int | tuple[int, int]], int]) -> Img:
        repo, layers, seed = spec
        if (img := held(repo)) is not None:
            return img
        pushed = push_image(store.pusher(), repo, TAG, layers=layers, seed=seed)
        return Img(repo, pushed.digest, len(pushed.manifest) + sum(s for _, s in pushed.blobs))

    # What an earlier run pushed (each look is a request, a bcrypt at the store): trusted while the
    # store still holds the first and the last image of the set.
    cache = store.cache
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = {i["repo"]: Img(**i) for i in json.loads(cache.read_text())}
        if all(spec[0] in known for spec in specs) and all(
                held(repo) == known[repo] for repo in (specs[0][0], specs[-1][0])):
            return [known[spec[0]] for spec in specs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        images = list(pool.map(one, specs))
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(cache.read_text()) if cache.exists() else []
        merged = {i["repo"]: i for i in old} | {i.repo: dataclasses.asdict(i) for i in images}
        cache.write_text(json.dumps(list(merged.values())))
    return images


# -- the API server's view ----------------------------------------------------------------------------


def write_counts(cluster: Cluster) -> dict[str, float]:
    """apiserver_request_total of the write verbs, by "group/resource[/subresource]"."""
    out: dict[str, float] = {}
    for line in cluster.kubectl("get", "--raw", "/metrics", timeout=60).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if labels.get("verb") not in WRITE_VERBS:
            continue
        key = "/".join(x for x in (labels.get("group") or "core", labels.get("resource", ""), labels.get("subresource")) if x)
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class ArtifactWatch(threading.Thread):
    """Every write to an Artifact in the fleet's namespaces (ADDED, MODIFIED on a watch) and when each turned Ready."""

    def __init__(self, cluster: Cluster, prefix: str) -> None:
        super().__init__(daemon=True)
        from kubernetes import client, watch

        self.custom = client.CustomObjectsApi(cluster.api_client())
        self.watch = watch.Watch()  # type: ignore[no-untyped-call]
        self.prefix = prefix
        self.writes: dict[str, int] = {}
        self.ready_at: dict[str, float] = {}
        self.added_at: dict[str, float] = {}
        self.phases: dict[str, str] = {}
        listed: Any = self.custom.list_cluster_custom_object("clusterregistry.io", "v1alpha1", "artifacts")
        self.rv = listed["metadata"]["resourceVersion"]

    def run(self) -> None:
        while True:
            try:
                stream = self.watch.stream(  # type: ignore[no-untyped-call]
                    self.custom.list_cluster_custom_object, "clusterregistry.io", "v1alpha1",
                    "artifacts", resource_version=self.rv, timeout_seconds=300)
                for ev in stream:
                    obj = ev["object"]
                    meta = obj["metadata"]
                    self.rv = meta["resourceVersion"]
                    if not meta["namespace"].startswith(self.prefix) or ev["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    key = f"{meta['namespace']}/{meta['name']}"
                    self.writes[key] = self.writes.get(key, 0) + 1
                    self.added_at.setdefault(key, time.monotonic())
                    phase = (obj.get("status") or {}).get("phase", "")
                    self.phases[key] = phase
                    if phase == "Ready":
                        self.ready_at.setdefault(key, time.monotonic())
            except Exception as err:  # noqa: BLE001 - a dropped watch resumes from the last version seen
                print(f"artifact watch: {err}; resuming", file=sys.stderr)
                time.sleep(1)


def artifact_events(cluster: Cluster, prefix: str) -> dict[str, int]:
    """Events about Artifacts in the fleet's namespaces, by reason (each one a POST)."""
    items = cluster.kubectl_json("get", "events", "-A", "--field-selector", "involvedObject.kind=Artifact")["items"]
    out: dict[str, int] = {}
    for e in items:
        if e["metadata"]["namespace"].startswith(prefix):
            out[e.get("reason", "")] = out.get(e.get("reason", ""), 0) + int(e.get("count") or 1)
    return out


@dataclass
class Store:
    """Where the fleet's images come from: the address pods name (a Service), the one this process pushes
    to, the credentials every namespace's pull secret holds, and a count of the requests it answered."""

    service: tuple[str, str]  # (namespace, name) of the Service pods reach it by, port 5000
    local: str  # host:port on this machine
    auth: tuple[str, str]
    cache: Path  # what an earlier run pushed there
    requests: Callable[[], dict[str, int]]  # requests answered for the fleet's repositories so far, by method
    pid: int  # its process: CPU seconds

    @property
    def in_cluster(self) -> str:
        return f"{self.service[1]}.{self.service[0]}.svc.cluster.local:5000"

    def pusher(self) -> Pusher:
        return Pusher(self.local, auth=self.auth)


def harness_store(cluster: Cluster) -> Store:
    """The local cluster's artifact store: htpasswd at bcrypt cost 10, checked on every request (its log
    counts them: "response completed" lines from now on)."""
    log = STATE / "logs" / "artifact-store.log"
    offset = log.stat().st_size if log.exists() else 0

    def requests() -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError), open(log, "rb") as f:
            f.seek(offset)
            for line in f:
                if b"response completed" in line and f"/v2/{REPO}/".encode() in line:
                    found = re.search(rb"http\.request\.method=(\w+)", line)
                    method = found[1].decode() if found else "?"
                    out[method] = out.get(method, 0) + 1
        return out

    host, _, _ = cluster.artifact_store_in_cluster.partition(".")
    return Store(("localcluster", host), cluster.artifact_store, (cluster.artifact_store_user, cluster.artifact_store_password),
                 STATE / "bench-fleet-images.json", requests, int((STATE / "pids" / "artifact-store.pid").read_text().split()[0]))


@contextlib.contextmanager
def own_store(cluster: Cluster, namespace: str) -> Iterator[Store]:
    """A distribution of our own on 127.0.0.1 (kept under .cache/localcluster/bench-fleet-store between
    runs), htpasswd at bcrypt cost 5 (what a token check costs a real registry, not a 70 ms bcrypt per
    request), reached by pods through a forwarded Service in ``namespace``; stopped by its PID."""
    root = STATE / "bench-fleet-store"
    debug = free_port()
    with run_registry(root, htpasswd=("fleet", secrets.token_hex(12)), debug_port=debug) as reg:
        def requests() -> dict[str, int]:
            out: dict[str, int] = {}
            text = urllib.request.urlopen(f"http://127.0.0.1:{debug}/metrics", timeout=30).read().decode()  # noqa: S310
            for line in text.splitlines():
                if line.startswith("registry_http_requests_total{"):
                    found = re.search(r'method="(\w+)"', line)
                    method = found[1].upper() if found else "?"
                    out[method] = out.get(method, 0) + int(float(line.rsplit(" ", 1)[1]))
            return out

        cluster.apply({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "fleet-store", "namespace": namespace,
                                    "annotations": {cnf.FORWARD_ANNOTATION: reg.host}},
                       "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]}})
        yield Store((namespace, "fleet-store"), reg.host, (reg.username, reg.password), root / "images.json", requests, reg.proc.pid)


# -- memory of the release's containers ------------------------------------------------------------------


def vmhwm(pid: int) -> int:
    """The process's peak resident set (bytes), 0 when it is gone."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(found[1]) * 1024 if found else 0


class MemorySampler(threading.Thread):
    """Each container's anonymous memory (cgroup v1 memory.stat total_rss) every ``interval`` s: the peak."""

    def __init__(self, cluster: Cluster, namespace: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.containers: dict[str, dict[str, Any]] = {}  # "<component>/<pod>/<container>" -> facts
        for pod in cluster.kubectl_json("get", "pods", "-n", namespace)["items"]:
            if pod["status"].get("phase") != "Running" or pod["spec"]["nodeName"].startswith("user-"):
                continue
            component = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "?")
            for c in pod["spec"]["containers"]:
                pid = container_pid(cluster, pod, c["name"])
                cg = next(line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                          if line.split(":")[1] == "memory")
                self.containers[f"{component}/{pod['metadata']['name']}/{c['name']}"] = {
                    "cgroup": Path("/sys/fs/cgroup/memory") / cg.lstrip("/"), "peak_rss": 0,
                    "limit": (c.get("resources", {}).get("limits") or {}).get("memory"), "pod": pod["metadata"]["name"]}

    def cpu(self, store_pid: int) -> dict[str, float]:
        """CPU seconds so far of each component's containers (cgroup v1 cpuacct) and of the processes in
        the path outside the cluster: the source store, the node relay to it, the API server."""
        out: dict[str, float] = {}
        for name, facts in self.containers.items():
            path = Path(str(facts["cgroup"]).replace("/memory/", "/cpuacct/", 1)) / "cpuacct.usage"
            with contextlib.suppress(OSError):
                out[name.split("/")[0]] = out.get(name.split("/")[0], 0.0) + int(path.read_text()) / 1e9
        for proc in ("store", "nodenet", "kube-apiserver"):
            with contextlib.suppress(OSError, ValueError):
                pid = str(store_pid) if proc == "store" else (STATE / "pids" / f"{proc}.pid").read_text().split()[0]
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[proc] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for facts in self.containers.values():
                try:
                    stat = dict(line.split() for line in (facts["cgroup"] / "memory.stat").read_text().splitlines())
                except OSError:
                    continue
                facts["peak_rss"] = max(facts["peak_rss"], int(stat["total_rss"]) + int(stat.get("total_swap", 0)))
            self.stop.wait(self.interval)

    def report(self, cluster: Cluster, namespace: str) -> dict[str, Any]:
        restarts = {(p["metadata"]["name"], s["name"]): (s.get("restartCount", 0), (s.get("lastState") or {}).get(
            "terminated", {}).get("reason")) for p in cluster.kubectl_json("get", "pods", "-n", namespace)["items"]
            for s in p["status"].get("containerStatuses", [])}
        out: dict[str, Any] = {}
        for name, facts in self.containers.items():
            component, pod, container = name.split("/")
            cg: Path = facts["cgroup"]
            try:
                hwm = sum(vmhwm(int(pid)) for pid in (cg / "cgroup.procs").read_text().split())
                limit, max_usage = int((cg / "memory.limit_in_bytes").read_text()), int((cg / "memory.max_usage_in_bytes").read_text())
                limit = 0 if limit > 1 << 50 else limit  # unlimited
                failcnt = int((cg / "memory.failcnt").read_text())
            except OSError:  # the container restarted: its cgroup is gone
                hwm, limit, max_usage, failcnt = 0, 0, 0, -1
            count, reason = restarts.get((pod, container), (0, None))
            row = {"peak_rss_mib": round(facts["peak_rss"] / MIB, 1), "vmhwm_mib": round(hwm / MIB, 1),
                   "cgroup_max_usage_mib": round(max_usage / MIB, 1), "limit_mib": round(limit / MIB, 1),
                   "failcnt": failcnt, "restarts": count, "last_termination": reason}
            best = out.get(f"{component}/{container}")
            if best is None or row["vmhwm_mib"] > best["vmhwm_mib"]:
                out[f"{component}/{container}"] = row | {"pods": (best or {}).get("pods", 0) + 1}
            else:
                best["pods"] += 1
                best["restarts"] = max(best["restarts"], count)
        return out


# -- crane, a peer doing the same work ---------------------------------------------------------------------


def crane_copy(images: list[Img], src_host: str, dst_host: str, netns: str, auths: dict[str, tuple[str, str]],
               workers: int, jobs: int) -> dict[str, Any]:
    """``crane copy`` of every image, ``workers`` at once, in ``netns``; wall and CPU seconds."""
    with tempfile.TemporaryDirectory(prefix="fleet-crane-") as tmp:
        config = {"auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for h, (u, p) in auths.items()}}
        Path(tmp, "config.json").write_text(json.dumps(config))
        env = dict(os.environ, DOCKER_CONFIG=tmp)
        cpu0 = os.times()

        def one(img: Img) -> None:
            proc = subprocess.run(["nsenter", f"--net={netns}", str(BIN / "crane"), "copy", "--insecure", "-j", str(jobs),
                                   f"{src_host}/{img.repo}:{TAG}", f"{dst_host}/crane/{img.repo}:{TAG}"],
                                  capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"crane copy {img.repo}: {proc.stderr[-2000:]}")

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, images))
        seconds = time.monotonic() - t0
        cpu1 = os.times()
    return {"s": round(seconds, 2), "images_per_s": round(len(images) / seconds, 2),
            "cpu_s": round(cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system, 2)}


# -- the fleet ----------------------------------------------------------------------------------------------


def fleet_manifests(prefix: str, namespaces: int, small: list[Img], large: list[Img], large_per_ns: int,
                    store: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The namespaces with their pull secrets, the Deployments, and how many Artifacts they need."""
    per_ns = len(small) // namespaces
    dockercfg = {"auths": {store: {"auth": "{auth}"}}}
    setup: list[dict[str, Any]] = []
    deployments: list[dict[str, Any]] = []
    artifacts = 0
    for n in range(namespaces):
        ns = f"{prefix}{n:02d}"
        mine = small[n * per_ns:(n + 1) * per_ns] + [large[(n + k * 7) % len(large)] for k in range(large_per_ns)] if large \
            else small[n * per_ns:(n + 1) * per_ns]
        mine = list(dict.fromkeys(mine))
        artifacts += len(mine)
        setup.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        setup.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                      "metadata": {"name": "store-pull", "namespace": ns},
                      "stringData": {".dockerconfigjson": json.dumps(dockercfg)}})
        labels = {"app": "fleet"}
        deployments.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fleet", "namespace": ns},
                            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                                "metadata": {"labels": labels},
                                "spec": {**KWOK, "imagePullSecrets": [{"name": "store-pull"}], "containers": [
                                    {"name": f"c{i}", "image": f"{store}/{img.repo}:{TAG}"} for i, img in enumerate(mine)]}}}})
    return setup, deployments, artifacts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--small-kib", type=int, default=1024, help="bytes of a small image's two layers, KiB")
    ap.add_argument("--large", type=int, default=20)
    ap.add_argument("--large-mib", type=int, default=60, help="bytes of a large image's three layers, MiB")
    ap.add_argument("--large-per-ns", type=int, default=2, help="large images each namespace uses (shared)")
    ap.add_argument("--workers", type=int, default=4, help="the reconciler's workers (chart default), crane's copies at once")
    ap.add_argument("--crane-jobs", type=int, default=8, help="crane's blobs at once (the copy engine's default)")
    ap.add_argument("--progress-delay", type=int, default=None,
                    help="the chart's artifactReconciler.progressDelay (default: the chart's); 0 writes every phase")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for every Artifact to be Ready")
    ap.add_argument("--store", choices=("own", "harness"), default="own",
                    help="own: a distribution of our own (bcrypt cost 5); harness: the local cluster's artifact store "
                         "(bcrypt cost 10 on every request: the store, not the copiers, sets the pace)")
    args = ap.parse_args()

    cluster = ensure_up()
    tag = secrets.token_hex(2)
    release, ns, prefix = f"fl{tag}", f"fleet-cr-{tag}", f"fleet-{tag}-"
    out: dict[str, Any] = {"bench": "fleet", "machine": machine(), "store": args.store}
    with exclusive_chart(), contextlib.ExitStack() as stack:
        cluster.kubectl("create", "namespace", ns)
        stack.callback(cluster.kubectl, "delete", "namespace", ns, "--wait=false", check=False)
        store = harness_store(cluster) if args.store == "harness" else stack.enter_context(own_store(cluster, ns))
        run(cluster, store, args, release, ns, prefix, out)
    crane_s = out["crane"]["s"]
    out["ratio_ready_to_crane"] = round(out["fleet"]["all_ready_s"] / crane_s, 2)
    over = [k for k, v in out["memory"].items() if v["limit_mib"] and max(v["vmhwm_mib"], v["peak_rss_mib"]) > v["limit_mib"]]
    out["targets"] = {"ready_no_later_than_crane": out["fleet"]["all_ready_s"] <= crane_s and "timed_out" not in out,
                      "writes_per_artifact_le_3": out["fleet"]["writes_per_artifact"] <= 3,
                      "no_component_over_limit": not over and all(v["restarts"] == 0 for v in out["memory"].values())}
    out["machine"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)
    return 0


def run(cluster: Cluster, store: Store, args: argparse.Namespace, release: str, ns: str, prefix: str,
        out: dict[str, Any]) -> None:
    """Push, install, crane, the fleet (see the module docstring); the figures go into ``out``."""
    t = time.monotonic()
    images = push_fleet(store, args.small, args.small_kib, args.large, args.large_mib)
    small, large = images[:args.small], images[args.small:]
    out["push_s"] = round(time.monotonic() - t, 1)
    out["images"] = {"small": len(small), "small_mb": round(small[0].size / 1e6, 2) if small else 0,
                     "large": len(large), "large_mb": round(large[0].size / 1e6, 1) if large else 0,
                     "total_mb": round(sum(i.size for i in images) / 1e6, 1)}
    values: dict[str, Any] = {"global": {"networkfunctionextension": {
        "webhook": {"pod": {"mutation": {"matchConditionExpression": f"request.namespace.startsWith('{prefix}')"}}},
        "systemPool": {"required": True},
        "clusterRegistry": {"storageSize": "20Gi"},
        "artifactReconciler": {"insecureRegistries": [store.in_cluster], "workers": args.workers},
    }}}
    if args.progress_delay is not None:
        values["global"]["networkfunctionextension"]["artifactReconciler"]["progressDelay"] = args.progress_delay
    out["chart_values"] = values["global"]["networkfunctionextension"]["artifactReconciler"]
    setup, deployments, expected = fleet_manifests(prefix, args.namespaces, small, large, args.large_per_ns, store.in_cluster)
    auth = base64.b64encode(":".join(store.auth).encode()).decode()
    for obj in setup:
        if obj["kind"] == "Secret":
            obj["stringData"][".dockerconfigjson"] = obj["stringData"][".dockerconfigjson"].replace("{auth}", auth)
    try:
        adopt_crds(cluster, release, ns)
        cnf.install_cluster_registry(cluster, release, ns, values)
        cnf.wait_replicas(cluster, ns)
        cluster.apply([o for o in setup if o["kind"] == "Namespace"])
        cluster.apply([o for o in setup if o["kind"] == "Secret"])
        reconciler = component_pods(cluster, ns, "artifact-reconciler")[0]
        registry_ip = cluster.kubectl_json("get", "svc", "-n", ns, f"{cnf.fullname(release)}-registry")["spec"]["clusterIP"]
        store_ip = cluster.kubectl_json("get", "svc", "-n", store.service[0], store.service[1])["spec"]["clusterIP"]
        reachable(node_netns(reconciler), f"{store_ip}:5000")
        memory = MemorySampler(cluster, ns)
        cpu0, requests0 = memory.cpu(store.pid), store.requests()
        out["crane"] = crane_copy(
            images, f"{store_ip}:5000", f"{registry_ip}:5000", node_netns(reconciler),
            {f"{store_ip}:5000": store.auth, f"{registry_ip}:5000": cnf.registry_credentials(cluster, ns, release)},
            args.workers, args.crane_jobs)
        cpu1, requests1 = memory.cpu(store.pid), store.requests()
        out["crane"]["store_requests"] = {k: v - requests0.get(k, 0) for k, v in requests1.items() if v > requests0.get(k, 0)}
        out["crane"]["cpu_s_of"] = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()}
        watch = ArtifactWatch(cluster, prefix)
        before = write_counts(cluster)
        watch.start()
        memory.start()
        t0 = time.monotonic()
        cluster.apply(deployments)
        created = time.monotonic() - t0
        try:
            wait_for(lambda: len(watch.ready_at) >= expected, timeout=args.timeout, interval=0.5,
                     what=f"{expected} Ready Artifacts")
            seconds = max(watch.ready_at.values()) - t0
        except TimeoutError:  # report what was done: the Ready count says how far it got
            seconds = time.monotonic() - t0
            phases: dict[str, int] = {}
            for phase in watch.phases.values():
                phases[phase or "none"] = phases.get(phase or "none", 0) + 1
            out["timed_out"] = {"after_s": round(seconds, 1), "ready": len(watch.ready_at), "phases": phases}
        cpu2, requests2 = memory.cpu(store.pid), store.requests()
        memory.stop.set()
        time.sleep(3)  # the last Events and status writes land
        after = write_counts(cluster)
        events = artifact_events(cluster, prefix)
        writes = sum(watch.writes.values())
        out["fleet"] = {
            "namespaces": args.namespaces, "artifacts": expected, "distinct_images": len(images),
            "apply_s": round(created, 2), "all_ready_s": round(seconds, 2),
            "images_per_s": round(len(images) / seconds, 2), "artifacts_per_s": round(expected / seconds, 2),
            "first_ready_s": round(min(watch.ready_at.values(), default=t0) - t0, 2),
            # the webhook's recorder creates the Artifacts: when the first and the last appeared
            "first_created_s": round(min(watch.added_at.values(), default=t0) - t0, 2),
            "last_created_s": round(max(watch.added_at.values(), default=t0) - t0, 2),
            "artifact_writes": writes, "event_writes": sum(events.values()), "events": events,
            "writes_per_artifact": round((writes + sum(events.values())) / expected, 2),
            "writes_per_image": round((writes + sum(events.values())) / len(images), 2),
            "artifact_writes_per_artifact": round(writes / expected, 2),
            "apiserver_writes": {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)
                                 if after.get(k, 0) - before.get(k, 0) > 0},
            "store_requests": {k: v - requests1.get(k, 0) for k, v in requests2.items() if v > requests1.get(k, 0)},
            "cpu_s_of": {k: round(v - cpu1.get(k, 0.0), 1) for k, v in cpu2.items()},
        }
        out["fleet"]["reconciler"] = worker_time(cluster, ns, reconciler["metadata"]["name"], args.workers, seconds)
        out["memory"] = memory.report(cluster, ns)
    finally:
        cluster.kubectl("delete", "namespace", *[o["metadata"]["name"] for o in setup if o["kind"] == "Namespace"],
                        "--wait=false", "--ignore-not-found", check=False, timeout=300)
        cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "180s", check=False)


def worker_time(cluster: Cluster, ns: str, pod: str, workers: int, seconds: float) -> dict[str, float]:
    """Where the reconciler's worker time went: copy attempts (its copy-duration histogram) against
    ``workers`` x ``seconds``; the rest is what a worker does around a copy (the namespace's pull
    secret, status writes) or idle waiting for Artifacts to be created."""
    text = cluster.kubectl("exec", "-n", ns, pod, "-c", "reconciler", "--", "python3", "-c",
                           "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/metrics').read().decode())")
    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
    n, s = total("cluster_registry_artifact_copy_duration_seconds_count"), total("cluster_registry_artifact_copy_duration_seconds_sum")
    return {"copies": n, "copy_s_mean": round(s / n, 3) if n else 0.0, "copy_s_sum": round(s, 1),
            "copy_share_of_worker_time": round(s / (workers * seconds), 2) if seconds else 0.0}


def reachable(netns: str, addr: str) -> None:
    """Wait until ``addr`` answers /v2/ from ``netns`` (a forwarded Service is set up by the node relay's poll)."""
    wait_for(lambda: subprocess.run(["nsenter", f"--net={netns}", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                     "--max-time", "5", f"http://{addr}/v2/"], capture_output=True, text=True
                                    ).stdout in ("200", "401"), timeout=60, interval=1, what=f"{addr} from {netns}")


if __name__ == "__main__":
    sys.exit(main())
