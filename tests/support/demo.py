"""`make demo`: the chart and the sample CNF on the local cluster, explained as it goes.

    python -m tests.support.demo up      # after `ci/localcluster up` (make demo does both)
    python -m tests.support.demo down    # uninstall both releases, stop the store front

`up` pushes the sample CNF's images and its chart (an OCI chart, `helm push`) to the artifact store,
installs chart/ with helm (`--wait`: its pods run on the real system nodes), installs the CNF from the store,
waits for the lazy copies, restarts the CNF so its pods come back rewritten to the cluster registry,
and prints a summary. Everything is left running.

The cluster reaches the artifact store through a small proxy (tests/support/cnf.py StoreFront) that
the demo starts in the background (pid in .cache/demo/): it serves the CNF's public repositories
anonymously and keeps `private/` behind the pull secret. The webhook is scoped to the demo's CNF
namespace so the rest of the local cluster (other tests' namespaces) is left alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import cnf
from tests.support.cluster import ROOT, Cluster, CommandError, component_pods, ensure_up, pod_ready, wait_for

STATE = ROOT / ".cache" / "demo"
PIDFILE = STATE / "storefront.pid"
RELEASE = "cluster-registry"
NAMESPACE = "cluster-registry"
CNF_RELEASE = "sample"
CNF_NAMESPACE = "sample-cnf"
GROUP = "clusterregistry.io"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Ticker:
    """Prints a line every few seconds while a long step runs (what it waits for, how long so far)."""

    def __init__(self, what: str, every: float = 10) -> None:
        self.what, self.every = what, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.every):
            say(f"  ... {self.what} ({time.monotonic() - start:.0f}s)")

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


# -- the store front, as a background process ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def front_pid() -> int | None:
    try:
        pid, marker = PIDFILE.read_text().split()[:2]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return int(pid) if marker.encode() in cmdline else None


def start_front() -> str:
    """Start (or find) the store front; returns its 127.0.0.1:PORT."""
    STATE.mkdir(parents=True, exist_ok=True)
    if front_pid() and (STATE / "storefront.addr").exists():
        return (STATE / "storefront.addr").read_text().strip()
    port = free_port()
    log = open(STATE / "storefront.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.demo", "storefront", "--port", str(port)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    PIDFILE.write_text(f"{proc.pid}\nstorefront\n")
    addr = f"127.0.0.1:{port}"
    (STATE / "storefront.addr").write_text(addr + "\n")

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_for(listening, timeout=20, what="the store front")
    return addr


def run_front(port: int) -> int:
    front = cnf.StoreFront(Cluster.load(), port=port).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    front.stop()
    return 0


def stop_front() -> None:
    pid = front_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if front_pid() is None or not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        say(f"stopped the store front (pid {pid})")
    PIDFILE.unlink(missing_ok=True)
    (STATE / "storefront.addr").unlink(missing_ok=True)


# -- up --------------------------------------------------------------------------------------------


def ensure_namespace(cluster: Cluster, name: str) -> None:
    if not cluster.kubectl("get", "namespace", name, "--ignore-not-found", "-o", "name").strip():
        cluster.kubectl("create", "namespace", name)


def released(cluster: Cluster, release: str, namespace: str) -> bool:
    out = cluster.helm("status", release, "-n", namespace, "-o", "json", check=False)
    return '"status":"deployed"' in out.replace(" ", "")


def up() -> int:
    say("local cluster: checking (ci/localcluster up)")
    cluster = ensure_up()
    say(f"local cluster up: API server {cluster.apiserver}, artifact store {cluster.artifact_store}")
    ensure_namespace(cluster, NAMESPACE)
    ensure_namespace(cluster, CNF_NAMESPACE)

    addr = start_front()
    front = cnf.StoreFront(cluster)  # only its address matters to the Service
    front.port = int(addr.rsplit(":", 1)[1])
    store_host = cnf.expose_store(cluster, CNF_NAMESPACE, front)
    say(f"artifact store as the cluster sees it: {store_host} (store front on {addr})")

    say("building the sample CNF's images and pushing them to the artifact store ...")
    with Ticker("pushing images"):
        images = cnf.push_images(cluster)
    for img in images.values():
        say(f"  pushed {img.ref:<90} {human(img.size)}")
    chart_ref = cnf.push_chart(cluster, images, store_host)
    say(f"pushed the sample chart with helm push: {chart_ref}:{cnf.chart_version()}")

    values = cnf.cluster_registry_values([CNF_NAMESPACE], store_host, storage_size="10Gi")
    if released(cluster, RELEASE, NAMESPACE):
        say(f"chart already installed: release {RELEASE} in {NAMESPACE}")
    else:
        say(f"helm install {RELEASE} ./chart -n {NAMESPACE} --wait (hooks, 3 registry + 3 webhook replicas) ...")
        with Ticker("waiting for the chart's pods and hooks", every=15):
            cnf.install_cluster_registry(cluster, RELEASE, NAMESPACE, values, timeout=600)
        with Ticker("waiting for the autoscalers to bring the registry and webhook to 3 replicas each", every=15):
            cnf.wait_replicas(cluster, NAMESPACE)
        say("cluster registry installed")

    cnf.pull_secret(cluster, CNF_NAMESPACE, store_host)
    if released(cluster, CNF_RELEASE, CNF_NAMESPACE):
        say(f"sample CNF already installed: release {CNF_RELEASE} in {CNF_NAMESPACE}")
    else:
        say(f"helm install {CNF_RELEASE} {chart_ref} -n {CNF_NAMESPACE} (pulled from the artifact store), "
            "on the real system nodes")
        cnf.install_cnf(cluster, CNF_RELEASE, CNF_NAMESPACE, chart_ref, extra=cnf.ON_SYSTEM_NODES)
    job = f"{CNF_RELEASE}-reporter-{int(time.time())}"
    cluster.kubectl("create", "job", job, f"--from=cronjob/{CNF_RELEASE}-reporter", "-n", CNF_NAMESPACE)
    say("the webhook saw the CNF's pods and recorded an Artifact per image; the reconciler copies them:")

    sources = {img.source(store_host) for img in images.values()}
    last = ""

    def progress() -> bool:
        nonlocal last
        arts = artifacts(cluster)
        phases = [arts.get(s, {}).get("status", {}).get("phase", "-") for s in sorted(sources)]
        line = f"  Artifacts: {sum(p == 'Ready' for p in phases)}/{len(sources)} Ready ({', '.join(phases)})"
        if line != last:
            say(line)
            last = line
        return all(p == "Ready" for p in phases)

    wait_for(progress, timeout=600, interval=2, what="every Artifact Ready")
    say("every image is in the cluster registry; restarting the CNF so its pods are rewritten to it")
    for kind in ("deployment", "statefulset", "daemonset"):
        cluster.kubectl("rollout", "restart", kind, "-n", CNF_NAMESPACE, "-l", "app.kubernetes.io/part-of=sample-cnf")
    cluster.kubectl("create", "job", f"{job}-2", f"--from=cronjob/{CNF_RELEASE}-reporter", "-n", CNF_NAMESPACE)
    registry_host = "127.0.0.1:5050"  # the chart's default rewrite target: the node proxy

    def rewritten() -> bool:
        pods = [p for p in cnf_pods(cluster) if not p["metadata"].get("deletionTimestamp")]
        return bool(pods) and all(i.startswith(registry_host + "/") for p in pods for _, i in containers(p)) and all(
            p["status"].get("phase") == "Succeeded" or cnf.pod_ready(p) for p in pods)

    with Ticker("rolling the CNF: the nodes pull every image from the cluster registry"):
        wait_for(rewritten, timeout=300, interval=2, what="every CNF pod rewritten and running")
    summary(cluster, registry_host)
    return 0


def artifacts(cluster: Cluster) -> dict[str, dict[str, Any]]:
    items = cluster.kubectl_json("get", f"artifacts.{GROUP}", "-n", CNF_NAMESPACE)["items"]
    return {a["spec"]["sourceArtifact"]: a for a in items}


def cnf_pods(cluster: Cluster) -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "pods", "-n", CNF_NAMESPACE, "-l", "app.kubernetes.io/part-of=sample-cnf")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def containers(pod: dict[str, Any]) -> list[tuple[str, str]]:
    spec = pod["spec"]
    return [(c["name"], c["image"]) for c in spec.get("initContainers", []) + spec["containers"]]


def original(image: str, registry_host: str) -> str:
    from cluster_registry import reference

    src = reference.source_of(reference.parse(image), registry_host)
    return str(src) if src else image


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary(cluster: Cluster, registry_host: str) -> None:
    pods = sorted(cnf_pods(cluster), key=lambda p: p["metadata"]["name"])
    rows = []
    for p in pods:
        for name, image in containers(p):
            rows.append([p["metadata"]["name"], name, original(image, registry_host), image.replace(registry_host, "<registry>")])
    print()
    print(f"Pods of the sample CNF (namespace {CNF_NAMESPACE}; <registry> = {registry_host})")
    print(table(rows, ["POD", "CONTAINER", "ORIGINAL IMAGE", "REWRITTEN IMAGE"]))
    print()
    arts = sorted(artifacts(cluster).values(), key=lambda a: a["spec"]["sourceArtifact"])
    rows = [[a["spec"]["sourceArtifact"], a.get("status", {}).get("phase", "-"),
             human(int(a.get("status", {}).get("size") or 0)),
             ",".join(f"{o['kind']}/{o['name']}" for o in a["spec"].get("owners", []))] for a in arts]
    print("Artifacts")
    print(table(rows, ["SOURCE", "PHASE", "SIZE", "OWNERS"]))
    print()
    volume = cnf.registry_volume(cluster, NAMESPACE, RELEASE)
    used = cnf.du(volume)
    pvc = cluster.kubectl_json("get", "pvc", "-n", NAMESPACE, f"{cnf.fullname(RELEASE)}-registry")
    size = pvc["spec"]["resources"]["requests"]["storage"]
    repos: list[str] = []
    for endpoint in cnf.registry_endpoints(cluster, NAMESPACE)[:1]:
        with urllib.request.urlopen(f"http://{endpoint}/v2/_catalog?n=1000", timeout=10) as r:  # noqa: S310
            import json

            repos = json.loads(r.read())["repositories"]
    ready = sum(pod_ready(p) for p in component_pods(cluster, NAMESPACE, "registry"))
    print(f"Registry usage: {human(used)} of {size} (PVC {pvc['metadata']['name']}, {pvc['spec']['accessModes'][0]}), "
          f"{len(repos)} repositories, {ready} registry replicas Ready")
    print()
    kubeconfig = cluster.kubeconfig
    print("Explore:")
    print(f"  export KUBECONFIG={kubeconfig} PATH={ROOT}/.cache/bin:$PATH")
    print("  kubectl get artifacts -A")
    print(f"  kubectl get pods -n {NAMESPACE} -o wide")
    print(f"  kubectl get pods -n {CNF_NAMESPACE} -o jsonpath='{{range .items[*]}}{{.spec.containers[*].image}}{{\"\\n\"}}{{end}}'")
    print("Stop everything: make demo-down")


# -- down ------------------------------------------------------------------------------------------


def down() -> int:
    try:
        cluster = Cluster.load()
    except OSError:
        stop_front()
        return 0
    for release, ns in ((CNF_RELEASE, CNF_NAMESPACE), (RELEASE, NAMESPACE)):
        try:
            cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "120s", timeout=180)
            say(f"uninstalled {release} from {ns}")
        except (CommandError, subprocess.TimeoutExpired) as e:
            say(f"{release}: {str(e).splitlines()[-1]}")
    for ns in (CNF_NAMESPACE, NAMESPACE):
        cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)
    stop_front()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    front = sub.add_parser("storefront")
    front.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "up":
        return up()
    if args.cmd == "down":
        return down()
    return run_front(args.port)


if __name__ == "__main__":
    sys.exit(main())
