"""The local control plane is a real Kubernetes API: scheduling, admission webhooks, helm, storage."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ROOT, Cluster, CommandError, wait_for

SYSTEM_POOL = "kubernetes.azure.com/mode"
CHARTS = Path(__file__).parent / "charts"


def _ready(obj: dict[str, Any]) -> bool:
    conds = obj.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def test_nodes_ready_with_system_and_user_pools(cluster: Cluster) -> None:
    nodes = cluster.kubectl_json("get", "nodes")["items"]
    assert nodes, "no nodes"
    assert all(_ready(n) for n in nodes), [n["metadata"]["name"] for n in nodes if not _ready(n)]
    system = [n for n in nodes if n["metadata"]["labels"].get(SYSTEM_POOL) == "system"]
    user = [n for n in nodes if n["metadata"]["labels"].get(SYSTEM_POOL) == "user"]
    assert len(system) == 3
    assert len(user) >= 1
    hostnames = {n["metadata"]["labels"]["kubernetes.io/hostname"] for n in system}
    zones = {n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in system}
    assert len(hostnames) == 3 and len(zones) == 3


def test_anti_affinity_spreads_replicas_over_system_nodes(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "spread"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "spread", "namespace": namespace},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {SYSTEM_POOL: "system"},
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "labelSelector": {"matchLabels": labels},
                                        "topologyKey": "kubernetes.io/hostname",
                                    },
                                }
                            ]
                        }
                    },
                    # the sandbox image `up` pushes (the real nodes pull every image; none from a hub)
                    "containers": [{"name": "pause", "image": "127.0.0.1:25000/localcluster/pause:3.10"}],
                },
            },
        },
    }
    cluster.apply(deployment)

    def running() -> list[dict[str, Any]] | None:
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=spread")["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running" and _ready(p)]
        return ok if len(ok) == 3 else None

    pods = wait_for(running, timeout=90, what="3 running replicas")
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 3, nodes
    system = {
        n["metadata"]["name"]
        for n in cluster.kubectl_json("get", "nodes", "-l", f"{SYSTEM_POOL}=system")["items"]
    }
    assert nodes <= system
    # The controller manager really ran: a ReplicaSet owns the pods.
    owners = {p["metadata"]["ownerReferences"][0]["kind"] for p in pods}
    assert owners == {"ReplicaSet"}


# --------------------------------------------------------------------------------------------------
# A mutating webhook reached by URL on loopback


def _tls_material(tmp: Path) -> tuple[Path, Path, bytes]:
    """A CA and a serving certificate for 127.0.0.1; returns (cert, key, CA PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    later = now + dt.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e-webhook-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(later)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    return cert_path, key_path, ca.public_bytes(serialization.Encoding.PEM)


class _Webhook:
    """An HTTPS AdmissionReview server on 127.0.0.1 that labels every object it sees."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(review)
                patch = [{"op": "add", "path": "/metadata/labels/e2e.clusterregistry.io~1mutated", "value": "yes"}]
                body = json.dumps({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {
                        "uid": review["request"]["uid"],
                        "allowed": True,
                        "patchType": "JSONPatch",
                        "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
                    },
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def loopback_webhook() -> Iterator[tuple[_Webhook, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca = _tls_material(Path(tmp))
        hook = _Webhook(cert, key)
        try:
            yield hook, ca
        finally:
            hook.close()


def test_mutating_webhook_by_url_is_called_and_patch_applied(
    cluster: Cluster, namespace: str, loopback_webhook: tuple[_Webhook, bytes]
) -> None:
    hook, ca = loopback_webhook
    name = f"e2e-url-{namespace}"[:63]
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "label.e2e.clusterregistry.io",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{hook.port}/mutate",
                    "caBundle": base64.b64encode(ca).decode(),
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
            }
        ],
    }
    cluster.apply(config)
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mutated", "namespace": namespace, "labels": {"app": "mutated"}},
            "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
        }
        # The configuration takes effect once the apiserver's informer has seen it: retry the create.
        def created() -> dict[str, Any] | None:
            cluster.apply(pod)
            obj: dict[str, Any] = cluster.kubectl_json("get", "pod", "mutated", "-n", namespace)
            if obj["metadata"]["labels"].get("e2e.clusterregistry.io/mutated") == "yes":
                return obj
            cluster.kubectl("delete", "pod", "mutated", "-n", namespace, "--grace-period=0", "--force")
            return None

        obj = wait_for(created, timeout=60, what="the webhook's label on the pod")
        assert obj["metadata"]["labels"]["e2e.clusterregistry.io/mutated"] == "yes"
        seen = [r["request"] for r in hook.requests]
        assert any(r["kind"]["kind"] == "Pod" and r["namespace"] == namespace and r["operation"] == "CREATE"
                   for r in seen)
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")


# --------------------------------------------------------------------------------------------------
# helm


def test_helm_install_small_chart(cluster: Cluster, namespace: str) -> None:
    out = cluster.helm("install", "hello", str(CHARTS / "hello"), "-n", namespace,
                       "--set", "replicas=2", "--set", "greeting=bonjour", "--wait", "--timeout", "2m")
    assert "STATUS: deployed" in out
    status = json.loads(cluster.helm("status", "hello", "-n", namespace, "-o", "json"))
    assert status["info"]["status"] == "deployed"
    deploy = cluster.kubectl_json("get", "deployment", "hello-hello", "-n", namespace)
    assert deploy["status"]["readyReplicas"] == 2
    cm = cluster.kubectl_json("get", "configmap", "hello-hello", "-n", namespace)
    assert cm["data"]["greeting"] == "bonjour"
    # Endpoints of the Service were computed from the ready pods (the EndpointSlice controller runs).
    slices = cluster.kubectl_json("get", "endpointslices", "-n", namespace,
                                  "-l", "kubernetes.io/service-name=hello-hello")["items"]
    addresses = [a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]]
    assert len(addresses) == 2
    cluster.helm("uninstall", "hello", "-n", namespace, "--wait", "--timeout", "2m")
    wait_for(lambda: not cluster.kubectl_json("get", "pods", "-n", namespace)["items"], timeout=60,
             what="pods gone after uninstall")


# --------------------------------------------------------------------------------------------------
# Storage


def test_default_storage_class(cluster: Cluster) -> None:
    classes = cluster.kubectl_json("get", "storageclass")["items"]
    default = [
        c["metadata"]["name"] for c in classes
        if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    ]
    assert len(default) == 1


@pytest.mark.parametrize(("storage_class", "mode"), [
    (None, "ReadWriteOnce"),
    ("standard", "ReadWriteOnce"),
    ("nexus-shared", "ReadWriteMany"),
])
def test_pvc_binds_and_pod_schedules(cluster: Cluster, namespace: str, storage_class: str | None, mode: str) -> None:
    spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "data", "namespace": namespace}, "spec": spec})

    def bound() -> dict[str, Any] | None:
        pvc: dict[str, Any] = cluster.kubectl_json("get", "pvc", "data", "-n", namespace)
        return pvc if pvc["status"].get("phase") == "Bound" else None

    pvc = wait_for(bound, timeout=60, what="PVC bound")
    assert pvc["spec"]["storageClassName"] == (storage_class or "standard")
    pv = cluster.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
    directory = Path(pv["spec"]["hostPath"]["path"])
    assert directory.is_dir()
    assert (ROOT / ".cache" / "localcluster" / "volumes") in directory.parents
    assert pv["spec"]["accessModes"] == [mode]

    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user", "namespace": namespace},
        "spec": {
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        },
    })
    wait_for(lambda: cluster.kubectl_json("get", "pod", "user", "-n", namespace)["status"].get("phase") == "Running",
             timeout=60, what="pod with the PVC running")

    # Reclaim policy Delete: deleting the claim deletes the volume and its directory.
    cluster.kubectl("delete", "pod", "user", "-n", namespace, "--grace-period=0", "--force")
    cluster.kubectl("delete", "pvc", "data", "-n", namespace, "--wait=false")

    def gone() -> bool:
        try:
            cluster.kubectl("get", "pv", pv["metadata"]["name"])
        except CommandError:
            return not directory.exists()
        return False

    wait_for(gone, timeout=60, what="released volume deleted")


def test_env_file_contract(cluster: Cluster) -> None:
    from tests.support.cluster import read_env

    env = read_env()
    for key in ("KUBECONFIG", "CLUSTER_REGISTRY", "ARTIFACT_STORE", "ARTIFACT_STORE_USER", "ARTIFACT_STORE_PASSWORD"):
        assert env.get(key), key
    for hostport in (env["CLUSTER_REGISTRY"], env["ARTIFACT_STORE"]):
        host, port = hostport.rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=5):
            pass


def test_artifact_store_requires_its_credentials(cluster: Cluster) -> None:
    import urllib.error
    import urllib.request

    url = f"http://{cluster.artifact_store}/v2/"
    with pytest.raises(urllib.error.HTTPError) as anon:
        urllib.request.urlopen(url, timeout=5)  # noqa: S310
    assert anon.value.code == 401
    token = base64.b64encode(f"{cluster.artifact_store_user}:{cluster.artifact_store_password}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
        assert r.status == 200
    with urllib.request.urlopen(f"http://{cluster.cluster_registry}/v2/", timeout=5) as r:  # noqa: S310
        assert r.status == 200
