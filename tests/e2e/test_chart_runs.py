"""Issue 8: `helm install` of chart/ runs the chart's own containers for real on the local cluster.

The real system nodes (ci/localnodes.py: kubelet, containerd, runc) run every pod of the project's
image and of the distribution image as containers, with the chart's command, args, env,
ConfigMaps, Secrets, volumes, probes and ServiceAccount token. So each test here fails on the
mistakes only a cluster shows: RBAC, Service ports and names, the webhook's caBundle, probes, mounts.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import (
    Cluster, CommandError, adopt_crds, component_pods, exclusive_chart, pod_ready, three_ready, wait_for,
)
from tests.support.ociimages import HTTPError, Pusher, push_image

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
VALUES = "global.networkfunctionextension"


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def prefix(self) -> str:
        return f"{self.name}-cluster-registry"


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    # a pod IP is not the registry certificate's name (registryTLS): TLS without verification here
    context = ssl._create_unverified_context() if url.startswith("https://") else None  # noqa: S323
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:  # noqa: S310 - pod IPs on this machine
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    """The chart installed with its default values (HA on) and `--wait --wait-for-jobs`, except that the
    system pool is required rather than preferred: the user nodes are kwok-simulated, and a replacement
    registry pod the scheduler put on one (which the soft preference allows) would be Ready without
    running (a CI run once failed that way, dialling a kwok pod IP)."""
    rel = Release(f"cr{secrets.token_hex(2)}", f"e2e-chart-runs-{secrets.token_hex(3)}")
    with exclusive_chart():
        cluster.kubectl("create", "namespace", rel.namespace)
        adopt_crds(cluster, rel.name, rel.namespace)
        try:
            cluster.helm("install", rel.name, str(CHART), "-n", rel.namespace, "--wait", "--wait-for-jobs",
                         "--set", f"{VALUES}.systemPool.required=true", "--timeout", "480s", timeout=540)
            yield rel
        finally:
            cluster.helm("uninstall", rel.name, "-n", rel.namespace, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", rel.namespace, "--wait=false", check=False)


def test_default_install_runs_the_chart_containers_for_real(cluster: Cluster, release: Release) -> None:
    status = json.loads(cluster.helm("status", release.name, "-n", release.namespace, "-o", "json"))
    assert status["info"]["status"] == "deployed"
    # Hook Jobs ran their real command and succeeded (helm waited on them).
    hooks = {h["name"].removeprefix(f"{release.prefix}-"): h["last_run"]["phase"] for h in status.get("hooks", [])}
    assert hooks.get("validate") == "Succeeded", hooks

    system = {n["metadata"]["name"] for n in cluster.kubectl_json(
        "get", "nodes", "-l", "kubernetes.azure.com/mode=system")["items"]}
    for component in ("registry", "webhook"):
        pods = three_ready(cluster, release.namespace, component)
        assert {p["spec"]["nodeName"] for p in pods} == system, f"{component}: one replica per system node"
        for p in pods:
            for cs in p["status"]["containerStatuses"]:
                assert cs["containerID"].startswith("containerd://"), (component, cs)
                assert cs["ready"] and "running" in cs["state"]
    for component in ("artifact-reconciler", "component-reconciler"):
        pods = wait_for(lambda c=component: [p for p in component_pods(cluster, release.namespace, c) if pod_ready(p)],
                        timeout=120, what=f"{component} Ready")
        assert pods[0]["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")

    # The registry container is the distribution binary with the chart's config (auth: token), the token
    # service beside it; distribution's debug listener answers on the pod's loopback only.
    pod = component_pods(cluster, release.namespace, "registry")[0]
    ip = pod["status"]["podIP"]
    code, _ = http_get(f"https://{ip}:5002/readyz")
    assert code == 200, "distribution's health, relayed by the token service"
    code, body = http_get(f"https://{ip}:5002/metrics")
    assert code == 200 and b"registry_" in body and b"cluster_registry_token_requests" in body
    for path in ("/debug/pprof/", "/debug/vars"):
        assert http_get(f"https://{ip}:5002{path}")[0] == 404
        with pytest.raises(OSError):
            http_get(f"http://{ip}:5001{path}", timeout=3)  # loopback only: refused from outside the pod
    code, _ = http_get(f"https://{ip}:5000/v2/")
    assert code == 401, "every request needs a token"
    # registryAccess isolated (the default): an anonymous caller's token grants no pull
    assert Pusher(f"{ip}:5000").request("GET", "/v2/e2e/any/tags/list", "e2e/any")[0] == 401
    logs = cluster.pod_logs(release.namespace, pod["metadata"]["name"], "registry")
    assert "listening on [::]:5000" in logs and "debug server listening 127.0.0.1:5001" in logs


def registry_credentials(cluster: Cluster, release: Release) -> tuple[str, str]:
    secret = cluster.kubectl_json("get", "secret", "-n", release.namespace, f"{release.prefix}-registry-push-artifact-reconciler")
    creds = yaml.safe_load(base64.b64decode(secret["data"]["credentials.yaml"]))
    return str(creds["username"]), str(creds["password"])


def test_three_registry_replicas_share_one_volume(cluster: Cluster, release: Release) -> None:
    pods = three_ready(cluster, release.namespace, "registry")
    user, password = registry_credentials(cluster, release)
    first, *others = [p["status"]["podIP"] for p in pods]
    # Writes need the reconciler's credential at the token service: anonymous and wrong ones are refused with 401.
    for auth in (None, (user, password + "x")):
        with pytest.raises(HTTPError) as refused:
            push_image(Pusher(f"{first}:5000", auth=auth), "e2e/shared", "v1", layers=[4096], seed=11)
        assert refused.value.status == 401, refused.value
    image = push_image(Pusher(f"{first}:5000", auth=(user, password)), "e2e/shared", "v1", layers=[1 << 20, 4096], seed=11)
    accept = {"Accept": image.media_type}
    for ip in others:  # read with the reconciler's credential (isolated: anonymous callers pull nothing)
        code, _, body = Pusher(f"{ip}:5000", auth=(user, password)).request("GET", "/v2/e2e/shared/manifests/v1", "e2e/shared",
                                                                            headers=accept)
        assert code == 200 and body == image.manifest, f"replica {ip} does not see the pushed manifest"
    claims = {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert len(claims) == 1
    pvc = cluster.kubectl_json("get", "pvc", "-n", release.namespace, claims.pop())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_webhook_is_called_through_its_service_with_the_chart_ca(cluster: Cluster, release: Release,
                                                                  namespace: str) -> None:
    config = cluster.kubectl_json("get", "mutatingwebhookconfiguration", f"{release.prefix}-webhook")
    hook = config["webhooks"][0]
    assert "url" not in hook["clientConfig"]
    service = hook["clientConfig"]["service"]
    assert service["namespace"] == release.namespace
    ca_bundle = base64.b64decode(hook["clientConfig"]["caBundle"])

    # The serving certificate of every replica verifies against that caBundle for the Service's name.
    ctx = ssl.create_default_context(cadata=ca_bundle.decode())
    for p in three_ready(cluster, release.namespace, "webhook"):
        port = next(cp["containerPort"] for c in p["spec"]["containers"] for cp in c.get("ports", [])
                    if cp.get("name") == "https")
        with socket.create_connection((p["status"]["podIP"], port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"{service['name']}.{service['namespace']}.svc") as tls:
                assert tls.version()

    # The API server calls it (through the Service, at the endpoints' pod IPs) for a pod elsewhere.
    image = "myacr.azurecr.io/e2e/cnf:1.0.0"
    cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cnf", "namespace": namespace},
                   "spec": {"nodeSelector": {"kubernetes.azure.com/mode": "user"},
                            "containers": [{"name": "cnf", "image": image}]}})
    artifacts = wait_for(
        lambda: [a for a in cluster.kubectl_json("get", "artifacts", "-n", namespace)["items"]
                 if a["spec"]["sourceArtifact"] == image],
        timeout=60, what="the webhook's Artifact for the pod's image")
    assert artifacts[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cluster-registry"
    logs = "".join(cluster.pod_logs(release.namespace, p["metadata"]["name"], "webhook")
                   for p in component_pods(cluster, release.namespace, "webhook"))
    assert image in logs


def test_hook_job_exit_code_decides_the_install(cluster: Cluster, release: Release) -> None:
    """validate (pre-install hook) really runs against the cluster: a missing StorageClass fails it."""
    name, ns = f"bad{secrets.token_hex(2)}", f"e2e-chart-bad-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    try:
        adopt_crds(cluster, name, ns)
        with pytest.raises(CommandError) as failed:
            cluster.helm("install", name, str(CHART), "-n", ns, "--wait", "--timeout", "240s",
                         "--set", f"{VALUES}.clusterRegistry.storageClassName=e2e-no-such-class", timeout=300)
        assert "invalid ownership metadata" not in str(failed.value), "another release took the CRDs"
        assert "validate" in str(failed.value) and "BackoffLimitExceeded" in str(failed.value), failed.value
        # The Job's pods (deleted with the failed hook) really ran `cluster-registry validate`.
        logs = {k: v for k, v in cluster.namespace_logs(ns).items() if "validate" in k}
        assert logs, "no validate container ran"
        assert all("e2e-no-such-class" in text and "refusing" in text for text in logs.values()), logs
        # Nothing but the hook ran: no workload of the failed release exists.
        assert not cluster.kubectl("get", "deployments", "-n", ns, "-o", "name").strip()
    finally:
        cluster.helm("uninstall", name, "-n", ns, "--timeout", "60s", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        adopt_crds(cluster, release.name, release.namespace)


def test_registry_pod_killed_mid_push_is_replaced_and_the_copy_completes(cluster: Cluster, release: Release,
                                                                         namespace: str) -> None:
    assert cluster.artifact_store_in_cluster, "env file lacks LOCALCLUSTER_ARTIFACT_STORE_IN_CLUSTER"
    cluster.helm("upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values", "--wait",
                 "--timeout", "300s", "--set-json",
                 f'{VALUES}.artifactReconciler.insecureRegistries=["{cluster.artifact_store_in_cluster}"]',
                 timeout=360)
    three_ready(cluster, release.namespace, "registry")

    def rolled() -> bool:  # every reconciler pod, terminating ones included (one may hold the lease)
        pods = cluster.kubectl_json("get", "pods", "-n", release.namespace,
                                    "-l", "app.kubernetes.io/component=artifact-reconciler")["items"]
        return bool(pods) and all(pod_ready(p) and "--insecure-registry" in p["spec"]["containers"][0]["args"]
                                  for p in pods)

    wait_for(rolled, timeout=180, what="the reconciler rolled with --insecure-registry")

    # A large-ish image in the artifact store (the remote registry), pulled with a pull secret.
    store = Pusher(cluster.artifact_store, auth=(cluster.artifact_store_user, cluster.artifact_store_password))
    image = push_image(store, "e2e/big", "v1", layers=[48 << 20, 48 << 20, 48 << 20], seed=int(time.time()))
    auth = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
    dockercfg = {"auths": {cluster.artifact_store_in_cluster: {"auth": auth}}}
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                   "metadata": {"name": "store-pull", "namespace": namespace},
                   "data": {".dockerconfigjson": base64.b64encode(json.dumps(dockercfg).encode()).decode()}})
    source = f"{cluster.artifact_store_in_cluster}/e2e/big:v1"
    cluster.apply({"apiVersion": "clusterregistry.io/v1alpha1", "kind": "Artifact",
                   "metadata": {"name": "big", "namespace": namespace},
                   "spec": {"sourceArtifact": source, "pullSecrets": ["store-pull"]}})

    # Kill a registry pod as soon as blob data lands in the shared volume (the push is under way).
    pvc_name = next(v["persistentVolumeClaim"]["claimName"]
                    for v in component_pods(cluster, release.namespace, "registry")[0]["spec"]["volumes"]
                    if "persistentVolumeClaim" in v)
    pv = cluster.kubectl_json("get", "pv", cluster.kubectl_json(
        "get", "pvc", "-n", release.namespace, pvc_name)["spec"]["volumeName"])
    uploads = Path(pv["spec"]["hostPath"]["path"]) / "docker" / "registry" / "v2" / "repositories"
    wait_for(lambda: any(uploads.glob("*/e2e/big/_uploads/*")), timeout=120, interval=0.05,
             what="an upload in progress in the registry volume")
    victim = component_pods(cluster, release.namespace, "registry")[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", "-n", release.namespace, victim, "--grace-period=0", "--force")
    phase_during = cluster.kubectl_json("get", "artifact", "big", "-n", namespace).get("status", {}).get("phase")

    # The reconciler retries what failed (a Failed phase is not final), so wait for Ready.
    done = wait_for(
        lambda: (lambda a: a if a.get("status", {}).get("phase") == "Ready" else None)(
            cluster.kubectl_json("get", "artifact", "big", "-n", namespace)),
        timeout=300, interval=2, what="the Artifact to be copied (Ready)")
    assert done["status"]["digest"] == image.digest
    assert phase_during != "Ready", "the registry pod was killed only after the copy had finished"
    # The replacement pod came up and the Deployment is whole again.
    pods = three_ready(cluster, release.namespace, "registry")
    assert victim not in {p["metadata"]["name"] for p in pods}
    # Every replica serves the copied image, byte-exact (to the reconciler's credential: isolated access
    # serves anonymous callers nothing).
    local = done["status"]["localArtifact"]
    repo = local.split("/", 1)[1].rsplit("@", 1)[0].rsplit(":", 1)[0]
    for p in pods:
        code, _, body = Pusher(f"{p['status']['podIP']}:5000", auth=registry_credentials(cluster, release)).request(
            "GET", f"/v2/{repo}/manifests/{image.digest}", repo, headers={"Accept": image.media_type})
        assert code == 200 and body == image.manifest


def test_gc_cronjob_runs_for_real(cluster: Cluster, release: Release) -> None:
    """A Job from the GC CronJob runs `cluster-registry gc --once` in the cluster and completes."""
    # Something to mark: an image pushed with the reconciler's credential (GC over a registry that never stored
    # anything is a separate case: `registry garbage-collect` exits 1 on the missing repositories/).
    pods = three_ready(cluster, release.namespace, "registry")
    user, password = registry_credentials(cluster, release)
    push_image(Pusher(f"{pods[0]['status']['podIP']}:5000", auth=(user, password)), "e2e/gc", "v1",
               layers=[8192], seed=21)
    job = f"gc-e2e-{secrets.token_hex(2)}"
    cluster.kubectl("create", "job", job, "-n", release.namespace, f"--from=cronjob/{release.prefix}-gc")

    def finished() -> str | None:
        j = cluster.kubectl_json("get", "job", job, "-n", release.namespace)
        for c in j.get("status", {}).get("conditions") or []:
            if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                return str(c["type"])
        return None

    outcome = wait_for(finished, timeout=240, interval=2, what="the GC Job to finish")
    logs = {k: v for k, v in cluster.namespace_logs(release.namespace).items() if k.startswith(f"{job}-")}
    # (This once failed for real: the gc ClusterRole lacked `list` on apps/controllerrevisions.)
    assert outcome == "Complete", logs
    report = json.loads([line for line in next(iter(logs.values())).splitlines() if line.startswith("{")][-1])
    assert report["ran"] is True and not report.get("error"), report
    # The write lock went through the cluster: every registry replica's token service acknowledged it.
    assert report["gatesAcked"] == 3, report
    assert report["manifestsSeen"] >= 1, report


def test_removed_rbac_rule_makes_the_webhook_fail_visibly_then_recover(cluster: Cluster, release: Release, namespace: str) -> None:
    """The pods talk to the API server as their ServiceAccounts: take `create artifacts` from the
    webhook's ClusterRole and it can no longer record Artifacts (it says so, and none appear); give
    the rule back and the Artifact is recorded by the webhook's own retries."""
    role_name = f"{release.prefix}-webhook"
    role = cluster.kubectl_json("get", "clusterrole", role_name)
    original = json.loads(json.dumps(role["rules"]))
    stripped = []
    for rule in role["rules"]:
        if "artifacts" in rule.get("resources", []):
            rule = {**rule, "verbs": [v for v in rule["verbs"] if v != "create"]}
        stripped.append(rule)
    assert stripped != original
    cluster.kubectl("patch", "clusterrole", role_name, "--type=json",
                    "-p", json.dumps([{"op": "replace", "path": "/rules", "value": stripped}]))
    image = "myacr.azurecr.io/e2e/forbidden:2.0.0"

    def recorded() -> list[dict[str, object]]:
        return [a for a in cluster.kubectl_json("get", "artifacts", "-n", namespace)["items"]
                if a["spec"]["sourceArtifact"] == image]  # fmt: skip

    try:
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cnf", "namespace": namespace},
                       "spec": {"nodeSelector": {"kubernetes.azure.com/mode": "user"},
                                "containers": [{"name": "cnf", "image": image}]}})

        def forbidden_logged() -> bool:
            logs = "".join(cluster.pod_logs(release.namespace, p["metadata"]["name"], "webhook")
                           for p in component_pods(cluster, release.namespace, "webhook"))
            return any("forbidden" in line.lower() and "artifacts" in line for line in logs.splitlines()
                       if image in line or "403" in line or "forbidden" in line.lower())

        wait_for(forbidden_logged, timeout=60, what="the webhook to log the RBAC denial")
        assert not recorded()
    finally:
        cluster.kubectl("patch", "clusterrole", role_name, "--type=json",
                        "-p", json.dumps([{"op": "replace", "path": "/rules", "value": original}]))
    # The rule is back: the webhook's retries go through and the Artifact appears, with no new pod.
    wait_for(recorded, timeout=90, interval=1, what="the Artifact to be recorded once the rule is restored")
