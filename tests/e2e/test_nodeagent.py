"""The node agent really runs pods of the project's images on the system nodes (issue 8).

The pods here use the project's Python image name, so the agent runs them as local processes in
their own network namespace; their program is a small HTTP server (mounted from a ConfigMap) that
reports what it sees: env from the downward API/ConfigMaps/Secrets, files, its identity at the API
server (the in-cluster config: KUBERNETES_SERVICE_HOST and the projected token), and Services by DNS.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.cluster import Cluster, wait_for

IMAGE = "ghcr.io/cluster-registry/cluster-registry:e2e"
AGENT_ANNOTATION = "localcluster.clusterregistry.io/agent"

SERVER = r'''
import http.server, json, os, signal, sys, time, urllib.request

state = {"ready": os.environ.get("START_READY") == "1", "live": True}
mode = os.environ.get("TERM_MODE", "exit")

def on_term(signum, frame):
    print("got SIGTERM", flush=True)
    if mode == "exit":
        sys.exit(0)

signal.signal(signal.SIGTERM, on_term)

def api_identity():
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    config.load_incluster_config()
    api = client.ApiClient()
    review = client.AuthenticationV1Api(api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
    try:
        client.CoreV1Api(api).list_namespaced_config_map(ns)
        allowed = True
    except ApiException as e:
        allowed = e.status
    return {"user": review.status.user_info.username, "listConfigMaps": allowed}

class H(http.server.BaseHTTPRequestHandler):
    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ready":
            return self.reply(200 if state["ready"] else 503)
        if self.path == "/live":
            return self.reply(200 if state["live"] else 500)
        if self.path == "/info":
            files = {}
            for d in ("/etc/demo", "/var/run/secrets/kubernetes.io/serviceaccount"):
                for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                    if not f.startswith("."):
                        files[f"{d}/{f}"] = open(f"{d}/{f}").read()[:200]
            info = {"env": dict(os.environ), "files": files, "uid": os.getuid(), "pid": os.getpid(),
                    "hostname": __import__("socket").gethostname()}
            try:
                info["api"] = api_identity()
            except Exception as e:
                info["api"] = {"error": repr(e)}
            return self.reply(200, json.dumps(info).encode())
        if self.path.startswith("/fetch/"):
            url = "http://" + self.path[len("/fetch/"):]
            try:
                body = urllib.request.urlopen(url, timeout=5).read()
                return self.reply(200, body)
            except Exception as e:
                return self.reply(502, repr(e).encode())
        if self.path == "/whoami":
            return self.reply(200, os.environ.get("POD_NAME", "?").encode())
        self.reply(404)

    def do_POST(self):
        if self.path == "/ready":
            state["ready"] = not state["ready"]
        elif self.path == "/live":
            state["live"] = False
        self.reply(204)

    def log_message(self, *a):
        pass

print("serving", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
'''


def demo_pod(name: str, namespace: str, *, labels: dict[str, str] | None = None, env: list[dict[str, Any]] | None = None,
             readiness: bool = True, liveness: dict[str, Any] | None = None, grace: int = 30,
             service_account: str = "default") -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "server",
        "image": IMAGE,
        "command": ["python", "/app/server.py"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            *(env or []),
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "volumeMounts": [{"name": "app", "mountPath": "/app", "readOnly": True},
                         {"name": "demo", "mountPath": "/etc/demo", "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }
    if readiness:
        container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1,
                                       "failureThreshold": 1}
    if liveness:
        container["livenessProbe"] = liveness
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.azure.com/mode": "system"},
            "serviceAccountName": service_account,
            "terminationGracePeriodSeconds": grace,
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
            "containers": [container],
            "volumes": [
                {"name": "app", "configMap": {"name": "demo-app"}},
                {"name": "demo", "projected": {"sources": [
                    {"configMap": {"name": "demo-config"}},
                    {"secret": {"name": "demo-secret"}},
                    {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                ]}},
            ],
        },
    }


def setup_demo(cluster: Cluster, namespace: str) -> None:
    cluster.apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-app", "namespace": namespace},
         "data": {"server.py": SERVER}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-config", "namespace": namespace},
         "data": {"greeting": "hello from a configmap"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-secret", "namespace": namespace},
         "stringData": {"password": "s3cr3t"}},
    ])


def pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.kubectl_json("get", "pod", name, "-n", namespace)
    return obj


def is_ready(p: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))


def http(method: str, url: str, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - a pod IP on this machine
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def wait_running(cluster: Cluster, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        p = pod(cluster, namespace, name)
        statuses = p["status"].get("containerStatuses") or []
        if p["status"].get("phase") == "Running" and statuses and all("running" in s["state"] for s in statuses):
            return p
        return None

    return wait_for(running, timeout=timeout, what=f"{namespace}/{name} running")


def test_agent_owns_the_system_nodes(cluster: Cluster) -> None:
    nodes = cluster.kubectl_json("get", "nodes", "-l", "kubernetes.azure.com/mode=system")["items"]
    assert len(nodes) == 3
    for n in nodes:
        assert n["metadata"]["annotations"].get(AGENT_ANNOTATION) == "process"
        assert "kwok.x-k8s.io/node" not in n["metadata"]["annotations"]
        assert n["status"]["nodeInfo"]["containerRuntimeVersion"] == "process://nodeagent"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])


def test_pod_runs_with_env_volumes_and_its_service_account(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": namespace}},
        demo_pod("info", namespace, service_account="reader", readiness=False, env=[
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "demo-config", "key": "greeting"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "demo-secret", "key": "password"}}},
            {"name": "COMPOSED", "value": "$(POD_NAME)-in-$(NODE)"},
        ]),
    ])
    p = wait_running(cluster, namespace, "info")
    status = p["status"]
    assert status["containerStatuses"][0]["containerID"].startswith("process://")
    ip = status["podIP"]
    code, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(http("GET", f"http://{ip}:8080/info", 15)),
                          timeout=30, what="the pod's HTTP server")
    info = json.loads(body)
    env = info["env"]
    assert env["POD_NAME"] == "info"
    assert env["POD_IP"] == ip
    assert env["NODE"] == p["spec"]["nodeName"]
    assert env["GREETING"] == "hello from a configmap"
    assert env["PASSWORD"] == "s3cr3t"
    assert env["COMPOSED"] == f"info-in-{p['spec']['nodeName']}"
    assert info["uid"] == 65532
    assert info["hostname"] == "info"  # the pod's own UTS namespace
    files = info["files"]
    assert files["/etc/demo/greeting"] == "hello from a configmap"
    assert files["/etc/demo/password"] == "s3cr3t"
    assert 'app="info"' in files["/etc/demo/labels"]
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert files[f"{sa}/namespace"] == namespace
    assert files[f"{sa}/ca.crt"].startswith("-----BEGIN CERTIFICATE-----")
    # The process talks to the API server as its ServiceAccount, and RBAC applies: no Role, no list.
    assert info["api"]["user"] == f"system:serviceaccount:{namespace}:reader", info["api"]
    assert info["api"]["listConfigMaps"] == 403

    cluster.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-cm", "namespace": namespace},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "read-cm", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]},
    ])

    def allowed() -> bool:
        return bool(json.loads(http("GET", f"http://{ip}:8080/info", 15)[1])["api"]["listConfigMaps"] is True)

    wait_for(allowed, timeout=30, what="the Role to take effect for the pod's token")


def test_readiness_probe_drives_ready_and_endpoints(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply([
        demo_pod("ready", namespace, labels={"app": "ready"}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ready", "namespace": namespace},
         "spec": {"selector": {"app": "ready"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    ])
    p = wait_running(cluster, namespace, "ready")
    ip = p["status"]["podIP"]
    time.sleep(3)
    assert not is_ready(pod(cluster, namespace, "ready")), "ready before its probe succeeded"
    assert http("POST", f"http://{ip}:8080/ready")[0] == 204
    wait_for(lambda: is_ready(pod(cluster, namespace, "ready")), timeout=20, what="Ready after the probe passes")

    def endpoint_ready() -> bool:
        slices = cluster.kubectl_json("get", "endpointslices", "-n", namespace,
                                      "-l", "kubernetes.io/service-name=ready")["items"]
        return any(e["addresses"] == [ip] and e["conditions"].get("ready") for s in slices
                   for e in s.get("endpoints") or [])

    wait_for(endpoint_ready, timeout=20, what="the pod IP as a ready endpoint")
    assert http("POST", f"http://{ip}:8080/ready")[0] == 204
    wait_for(lambda: not is_ready(pod(cluster, namespace, "ready")), timeout=20, what="NotReady after the probe fails")


def test_services_resolve_by_name_inside_pods(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply([
        demo_pod("backend", namespace, labels={"app": "backend"}, env=[{"name": "START_READY", "value": "1"}]),
        demo_pod("client", namespace, labels={"app": "client"}, env=[{"name": "START_READY", "value": "1"}]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": namespace},
         "spec": {"selector": {"app": "backend"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}},
    ])
    client_ip = wait_running(cluster, namespace, "client")["status"]["podIP"]
    wait_running(cluster, namespace, "backend")
    for name in ("backend", f"backend.{namespace}", f"backend.{namespace}.svc",
                 f"backend.{namespace}.svc.cluster.local"):
        code, body = wait_for(
            lambda n=name: (lambda r: r if r[0] == 200 else None)(http("GET", f"http://{client_ip}:8080/fetch/{n}/whoami", 15)),
            timeout=30, what=f"client -> {name}")
        assert body == b"backend"


def test_liveness_failure_restarts_with_backoff(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply(demo_pod("live", namespace, env=[{"name": "START_READY", "value": "1"}], liveness={
        "httpGet": {"path": "/live", "port": "http"}, "periodSeconds": 1, "failureThreshold": 2}))
    ip = wait_running(cluster, namespace, "live")["status"]["podIP"]
    wait_for(lambda: http("GET", f"http://{ip}:8080/live")[0] == 200, timeout=30, what="server up")
    first_id = pod(cluster, namespace, "live")["status"]["containerStatuses"][0]["containerID"]
    assert http("POST", f"http://{ip}:8080/live")[0] == 204  # from now on /live answers 500
    t0 = time.monotonic()

    def restarted() -> dict[str, Any] | None:
        s = pod(cluster, namespace, "live")["status"]["containerStatuses"][0]
        return s if s["restartCount"] >= 1 and "running" in s["state"] else None

    s = wait_for(restarted, timeout=60, what="the container restarted")
    elapsed = time.monotonic() - t0
    assert s["containerID"] != first_id
    assert s["lastState"]["terminated"]["reason"] == "LivenessProbeFailed"
    assert elapsed >= 10, f"restarted after {elapsed:.1f}s: no back-off"
    # The new process starts healthy; the pod becomes Ready again.
    wait_for(lambda: is_ready(pod(cluster, namespace, "live")), timeout=30, what="Ready after the restart")


def test_delete_sends_sigterm_then_sigkill_after_grace(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply([
        demo_pod("stubborn", namespace, env=[{"name": "TERM_MODE", "value": "ignore"}], grace=4, readiness=False),
        demo_pod("polite", namespace, env=[{"name": "TERM_MODE", "value": "exit"}], grace=30, readiness=False),
    ])
    ips = {n: wait_running(cluster, namespace, n)["status"]["podIP"] for n in ("stubborn", "polite")}
    pids = {}
    for n, ip in ips.items():
        _, body = wait_for(lambda ip=ip: (lambda r: r if r[0] == 200 else None)(http("GET", f"http://{ip}:8080/info", 15)),
                           timeout=30, what=f"{n} serving")
        pids[n] = json.loads(body)["pid"]
        assert os.path.exists(f"/proc/{pids[n]}")

    def gone(name: str) -> bool:
        return not cluster.kubectl_json("get", "pods", "-n", namespace, "--field-selector", f"metadata.name={name}")["items"]

    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "polite", "-n", namespace, "--wait=false")
    wait_for(lambda: gone("polite"), timeout=20, what="polite pod gone")
    assert time.monotonic() - t0 < 10, "a process that exits on SIGTERM must not wait for the grace period"
    assert not os.path.exists(f"/proc/{pids['polite']}")

    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_for(lambda: gone("stubborn"), timeout=30, what="stubborn pod gone")
    elapsed = time.monotonic() - t0
    assert elapsed >= 3.5, f"gone after {elapsed:.1f}s: the 4s grace period was not honoured"
    assert not os.path.exists(f"/proc/{pids['stubborn']}"), "SIGKILL did not follow"


@pytest.mark.parametrize(("exit_code", "condition"), [(0, "Complete"), (3, "Failed")])
def test_job_pods_end_by_exit_code(cluster: Cluster, namespace: str, exit_code: int, condition: str) -> None:
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "exit", "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"kubernetes.azure.com/mode": "system"},
                "containers": [{"name": "main", "image": IMAGE,
                                "command": ["python", "-c", f"print('exiting {exit_code}'); raise SystemExit({exit_code})"]}],
            }},
        },
    }
    cluster.apply(job)

    def finished() -> str | None:
        j = cluster.kubectl_json("get", "job", "exit", "-n", namespace)
        for c in j.get("status", {}).get("conditions") or []:
            if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                return str(c["type"])
        return None

    assert wait_for(finished, timeout=90, what="the Job to finish") == condition
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=exit")["items"]
    assert pods
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == exit_code
    assert pods[0]["status"]["phase"] == ("Succeeded" if exit_code == 0 else "Failed")
    assert f"exiting {exit_code}" in cluster.pod_logs(namespace, pods[0]["metadata"]["name"], "main")


def test_kubectl_logs_reach_the_agent(cluster: Cluster, namespace: str) -> None:
    setup_demo(cluster, namespace)
    cluster.apply(demo_pod("logs", namespace, readiness=False))
    wait_running(cluster, namespace, "logs")
    out = wait_for(lambda: cluster.kubectl("logs", "logs", "-n", namespace, "-c", "server", check=False),
                   timeout=30, what="kubectl logs")
    assert "serving" in out


def test_other_images_are_simulated(cluster: Cluster, namespace: str) -> None:
    pods = []
    for pool in ("system", "user"):
        pods.append({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"cnf-{pool}", "namespace": namespace},
            "spec": {"nodeSelector": {"kubernetes.azure.com/mode": pool},
                     "containers": [{"name": "cnf", "image": "myacr.azurecr.io/sample-cnf:1.0.0"}]},
        })
    cluster.apply(pods)
    for pool in ("system", "user"):
        p = wait_for(lambda pool=pool: (lambda x: x if is_ready(x) else None)(pod(cluster, namespace, f"cnf-{pool}")),
                     timeout=60, what=f"simulated pod on the {pool} pool Ready")
        cid = p["status"]["containerStatuses"][0].get("containerID", "")
        assert not cid.startswith("process://"), cid
