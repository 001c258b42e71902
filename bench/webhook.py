#!/usr/bin/env python3
"""Benchmark of the pod mutating webhook: open-loop load at fixed rates over keep-alive TLS.

The webhook (`cluster-registry webhook --offline --rewrite-policy Always --workers N`: every image
is rewritten, no API server in the way; N workers, one per CPU, as the chart runs it) is driven by vegeta (`.cache/bin/vegeta`, from ci/toolchain), a
constant-rate load generator: its pacer releases request i at start + i/rate and starts another
worker rather than hold a request back, and latency runs from that release, so a slow server shows
up as latency instead of silently lowering the rate. The requests go over several keep-alive TLS
connections (HTTP/1.1, as the API server calls webhooks). Every answer is checked: status 200, the
request's own uid echoed, a patch. A Go generator, not a Python one, because on 2 shared cores a
Python client's own TLS work and pauses measured several milliseconds of p99 against a bare Go server.

Three servers take the same load, in turns at each rate so that all see the machine alike: the
webhook, and two floors that parse the review and answer a fixed patch: one on the webhook's own
server stack (aiohttp on uvloop, TLS), which is what any Python webhook pays here, and one a bare Go
net/http TLS server (`bench/webhook_floor.go`, built with the Go toolchain), which is what this
machine, its kernel and the load generator allow any webhook at all. Rates: 300 req/s for 30 s
(target p99 < 2 ms, and #20's: no worse than 1.1x the Go floor's in the same run) and 1,000 req/s
for 30 s (target p99 < 5 ms; 1.1x the Go floor); then a search for the webhook's
highest rate keeping p99 < 5 ms with no errors. If the local cluster is up, pods are also created
through the real API server against a second webhook process (URL-mode configuration rendered from
the chart) and the API server's own `apiserver_admission_webhook_admission_duration_seconds` for
that webhook is reported, beside the webhook's own latency, the TCP connections the API server
opened to it, and the same calls answered by the Go floor (what the API server adds to any webhook).
The memory of each webhook process (the supervisor and every worker: RSS, PSS) is reported after load.
With more than one worker, the same webhook as one process takes its turns too (under "floors",
``webhook_1_process``): what the workers change on this machine, in the same minutes.

The last line printed is one JSON object with every figure.
Options (environment): WEBHOOK_BENCH_SECONDS (30), WEBHOOK_BENCH_CONNECTIONS (8),
WEBHOOK_BENCH_SEARCH_SECONDS (10), WEBHOOK_BENCH_APISERVER_PODS (200), WEBHOOK_BENCH_WORKERS (CPUs).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "hooks"))

from cluster_registry.certs import pki
from tests.support.registry import cpu_seconds


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def memory_mib(pid: int) -> dict[str, Any]:
    """RSS and PSS (shared pages split among their users) of ``pid`` and each child, in MiB."""
    out: dict[str, Any] = {}
    for n, p in enumerate(tree(pid)):
        rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(Rss|Pss):\s+(.+)$", rollup, re.M)}
        out["supervisor" if n == 0 else f"worker_{n}"] = {k.lower() + "_mib": round(v / 1024, 1) for k, v in kib.items()}
    return out


def peers(port: int) -> set[str]:
    """Client ends of the TCP connections established to ``port`` right now."""
    listing = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in listing.splitlines() if line.strip()}

LOCAL = "cluster-registry.cluster-registry.svc:5000"
SECONDS = float(os.environ.get("WEBHOOK_BENCH_SECONDS", "30"))
CONNECTIONS = int(os.environ.get("WEBHOOK_BENCH_CONNECTIONS", "8"))
SEARCH_SECONDS = float(os.environ.get("WEBHOOK_BENCH_SEARCH_SECONDS", "10"))
APISERVER_PODS = int(os.environ.get("WEBHOOK_BENCH_APISERVER_PODS", "200"))
WORKERS = int(os.environ.get("WEBHOOK_BENCH_WORKERS", str(len(os.sched_getaffinity(0)))))
VEGETA = ROOT / ".cache" / "bin" / "vegeta"  # ci/toolchain installs it
REVIEWS = 1000  # distinct AdmissionReviews, sent round and round
UIDS = {f"bench-{i:08d}".encode() for i in range(REVIEWS)}
UID = re.compile(rb'"uid":\s*"(bench-\d{8})')


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def realistic_pod(i: int, namespace: str = "cnf") -> dict[str, Any]:
    """A Deployment-created pod: three containers and an init container, env, labels, probes, volumes."""
    env = [{"name": f"VAR_{k}", "value": f"value-{k}-{i % 7}"} for k in range(8)]
    env.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}})
    common = {
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    version = f"1.{i % 20}.0"
    containers = [
        {"name": "upf", "image": f"myacr.azurecr.io/cnf/upf:{version}", "ports": [{"containerPort": 8080, "protocol": "TCP"}],
         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10}, **common},
        {"name": "sidecar", "image": "nginx:1.27", **common},
        {"name": "metrics", "image": f"ghcr.io/acme/exporter@sha256:{'%064x' % (i % 13)}", **common},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "upf-7d9c6b5f8d-",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "upf", "app.kubernetes.io/instance": "cnf-a", "app.kubernetes.io/version": version,
                       "pod-template-hash": "7d9c6b5f8d", "tier": "data-plane"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "upf-7d9c6b5f8d",
                                 "uid": "0c8f7a52-1b8e-4c43-9d8e-2f3b9a6e1d01", "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "initContainers": [{"name": "init-config", "image": "busybox:1.36", "command": ["sh", "-c", "cp /src/* /etc/app/"], **common}],
            "containers": containers,
            "volumes": [{"name": "config", "emptyDir": {}},
                        {"name": "kube-api-access-x7k2p", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "upf", "imagePullSecrets": [{"name": "acr-pull"}], "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        },
    }


def review_body(i: int) -> bytes:
    pod = realistic_pod(i)
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": f"bench-{i:08d}-0000-4000-8000-000000000000", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                    "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": "cnf", "operation": "CREATE",
                    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
                    "object": pod, "oldObject": None, "dryRun": False,
                    "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}},
    }).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def floor_server(port: int, cert: str, key: str) -> None:
    """The floor: the webhook's server stack (aiohttp on uvloop, TLS) with a bare handler that only
    parses the review and answers a fixed patch. What any Python webhook pays on this machine."""
    import orjson
    import uvloop
    from aiohttp import web

    patch = base64.b64encode(b'[{"op":"replace","path":"/spec/containers/0/image","value":"x"}]').decode()

    async def mutate(request: web.Request) -> web.Response:
        uid = orjson.loads(await request.read())["request"]["uid"]
        return web.Response(body=orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
            "uid": uid, "allowed": True, "patchType": "JSONPatch", "patch": patch}}), content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, access_log=None, print=None,
                loop=uvloop.new_event_loop())


def start_webhook(tmp: Path, extra: list[str], env: dict[str, str] | None = None,
                  floor: str = "") -> tuple[subprocess.Popen[bytes], int, bytes]:
    """A webhook process on a free port with a fresh CA; ``floor``: "python" or "go" for a floor server."""
    now = dt.datetime.now(dt.timezone.utc)
    ca = pki.new_ca(now)
    crt, key = pki.new_serving(ca[0], ca[1], ["localhost"], now, ip_addresses=["127.0.0.1"])
    d = tmp / secrets.token_hex(3)
    d.mkdir()
    (d / "tls.crt").write_bytes(crt)
    (d / "tls.key").write_bytes(key)
    port = free_port()
    argv = [sys.executable, "-m", "cluster_registry", "--log-format", "json", "--log-level", "WARNING", "webhook",
            "--listen", f"127.0.0.1:{port}", "--tls-cert", str(d / "tls.crt"), "--tls-key", str(d / "tls.key"), *extra]
    if floor == "python":
        argv = [sys.executable, "-P", __file__, "--floor-server", str(port), str(d / "tls.crt"), str(d / "tls.key")]
    elif floor == "go":
        binary = tmp / "go-floor"
        if not binary.exists():
            subprocess.run(["go", "build", "-o", str(binary), str(ROOT / "bench" / "webhook_floor.go")], check=True, cwd=tmp)
        argv = [str(binary), f"127.0.0.1:{port}", str(d / "tls.crt"), str(d / "tls.key")]
    proc = subprocess.Popen(argv, stdout=(d / "log").open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    ctx = ssl.create_default_context(cadata=ca[0].decode())
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("webhook did not start:\n" + (d / "log").read_text())
            time.sleep(0.1)
    return proc, port, ca[0]


def write_targets(path: Path, port: int, bodies: list[bytes]) -> None:
    """vegeta's JSON targets: one POST /mutate per review, sent in this order, round and round."""
    with path.open("w") as f:
        for body in bodies:
            f.write(json.dumps({"method": "POST", "url": f"https://127.0.0.1:{port}/mutate?timeout=5s",
                                "header": {"Content-Type": ["application/json"], "Accept": ["application/json"]},
                                "body": base64.b64encode(body).decode()}) + "\n")


def attack(tmp: Path, targets: Path, ca: Path, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` requests/s for ``seconds`` from vegeta; every answer checked (200, a bench uid, a patch).

    (vegeta numbers results apart from picking targets, so an answer cannot be paired with its request
    here; the integration tests check that the uid echoed is the request's own.)"""
    results = tmp / "results.bin"
    subprocess.run([str(VEGETA), "attack", "-format=json", f"-targets={targets}", f"-rate={rate:g}", f"-duration={seconds:g}s",
                    f"-root-certs={ca}", f"-connections={CONNECTIONS}", f"-max-connections={CONNECTIONS}", "-http2=false",
                    "-timeout=5s", f"-output={results}"], check=True)
    encoded = subprocess.run([str(VEGETA), "encode", "--to", "csv", str(results)], check=True, capture_output=True).stdout
    latencies: list[float] = []
    stamps: list[int] = []
    errors, first = 0, ""
    # columns: timestamp ns, code, latency ns, bytes out, bytes in, error, body (base64), attack, seq, ...
    for row in csv.reader(io.StringIO(encoded.decode())):
        code, body = int(row[1]), base64.b64decode(row[6])
        stamps.append(int(row[0]))
        latencies.append(int(row[2]) / 1e9)
        uid = UID.search(body)
        if code != 200 or not uid or uid.group(1) not in UIDS or b'"patch"' not in body:
            errors += 1
            first = first or f"{code} {row[5]} {body[:200].decode(errors='replace')}"
    latencies.sort()

    def q(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    elapsed = (max(stamps) - min(stamps)) / 1e9 if len(stamps) > 1 else seconds
    return {"rate": rate, "seconds": seconds, "requests": len(latencies), "achieved_rps": round(len(latencies) / elapsed, 1),
            "errors": errors, "first_error": first, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99),
            "max_ms": round(latencies[-1] * 1000, 3)}


class Target:
    """A server under load: its process and what vegeta needs to reach it."""

    def __init__(self, tmp: Path, proc: subprocess.Popen[bytes], port: int, ca: bytes, bodies: list[bytes]) -> None:
        self.tmp, self.proc = tmp, proc
        self.ca = tmp / f"ca-{port}.pem"
        self.ca.write_bytes(ca)
        self.targets = tmp / f"targets-{port}.jsonl"
        write_targets(self.targets, port, bodies)

    def run(self, rate: float, seconds: float) -> dict[str, Any]:
        """One phase, with the server's CPU time per request."""
        cpu0 = tree_cpu_seconds(self.proc.pid)
        res = attack(self.tmp, self.targets, self.ca, rate, seconds)
        res["server_cpu_ms_per_request"] = round((tree_cpu_seconds(self.proc.pid) - cpu0) * 1000 / max(1, res["requests"]), 3)
        return res

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fixed_rates(targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """A warm-up each, then 300 and 1,000 requests/s, the servers taking turns at each rate (the
    first one rotating) so that all of them see the machine in the same state."""
    out: dict[str, dict[str, Any]] = {name: {} for name in targets}
    for target in targets.values():
        target.run(200, 3)
    names = list(targets)
    for n, (phase, rate) in enumerate((("at_300rps", 300), ("at_1000rps", 1000))):
        for name in names[n % len(names):] + names[:n % len(names)]:
            out[name][phase] = targets[name].run(rate, SECONDS)
            log(f"{name} {phase}: {json.dumps(out[name][phase])}")
    return out


def load_bench(tmp: Path) -> dict[str, Any]:
    bodies = [review_body(i) for i in range(REVIEWS)]
    targets: dict[str, Target] = {}
    try:
        offline = ["--offline", "--registry-host", LOCAL, "--rewrite-policy", "Always", "--workers", str(WORKERS)]
        targets["webhook"] = Target(tmp, *start_webhook(tmp, offline), bodies)
        if WORKERS > 1:  # the same webhook as one process, in the same turns: what the workers change here
            one = [*offline[:-1], "1"]
            targets["webhook_1_process"] = Target(tmp, *start_webhook(tmp, one), bodies)
        targets["floor_python"] = Target(tmp, *start_webhook(tmp, [], floor="python"), bodies)
        if shutil.which("go"):
            targets["floor_go"] = Target(tmp, *start_webhook(tmp, [], floor="go"), bodies)
        else:
            log("no go toolchain: the Go floor is skipped")
        hook = targets["webhook"]
        log(f"request body: {len(bodies[0])} bytes; webhook pid {hook.proc.pid}, {WORKERS} workers; {CONNECTIONS} TLS connections")
        rates = fixed_rates(targets)
        out: dict[str, Any] = dict(rates.pop("webhook"))
        out["floors"] = rates
        out["memory_mib"] = memory_mib(hook.proc.pid)

        def met(r: dict[str, Any]) -> bool:
            return bool(r["p99_ms"] < 5 and not r["errors"] and r["achieved_rps"] >= 0.97 * r["rate"])

        # The highest rate keeping p99 under 5 ms: upwards from the highest fixed rate that kept it,
        # else downwards, so the figure still says something on a machine that is busy right now.
        if met(out["at_1000rps"]):
            best, rates, upwards = 1000.0, [1500.0 + 500 * k for k in range(10)], True
        elif met(out["at_300rps"]):
            best, rates, upwards = 300.0, [500.0, 700.0, 850.0], True
        else:
            best, rates, upwards = 0.0, [200.0, 100.0, 50.0, 25.0], False
        search = []
        for rate in rates:
            res = hook.run(rate, SEARCH_SECONDS)
            log(f"search {rate:.0f} req/s: p99 {res['p99_ms']} ms, errors {res['errors']}, achieved {res['achieved_rps']}")
            search.append({k: res[k] for k in ("rate", "achieved_rps", "p50_ms", "p99_ms", "errors")})
            if met(res):
                best = rate
            if met(res) != upwards:
                break
        out["max_rate_p99_under_5ms"] = best
        out["search"] = search
        return out
    finally:
        for target in targets.values():
            target.stop()


def histogram(metrics: str, metric: str, webhook: str) -> dict[str, Any]:
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in metrics.splitlines():
        if not line.startswith(metric) or f'name="{webhook}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(metric + "_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            assert le
            buckets.append((float(le.group(1)), value))
        elif line.startswith(metric + "_sum"):
            total += value
        elif line.startswith(metric + "_count"):
            count += value
    merged: dict[float, float] = {}
    for le, v in buckets:
        merged[le] = merged.get(le, 0) + v
    cum = sorted(merged.items())

    def upper_bound(p: float) -> float | None:
        for le, v in cum:
            if count and v >= p * count:
                return le * 1000
        return None

    return {"count": int(count), "mean_ms": round(total / count * 1000, 3) if count else None,
            "p50_le_ms": upper_bound(0.5), "p99_le_ms": upper_bound(0.99),
            "buckets_ms": {str(le * 1000): int(v) for le, v in cum if le <= 0.1}}


def apiserver_bench(tmp: Path) -> dict[str, Any]:
    try:
        from tests.support.cluster import ENV_FILE, Cluster
    except ImportError as err:
        return {"skipped": f"no cluster helpers: {err}"}
    if not ENV_FILE.exists():
        return {"skipped": "local cluster not up"}
    cluster = Cluster.load()
    if not cluster.healthy():
        return {"skipped": "local cluster unhealthy"}
    out: dict[str, Any] = {}
    online = ["--registry-host", cluster.cluster_registry, "--rewrite-policy", "Always",
              "--kubeconfig", str(cluster.kubeconfig), "--no-leader-election"]
    # name, webhook arguments, floor, dry run: dry runs are admission alone; real pods (on the
    # simulated nodes) also feed the webhook's pod watch, which records their Artifacts
    for name, argv, floor, dry_run in (
        ("webhook", [*online, "--workers", str(WORKERS)], "", True),
        # no watches at all (nothing is Ready, Always rewrites anyway): what the watches cost
        ("webhook_offline", ["--offline", "--registry-host", cluster.cluster_registry, "--rewrite-policy", "Always",
                             "--workers", str(WORKERS)], "", True),
        ("webhook_real_pods", [*online, "--workers", str(WORKERS)], "", False),
        ("webhook_1_process_real_pods", [*online, "--workers", "1"], "", False),
        ("floor_python", [], "python", True),
        ("floor_go", [], "go", True),
    ):
        if floor == "go" and not shutil.which("go"):
            continue
        proc, port, ca = start_webhook(tmp, argv, {"KUBECONFIG": str(cluster.kubeconfig)}, floor=floor)
        try:
            out[name] = _apiserver_bench(cluster, port, ca, own_metrics=not floor, dry_run=dry_run)
            log(f"API server -> {name}: {json.dumps(out[name])}")
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def _apiserver_bench(cluster: Any, port: int, ca: bytes, own_metrics: bool, dry_run: bool) -> dict[str, Any]:
    """Pods created one after another through the real API server, which calls the webhook on
    ``port``: server dry runs (admission in full, nothing stored), or real pods on the simulated nodes."""
    from kubernetes import client

    ns = f"bench-webhook-{secrets.token_hex(3)}"
    hook_name = f"bench-{secrets.token_hex(3)}.clusterregistry.io"
    v = "global.networkfunctionextension.webhook"
    rendered = cluster.helm("template", "bench", str(ROOT / "chart"), "--namespace", "cluster-registry-bench", "--kube-version", "1.35.4",
                            "--show-only", "templates/webhook/mutatingwebhookconfiguration.yaml",
                            "--set", f"{v}.url=https://127.0.0.1:{port}/mutate",
                            "--set", f"{v}.caBundle={base64.b64encode(ca).decode()}",
                            "--set", "global.networkfunctionextension.registryTLS.enabled=false",  # it needs the in-cluster webhook
                            "--set-string", f"{v}.pod.mutation.matchConditionExpression=request.namespace == '{ns}'")
    import yaml

    mwc = yaml.safe_load(rendered)
    mwc["metadata"]["name"] = hook_name
    mwc["webhooks"][0]["name"] = hook_name  # its own metric series, apart from other tests' webhooks
    try:
        cluster.kubectl("create", "namespace", ns)
        cluster.apply(mwc)
        deadline = time.monotonic() + 60
        while not cluster.kubectl("get", "serviceaccount", "default", "-n", ns, "--ignore-not-found").strip():
            if time.monotonic() > deadline:
                return {"skipped": "no default service account"}
            time.sleep(0.5)
        core = client.CoreV1Api(cluster.api_client())
        time.sleep(3)
        deadline = time.monotonic() + 60
        while True:  # wait until the API server calls the webhook
            probe = core.create_namespaced_pod(ns, client.V1Pod(metadata=client.V1ObjectMeta(name="probe"), spec=client.V1PodSpec(
                containers=[client.V1Container(name="c", image="nginx:1.27")])), dry_run="All")
            if probe.spec.containers[0].image != "nginx:1.27":  # rewritten (or the floor's "x")
                break
            if time.monotonic() > deadline:
                return {"skipped": "the API server never called the bench webhook"}
            time.sleep(1)
        seen: list[set[str]] = []
        t0 = time.monotonic()
        for i in range(APISERVER_PODS):
            pod = realistic_pod(i, ns)
            del pod["metadata"]["ownerReferences"], pod["metadata"]["generateName"]
            pod["metadata"]["name"] = f"upf-{i:04d}"
            pod["spec"]["serviceAccountName"] = "default"
            pod["spec"]["volumes"] = pod["spec"]["volumes"][:1]
            for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
                c["volumeMounts"] = c["volumeMounts"][:1]
            if not dry_run:
                pod["spec"]["nodeSelector"] = {"kubernetes.azure.com/mode": "user"}  # kwok's: nothing pulls
            created = core.create_namespaced_pod(ns, pod, dry_run="All" if dry_run else None)
            assert created.spec.containers[0].image != pod["spec"]["containers"][0]["image"], created.spec.containers[0].image
            seen.append(peers(port))
        elapsed = time.monotonic() - t0
        metrics = cluster.kubectl("get", "--raw", "/metrics", timeout=60)
        res = histogram(metrics, "apiserver_admission_webhook_admission_duration_seconds", hook_name)
        # the API server's connections to the webhook, sampled after each call: one, open at every
        # sample, is one kept-alive connection reused (no handshake per call)
        res.update(pods=APISERVER_PODS, client_pods_per_s=round(APISERVER_PODS / elapsed, 1),
                   apiserver_connections=len(set().union(*seen)), calls_with_a_connection_open=sum(1 for c in seen if c))
        if not own_metrics:
            return res
        # The webhook's own view of the same calls: the rest of the API server's figure is its side
        # (encoding, the HTTP client, applying the patch) and the CPU it shares with everything else.
        ctx = ssl.create_default_context(cadata=ca.decode())
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=10) as r:  # noqa: S310
            own = dict(re.findall(r"^cluster_registry_webhook_request_duration_seconds_(sum|count) (\S+)$", r.read().decode(), re.M))
        res["webhook_own_mean_ms"] = round(float(own["sum"]) / float(own["count"]) * 1000, 3) if float(own.get("count", 0)) else None
        return res
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", hook_name, "--ignore-not-found", timeout=60)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", timeout=60)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        load = load_bench(Path(tmp))
        api = apiserver_bench(Path(tmp))
    go = load["floors"].get("floor_go")
    figures = {
        "benchmark": "webhook",
        "connections": CONNECTIONS,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg()[0],
        "at_300rps": load["at_300rps"],
        "at_1000rps": load["at_1000rps"],
        "max_rate_p99_under_5ms": load["max_rate_p99_under_5ms"],
        "floors": load["floors"],
        "search": load["search"],
        "workers": WORKERS,
        "memory_mib": load["memory_mib"],
        "p99_vs_floor_go": {
            phase: round(load[phase]["p99_ms"] / go[phase]["p99_ms"], 2) for phase in ("at_300rps", "at_1000rps")
        } if go else None,
        # by the webhook, and (is the target within this machine's reach at all?) by each floor
        "targets_met": {
            name: {
                "300rps_p99_under_2ms": r["at_300rps"]["p99_ms"] < 2 and not r["at_300rps"]["errors"],
                "1000rps_p99_under_5ms": r["at_1000rps"]["p99_ms"] < 5 and not r["at_1000rps"]["errors"],
                **({"p99_within_1.1x_floor_go": all(
                    r[ph]["p99_ms"] <= 1.1 * go[ph]["p99_ms"] and not r[ph]["errors"] for ph in ("at_300rps", "at_1000rps"))}
                   if go else {}),
            }
            for name, r in {"webhook": load, **load["floors"]}.items()
        },
        "apiserver_admission_webhook_admission_duration": api,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor-server"]:
        floor_server(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
